"""The tracer at the real geometry of llava-hf/llava-1.5-7b-hf and llava-hf/llava-v1.6-mistral-7b-hf.

Models built by :func:`llava_lens.toy.geometry.build_real_geometry`: the checkpoints' heads, KV heads,
576-token CLIP grid, anyres pinpoints, padded 32064-row vocabulary and position limits, at tiny widths
and 2 LM layers (2 ViT layers: the ViT's depth changes no shape the LM sees).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import check_bridge_logits_equal_hf, check_greedy_equal_hf_generate, check_steps_equal_recompute
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

import llava_lens as ll
from llava_lens.toy.geometry import GEOMETRIES, build_real_geometry

QUESTION = "what color is the circle ?"
FAMILY = {"llava-1.5-7b": "llava", "llava-next-mistral-7b": "llava_next"}
# Image tokens the processor must insert, counted by hand: 24x24 = 576 base patches; NeXT adds the
# anyres grid unpadded to the image's aspect, plus one newline token per row.
#   480x640 -> pinpoint 672x672: 48x48 grid, 48*480/640 = 36 rows kept: 576 + 36*49 = 2340
#   300x1000 -> 336x1008: 24x72 grid, int(300*72/1000) = 21 -> padding 1 each side, 22 rows: 576 + 22*73 = 2182
#   900x400 -> 1008x336: 72x24 grid, 900*24/400 = 54 rows kept: 576 + 54*25 = 1926
IMAGE_TOKENS = {
    ("llava-1.5-7b", (480, 640)): 576, ("llava-1.5-7b", (300, 1000)): 576, ("llava-1.5-7b", (900, 400)): 576,
    ("llava-next-mistral-7b", (480, 640)): 2340, ("llava-next-mistral-7b", (300, 1000)): 2182,
    ("llava-next-mistral-7b", (900, 400)): 1926,
}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """name -> (model dir, LlavaLens) of both real geometries at 2 layers."""
    out = {}
    for seed, name in enumerate(FAMILY):
        path = build_real_geometry(tmp_path_factory.mktemp("real") / name, name, n_layers=2, vision_layers=2,
                                   seed=seed)
        out[name] = (path, ll.load(str(path), device="cpu"))
    return out


def _noise(height, width, seed=0):
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8")


def _ramp(height, width):
    """Red = x, green = y (fractions of the width/height at the pixel centre), blue = 255 marks the image."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x + 0.5) / width, (y + 0.5) / height, np.ones_like(x, dtype=float)], -1)
    return np.round(rgb * 255).astype("uint8")


@pytest.mark.parametrize("name", list(FAMILY))
def test_config_has_the_checkpoint_geometry(name, real):
    geo, (_, lens) = GEOMETRIES[name], real[name]
    text, vision = lens.config.text_config, lens.config.vision_config
    assert (lens.n_layers, lens.n_heads, text.num_key_value_heads) == (2, geo.n_heads, geo.n_kv_heads)
    assert text.vocab_size == geo.vocab_size == 32064 and len(lens.tokenizer) == geo.tokenizer_size == 32002
    assert text.max_position_embeddings == geo.max_positions
    assert (vision.image_size, vision.patch_size, vision.num_attention_heads) == (336, 14, 16)
    assert lens.config.vision_feature_layer == -2 and lens.config.vision_feature_select_strategy == "default"
    if geo.family == "llava_next":
        assert [tuple(p) for p in lens.config.image_grid_pinpoints] == list(geo.pinpoints)
        assert text.model_type == "mistral"


@pytest.mark.parametrize("name", list(FAMILY))
def test_bridge_logits_equal_hf(name, real):
    path, lens = real[name]
    check_bridge_logits_equal_hf(lens, path, FAMILY[name], _noise(300, 1000), QUESTION, attn="sdpa")


@pytest.mark.parametrize("name", list(FAMILY))
def test_trace_equals_hf_generate_and_no_cache_recompute(name, real):
    """Greedy tokens == HF generate; the KV-cached steps == a full ``run_with_cache`` of the same
    prefix (the prefill step and a decode step, fast path); the bridge path's steps (NeXT's 8 KV heads
    for 32 query heads go through TransformerLens' own attention there) == the checked fast ones.
    (One recompute fewer than checking both paths against it: each costs ~5 s at NeXT's length.)"""
    path, lens = real[name]
    image = _noise(900, 400, seed=1)  # NeXT: 1926 image tokens (the smallest of the tested aspects)
    fast = check_greedy_equal_hf_generate(lens, path, FAMILY[name], image, QUESTION, n=4, attn="sdpa")
    assert fast.steps[0].logits.shape == (32064,)
    check_steps_equal_recompute(lens, fast, image, QUESTION, steps=[0, 1])
    extra = ["blocks.1.hook_mlp_out"]  # a non-default capture forces every forward through the bridge
    bridge = lens.trace(image, QUESTION, max_new_tokens=2, capture=extra, attention_dtype=torch.float32)
    assert bridge.token_ids == fast.token_ids[:2]
    for a, b in zip(bridge.steps, fast.steps):
        torch.testing.assert_close(a.attention, b.attention, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.resid, b.resid, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("name", "size"), list(IMAGE_TOKENS))
def test_vision_span_counts_the_processors_image_tokens(name, size, real):
    _, lens = real[name]
    inputs, span = lens.prepare(_noise(*size), QUESTION)
    image_positions = (inputs.input_ids[0] == lens.config.image_token_id).nonzero().flatten()
    assert len(image_positions) == len(span) == IMAGE_TOKENS[name, size]
    assert torch.equal(span.positions, image_positions)
    assert int(span.is_patch.sum()) == sum(r * c for r, c in span.grids)


def _patch_xy(tile_pixels, patch):
    """``[n_tiles, 3, S, S]`` normalised pixels -> ``[n_tiles, (S/patch)^2, 2]`` mean (x, y) of each patch's
    image pixels (decoded from the ramp's red/green; padding, whose blue is low, left out; NaN if none)."""
    mean = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD)[:, None, None]
    rgb = tile_pixels.float() * std + mean
    n, _, s, _ = rgb.shape
    g = s // patch
    cells = rgb.reshape(n, 3, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, 3, patch * patch)
    keep = (cells[:, :, 2] > 0.75).float()
    return (cells[:, :, :2] * keep[:, :, None]).sum(-1) / keep.sum(-1, keepdim=True)  # 0/0 -> NaN


@pytest.mark.parametrize(("name", "size"), [("llava-1.5-7b", (480, 640)), ("llava-next-mistral-7b", (480, 640)),
                                            ("llava-next-mistral-7b", (300, 1000)),
                                            ("llava-next-mistral-7b", (900, 400))])
def test_boxes_put_each_patch_where_its_pixels_came_from(name, size, real):
    """A coordinate-ramp image: the pixels the model reads at each image position (the processor's
    pixel values, arranged by HF's own feature packing) decode to a place within one patch of the
    position's ``vision_span.boxes``."""
    _, lens = real[name]
    config = lens.config
    trace = lens.trace(_ramp(*size), QUESTION, max_new_tokens=1)
    span = trace.vision_span
    inputs, _ = lens.prepare(_ramp(*size), QUESTION)
    if FAMILY[name] == "llava":
        xy = _patch_xy(inputs.pixel_values, config.vision_config.patch_size)[0]
    else:
        per_tile = _patch_xy(inputs.pixel_values[0], config.vision_config.patch_size)
        packer = LlavaNextModel.pack_image_features.__get__(SimpleNamespace(config=config))
        (xy,), _ = packer([per_tile], inputs.extra["image_sizes"], "default",
                          image_newline=torch.full((2,), float("nan")))
    assert len(xy) == len(span)
    patch = span.is_patch
    assert torch.equal(xy[:, 0].isnan(), ~patch)  # newline tokens exactly where HF put them
    top, left, bottom, right = span.boxes[patch].unbind(-1)
    x, y = xy[patch].unbind(-1)
    assert ((x - (left + right) / 2).abs() <= right - left).all()
    assert ((y - (top + bottom) / 2).abs() <= bottom - top).all()
    # and the decoded places span the boxes (LLaVA-1.5: the centre crop; NeXT: the whole image)
    width, height = (right - left).max(), (bottom - top).max()
    assert x.min() < left.min() + width and x.max() > right.max() - width
    assert y.min() < top.min() + height and y.max() > bottom.max() - height


def test_ids_past_the_tokenizer_get_a_label(real, tmp_path):
    """llava-hf pads the vocabulary to 32064 rows over a 32002-entry tokenizer: ids 32002-32063 have
    logits but no token string. A trace that generates one must still label it and write its report."""
    _, lens = real["llava-1.5-7b"]
    pad_id = 32050
    assert lens.tokenizer.convert_ids_to_tokens(pad_id) is None

    def boost(logits, hook):
        logits[..., pad_id] += 1e4
        return logits

    with lens.bridge.hooks(fwd_hooks=[("unembed.hook_out", boost)]):
        trace = lens.trace(_noise(336, 336), QUESTION, max_new_tokens=2, prefill_cache=True)
    assert trace.token_ids == [pad_id, pad_id]
    assert all(isinstance(t, str) and t for t in trace.tokens)
    result = ll.logit_lens(trace, lens, k=3)
    ll.views.export(trace, tmp_path / "run", result)
    from llava_lens.views.report import write_report

    assert write_report(tmp_path / "run").stat().st_size > 0
