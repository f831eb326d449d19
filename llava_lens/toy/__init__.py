"""The embedded shapes-tiny model: procedural scenes, tokenizer/processor builder, training."""
