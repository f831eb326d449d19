"""The toy training script: a tiny 20-step run, its outputs, and bit-for-bit resumption."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava_lens.toy.scenes import Style
from llava_lens.toy.train import Batches, lr_at, parse_args, train


def _run(out, steps, *extra):
    return train(parse_args(["--out", str(out), "--steps", str(steps), "--tiny", "--batch-size", "8",
                             "--warmup", "5", "--save-every", "10", "--threads", "1", *extra]))


def test_twenty_step_run(tmp_path):
    log = _run(tmp_path / "m", 20)
    out = tmp_path / "m"
    assert log["steps"] == 20 and len(log["losses"]) >= 1
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert (out / "checkpoint" / "model.safetensors").is_file()
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 20
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    batch = Batches(processor, 0, 4, Style(size=32))[0]
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert loss < 4.5  # vocabulary of ~75 words: ln(75) = 4.3 at random; trained must not be worse


def test_loss_only_on_answer_tokens(tmp_path):
    _run(tmp_path / "m", 1)
    processor = AutoProcessor.from_pretrained(tmp_path / "m")
    data = Batches(processor, 0, 4, Style(size=32))
    ids, labels = data.encode("what color is the star ?", "the star is red .")
    tok = processor.tokenizer
    supervised = [i for i, y in zip(ids, labels) if y != -100]
    assert tok.convert_ids_to_tokens(supervised) == ["the", "star", "is", "red", ".", "</s>"]
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == (32 // 8) ** 2


def test_resume_matches_uninterrupted_run(tmp_path):
    _run(tmp_path / "full", 20)
    _run(tmp_path / "part", 20, "--max-minutes", "1e-9")  # stops (and checkpoints) after one step
    assert json.loads((tmp_path / "part" / "checkpoint" / "state.json").read_text())["step"] == 1
    _run(tmp_path / "part", 20, "--resume")
    a = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 10) == 0.1
    assert lr_at(10, 100, 1.0, 10) == 1.0
    assert abs(lr_at(100, 100, 1.0, 10) - 0.05) < 1e-9


def test_training_pixels_match_the_processor(tmp_path):
    """Training normalises pixels itself; it must be what the saved processor gives at inference."""
    import numpy as np
    from PIL import Image

    from llava_lens.toy.scenes import make_scene
    from llava_lens.toy.train import pixels

    _run(tmp_path / "m", 1)
    processor = AutoProcessor.from_pretrained(tmp_path / "m")
    images = [make_scene(s, Style(size=32)).image for s in range(3)]
    ours = pixels(images)
    theirs = processor.image_processor([Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=0)
    assert np.abs((ours - theirs).numpy()).mean() < 2e-3
