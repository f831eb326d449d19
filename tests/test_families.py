"""Conformance suite: every model family, on random-init models with a published checkpoint's geometry.

One entry of ``CASES`` per family (adding a family = its adapter + one entry here). Every check is
against an independent reference: HF's own forward / ``generate`` on a separately loaded model,
a no-cache ``run_with_cache`` recompute, the image tokens the processor inserted, the pixels HF's
own packing places at each position, and single traces.

LLaVA-1.5 / NeXT use :mod:`llava_lens.toy.geometry`'s real-geometry builder when it is present,
else the tiny toy builder (their real-geometry checks also live in ``tests/test_real_geometry.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

import llava_lens as ll
from llava_lens.errors import ViewNotApplicableError
from llava_lens.families import FAMILIES
from llava_lens.families.base import ConfigOnly
from llava_lens.toy.build import build_llava
from llava_lens.toy.families_build import build_onevision, build_qwen25vl

QUESTION = "what color is the circle ?"
# (height, width): landscape, portrait, very wide; chosen to hit different pinpoints / grids
SIZES = ((300, 500), (520, 260), (160, 700))
# processor-only checks add a large image: OneVision's anyres_max_9 then shrinks the unpadded grid
# (81x108 -> bilinear), Qwen2.5-VL's grid grows to 43x57 merged tokens
LARGE = (1200, 1600)


def _build_llava(family, real_name):
    def build(path, seed):
        try:
            from llava_lens.toy.geometry import build_real_geometry
        except ImportError:
            return build_llava(path, family, seed=seed)
        return build_real_geometry(path, real_name, n_layers=2, vision_layers=2, seed=seed)
    return build


CASES = {
    "llava-1.5-7b": _build_llava("llava", "llava-1.5-7b"),
    "llava-next-mistral-7b": _build_llava("llava_next", "llava-next-mistral-7b"),
    "llava-onevision-qwen2-0.5b": lambda path, seed: build_onevision(path, seed=seed),
    "qwen2.5-vl-3b": lambda path, seed: build_qwen25vl(path, seed=seed),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (model dir, LlavaLens), built once per module."""
    out = {}
    for seed, (name, build) in enumerate(CASES.items()):
        path = tmp_path_factory.mktemp("families") / name
        build(path, seed)
        out[name] = (path, ll.load(str(path), device="cpu"))
    return out


def _noise(size, seed=0):
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype("uint8")


def _ramp(size):
    """Red = x, green = y (fractions of width/height at the pixel centre), blue = 255 marks the image
    (processors pad with black: padding weighs nothing in a position's mean place)."""
    height, width = size
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x + 0.5) / width, (y + 0.5) / height, np.ones(x.shape)], -1)
    return np.round(rgb * 255).astype("uint8")


def _hf(lens, path):
    """The model directory loaded by plain HF (eager attention): the independent reference."""
    return type(lens.hf_model).from_pretrained(path, attn_implementation="eager").eval()


def _extend(lens, extra, n_new):
    """Processor extras for the prompt + ``n_new`` generated tokens (per-token inputs padded with 0)."""
    return {k: torch.cat([v, v.new_zeros(1, n_new)], 1) if k in lens.family.sequence_inputs else v
            for k, v in extra.items()}


def test_every_family_has_a_case():
    assert len(CASES) == len(FAMILIES)


@pytest.mark.parametrize("name", list(CASES))
def test_vision_span_count_is_the_processor_image_tokens_and_the_model_features(name, built):
    path, lens = built[name]
    for size in (*SIZES, LARGE):
        inputs, span = lens.prepare(_noise(size), QUESTION)
        inserted = int((inputs.input_ids[0] == lens.config.image_token_id).sum())
        assert len(span) == inserted > 0
        assert torch.equal(span.positions, (inputs.input_ids[0] == lens.config.image_token_id).nonzero().flatten())
        assert span.is_patch.sum() == sum(r * c for r, c in span.grids)
        if size != LARGE:  # the model's own feature count, through its forward's placeholder check
            with torch.no_grad():
                lens.hf_model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, **inputs.extra)


def _pixel_xy(lens, inputs):
    """``[n, 2]`` (x, y) image fractions each image-feature position sees, from the processed pixels
    placed by HF's own code: image-pixel means of the ramp (NaN for newlines and CLS). Every step
    is linear (patch means, HF's packing and bilinear resizing), so (x*m, y*m, m) packs to the
    mean over the image pixels m a position sees."""
    proc = lens.processor.image_processor
    mean, std = torch.tensor(proc.image_mean), torch.tensor(proc.image_std)
    pix = inputs.pixel_values.float()
    if lens.family.name == "qwen2.5-vl":  # [patches, C*T*P*P], 4 consecutive patches per merged token
        rgb = pix.reshape(pix.shape[0], 3, -1).transpose(1, 2) * std + mean  # [patches, T*P*P, 3]
        w = torch.cat([rgb[..., :2] * rgb[..., 2:], rgb[..., 2:]], -1).mean(1)
        w = w.reshape(-1, 4, 3).mean(1)
        return w[:, :2] / w[:, 2:]
    p = lens.config.vision_config.patch_size
    tiles = pix[0] if pix.dim() == 5 else pix  # [tiles, 3, H, W]
    rgb = tiles * std[:, None, None] + mean[:, None, None]
    rgb = torch.cat([rgb[:, :2] * rgb[:, 2:], rgb[:, 2:]], 1)
    means = rgb.unfold(2, p, p).unfold(3, p, p).mean((-1, -2))  # [tiles, 3, g, g]
    feats = means.flatten(2).transpose(1, 2)  # [tiles, g*g, 3]
    nan = torch.full((3,), float("nan"))
    if lens.family.name == "llava-1.5":
        packed = feats[0]
        if lens.config.vision_feature_select_strategy == "full":
            packed = torch.cat([nan[None], packed])
    elif lens.family.name == "llava-next":
        pack = LlavaNextModel.pack_image_features.__get__(ConfigOnly(lens.config))
        (packed,), _ = pack([feats], inputs.extra["image_sizes"], "default", image_newline=nan)
    else:
        pack = LlavaOnevisionModel.pack_image_features.__get__(ConfigOnly(lens.config))
        (packed,), _ = pack([feats], inputs.extra["image_sizes"], image_newline=nan,
                            vision_aspect_ratio=lens.config.vision_aspect_ratio)
    return packed[:, :2] / packed[:, 2:]


@pytest.mark.parametrize("name", list(CASES))
def test_ramp_image_maps_each_patch_within_one_patch_of_its_place(name, built):
    _, lens = built[name]
    for size in (*SIZES, LARGE):
        inputs, span = lens.prepare(_ramp(size), QUESTION)
        xy = _pixel_xy(lens, inputs)
        assert xy.shape == (len(span), 2)
        patch = span.is_patch
        assert torch.equal(patch, ~xy[:, 0].isnan())
        top, left, bottom, right = span.boxes[patch].unbind(-1)
        cx, cy = (left + right) / 2, (top + bottom) / 2
        x, y = xy[patch].unbind(-1)
        assert ((x - cx).abs() <= right - left + 1 / 255).all(), (name, size, (x - cx).abs().max())
        assert ((y - cy).abs() <= bottom - top + 1 / 255).all(), (name, size, (y - cy).abs().max())
        # and the boxes tile each grid: every cell of every grid has exactly one position
        for t, (rows, cols) in enumerate(span.grids):
            sel = span.tile == t
            assert sorted((span.row[sel] * cols + span.col[sel]).tolist()) == list(range(rows * cols))


@pytest.mark.parametrize("name", list(CASES))
def test_bridge_logits_equal_hf(name, built):
    path, lens = built[name]
    inputs, _ = lens.prepare(_noise(SIZES[0]), QUESTION)
    hf = _hf(lens, path)
    with torch.no_grad():
        ref = hf(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, **inputs.extra).logits
        ours = lens.bridge(inputs.input_ids, pixel_values=inputs.pixel_values, **inputs.extra)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-4


def _recompute(lens, inputs, token_ids, index):
    """Logits, last-position attention rows and resid stack of ``bridge.run_with_cache`` on the prefix."""
    n_layers = lens.n_layers
    wanted = {f"blocks.{i}.attn.hook_pattern" for i in range(n_layers)}
    wanted |= {f"blocks.{i}.hook_resid_pre" for i in range(n_layers)} | {f"blocks.{n_layers - 1}.hook_resid_post"}
    prefix = torch.cat([inputs.input_ids, torch.tensor([token_ids[:index]], dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits, cache = lens.bridge.run_with_cache(prefix, pixel_values=inputs.pixel_values,
                                                   **_extend(lens, inputs.extra, index),
                                                   names_filter=lambda n: n in wanted)
    attn = torch.stack([cache[f"blocks.{i}.attn.hook_pattern"][0, :, -1] for i in range(n_layers)])
    resid = torch.stack([cache[f"blocks.{i}.hook_resid_pre"][0, -1] for i in range(n_layers)]
                        + [cache[f"blocks.{n_layers - 1}.hook_resid_post"][0, -1]])
    return logits[0, -1], attn, resid


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_equals_hf_generate_and_steps_equal_no_cache_recompute(name, built):
    path, lens = built[name]
    image, n = _noise(SIZES[1], seed=1), 4
    inputs, _ = lens.prepare(image, QUESTION)
    hf = _hf(lens, path)
    with torch.no_grad():
        out = hf.generate(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, **inputs.extra,
                          attention_mask=torch.ones_like(inputs.input_ids), max_new_tokens=n, do_sample=False,
                          min_new_tokens=n)
    expected = out[0, inputs.input_ids.shape[1]:].tolist()
    for fast in (True, False):  # the fast path (HF modules + sdpa) and the bridge path (every hook)
        trace = lens.trace(image, QUESTION, max_new_tokens=n, keep_logits=True, fast=fast,
                           attention_dtype=torch.float32)
        assert trace.token_ids == expected[:len(trace.token_ids)] and trace.token_ids
        for step in (trace.steps[0], trace.steps[-1]):
            logits, attn, resid = _recompute(lens, inputs, trace.token_ids, step.index)
            torch.testing.assert_close(step.attention, attn, atol=1e-5, rtol=0)
            torch.testing.assert_close(step.resid, resid, atol=1e-5, rtol=0)
            torch.testing.assert_close(step.logits, logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_batch_equals_single(name, built):
    _, lens = built[name]
    images = [_noise(SIZES[0], seed=2), _noise(SIZES[2], seed=3)]  # different token counts: left padding
    questions = [QUESTION, "is there a red square ?"]
    batch = lens.trace_batch(images, questions, max_new_tokens=3)
    for image, question, got in zip(images, questions, batch):
        single = lens.trace(image, question, max_new_tokens=3)
        assert got.token_ids == single.token_ids
        assert len(got.vision_span) == len(single.vision_span)
        for a, b in zip(got.steps, single.steps):
            torch.testing.assert_close(a.resid, b.resid, atol=1e-4, rtol=0)
            torch.testing.assert_close(a.attention.float(), b.attention.float(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_every_map_applies_or_says_why_in_one_line(name, built):
    _, lens = built[name]
    trace = lens.trace(_noise(SIZES[0], seed=4), QUESTION, max_new_tokens=2, prefill_cache=True)
    rows, cols = trace.vision_span.grids[0]
    for method, fn in ll.grounding.MAPS.items():
        if lens.family.vit_views and method.startswith(("vit_", "vlm_visualizer")):
            with pytest.raises(ViewNotApplicableError) as err:
                fn(trace)
            assert "\n" not in str(err.value) and str(err.value) == lens.family.vit_views
            continue
        grid = fn(trace)
        assert grid.shape == (2, rows, cols) and torch.isfinite(grid).all(), method
    assert ll.vision_share(trace) is not None and ll.logit_lens(trace, lens) is not None


@pytest.mark.parametrize("name", [n for n in CASES if n != "qwen2.5-vl-3b"])
def test_vit_summary_equals_raw_vision_encoder_patterns(name, built):
    """The fast path's head-mean ViT attention (base tile) == the bridge's raw ViT hook_pattern."""
    _, lens = built[name]
    image = _noise(SIZES[0], seed=5)
    layers = lens.info().vit_layers_used
    fast = lens.trace(image, QUESTION, max_new_tokens=1, prefill_cache=True)
    raw = lens.trace(image, QUESTION, max_new_tokens=1,
                     prefill_cache=[f"vision_encoder.encoder_layers.{i}.attn.hook_pattern" for i in layers])
    for i, layer in enumerate(layers):
        pat = raw.prefill[f"vision_encoder.encoder_layers.{layer}.attn.hook_pattern"].float()
        expected = (pat[0] if pat.ndim == 4 else pat).mean(0)
        torch.testing.assert_close(fast.summary.vit_attention[i].float(), expected, atol=1e-3, rtol=0)
    rows, cols = fast.vision_span.grids[0]
    cls = 0 if lens.family.name == "llava-onevision" else 1  # SigLIP has no CLS token, CLIP has one
    assert fast.summary.vit_attention.shape[-1] == rows * cols + cls


@pytest.mark.parametrize("name", list(CASES))
def test_loading_installs_nothing_and_the_bridge_holds_our_processor(name, built, monkeypatch):
    """TransformerLens 4.3's boot would load its own processor and, failing (no torchvision), run pip;
    its Qwen2.5-VL adapter would refuse to start without torchvision (this suite runs without it)."""
    import subprocess

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("llava-lens ran a subprocess while loading a model")

    for fn in ("check_call", "run", "Popen", "call", "check_output"):
        monkeypatch.setattr(subprocess, fn, refuse)
    path, _ = built[name]
    lens = ll.load(str(path), device="cpu")
    assert calls == []
    assert lens.bridge.processor is lens.processor
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
    from transformer_lens.model_bridge.sources.transformers import helpers, source
    assert source.load_modality_processor is helpers.load_modality_processor  # the swap is undone
    assert ArchitectureAdapter._check_required_libraries.__qualname__.startswith("ArchitectureAdapter.")
