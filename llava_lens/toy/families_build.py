"""Random-weight model directories of the newer families, with a published checkpoint's geometry.

:func:`build_family` writes a directory (config + weights + processor + word tokenizer) that
loads with ``ll.load(dir)``. What is real is everything that decides where image features sit and
how many there are; what is not is the depth (``n_layers``/``vision_layers``), the widths (tiny
heads), the weights (random) and the tokenizer's words (:func:`llava_lens.toy.build.word_tokenizer`;
special tokens at small ids, not the checkpoint's). The numbers are copied from each checkpoint's
``config.json`` / ``preprocessor_config.json`` on the Hugging Face hub:

``llava-onevision-qwen2-0.5b`` (``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``)
    SigLIP so400m/14 at 384 px (27x27 = 729 patches, no CLS, ``vision_feature_layer=-1``,
    ``"full"`` strategy), ``anyres_max_9`` with the 36 pinpoints ``(384i, 384j)``, i, j in 1..6;
    Qwen2-0.5B text: 14 heads, 2 KV heads, rope theta 1e6, tied embeddings; image mean/std 0.5.
``qwen2.5-vl-3b`` (``Qwen/Qwen2.5-VL-3B-Instruct``)
    ViT patch 14, temporal patch 2, 2x2 spatial merge, window 112 px with full attention in the
    last block of every 8, 16 vision heads; resize to a multiple of 28 between 3,136 and
    12,845,056 pixels; text: 16 heads, 2 KV heads, rope theta 1e6, M-RoPE sections (16, 24, 24)
    of a 128-dim head (scaled here to the tiny head), tied embeddings.

The vocabulary is the tokenizer plus a small padding (the real 151,936-152,000 rows would only
make every test slower without changing a position).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from llava_lens.families.base import image_only_processor
from llava_lens.toy.build import BASE_WORDS, CHAT_TEMPLATE, word_tokenizer

ONEVISION_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
QWEN_SPECIAL = ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
# Qwen2.5-VL's prompt wraps the image pads in vision start/end tokens, like the real template;
# the pad is the word tokenizer's image token (the processor uses ``tokenizer.image_token``).
QWEN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image>\n", "<|vision_start|><image><|vision_end|>\n")


def _tokenizer(extra: tuple[str, ...] = ()):
    tok = word_tokenizer(BASE_WORDS)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": ["<image>", *extra]})
    return tok


def _qwen2_text(tok, n_layers: int, heads: int, kv_heads: int, head_dim: int, **extra):
    d_model = heads * head_dim
    return dict(
        vocab_size=len(tok) + 8, hidden_size=d_model, head_dim=head_dim, intermediate_size=d_model * 2,
        num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **extra,
    )


def build_onevision(out_dir: str | Path, *, n_layers: int = 2, vision_layers: int = 2, seed: int = 0):
    """``llava-onevision-qwen2-0.5b-ov-hf``'s geometry at tiny widths (see the module docstring)."""
    tok = _tokenizer()
    text = Qwen2Config(**_qwen2_text(tok, n_layers, 14, 2, 8),
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    vision = SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=vision_layers, num_attention_heads=16)
    pinpoints = [list(p) for p in ONEVISION_PINPOINTS]
    config = LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=pinpoints, tie_word_embeddings=True)
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 384, "width": 384}, image_grid_pinpoints=pinpoints,
        image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True)
    processor = image_only_processor(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tok, num_image_tokens=729,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=CHAT_TEMPLATE)
    _save(out_dir, model, processor)
    return model


def build_qwen25vl(out_dir: str | Path, *, n_layers: int = 2, vision_layers: int = 2, seed: int = 0,
                   max_pixels: int = 12845056):
    """``Qwen2.5-VL-3B-Instruct``'s geometry at tiny widths (see the module docstring).

    With ``vision_layers`` blocks, the last is a full-attention block and the others windowed.
    """
    tok = _tokenizer(QWEN_SPECIAL)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    # mrope sections (16, 24, 24) of 64 rotary pairs, scaled to the 8 pairs of a 16-dim head
    text = _qwen2_text(tok, n_layers, 16, 2, 16, rope_parameters={
        "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=vision_layers, hidden_size=128, intermediate_size=128, num_heads=16, in_channels=3,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[vision_layers - 1], out_hidden_size=text["hidden_size"],
                  tokens_per_second=2)
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=3136, max_pixels=max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2)
    processor = image_only_processor(Qwen2_5_VLProcessor)(image_processor=image_processor, tokenizer=tok,
                                    chat_template=QWEN_CHAT_TEMPLATE)
    _save(out_dir, model, processor)
    return model


def build_family(out_dir: str | Path, family: Literal["llava_onevision", "qwen2_5_vl"], **kwargs):
    """Build and save one of the families above; returns the HF model."""
    builders = {"llava_onevision": build_onevision, "qwen2_5_vl": build_qwen25vl}
    if family not in builders:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(builders)}")
    return builders[family](out_dir, **kwargs)


def _save(out_dir, model, processor) -> None:
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
