"""Vision share and image maps against hand computations on tiny LLaVA / LLaVA-NeXT traces."""

import numpy as np
import pytest
import torch
from PIL import Image

import llava_lens
from llava_lens import grounding as g
from llava_lens import hooks
from llava_lens.toy.build import build_llava


def _trace(path, family):
    build_llava(path, family)
    lens = llava_lens.load(str(path))
    image = Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype("uint8"))
    # raw ViT patterns (the hand computations' reference) and float32 rows (sums checked to 1e-5)
    vit = [hooks.vit_pattern(layer) for layer in range(lens.config.vision_config.num_hidden_layers)]
    return lens.trace(image, "what color is the circle ?", max_new_tokens=3, prefill_cache=vit,
                      attention_dtype=torch.float32)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounding")
    return {fam: _trace(root / fam, fam) for fam in ("llava", "llava_next")}


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_vision_share_sums_to_one_and_matches_hand(traces, family):
    trace = traces[family]
    share = g.vision_share(trace)
    n_layers, n_heads = trace.info.n_layers, trace.info.n_heads
    assert share.shares.shape == (len(trace.steps), n_layers, n_heads, 3)
    torch.testing.assert_close(share.shares.sum(-1), torch.ones(share.shares.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(share.mean.sum(-1), torch.ones(len(trace.steps)), atol=1e-5, rtol=0)
    step = trace.steps[2]
    image = sum(step.attention[1, 0, int(p)] for p in trace.vision_span.positions)
    generated = step.attention[1, 0, len(trace.prompt_ids):].sum()
    assert share.shares[2, 1, 0, 0] == pytest.approx(float(image), abs=1e-6)
    assert share.shares[2, 1, 0, 2] == pytest.approx(float(generated), abs=1e-6)
    assert share.shares[0, :, :, 2].abs().max() == 0  # step 0 has no generated keys


def test_attention_maps_match_hand(traces):
    trace = traces["llava"]
    span = trace.vision_span
    rows, cols = span.grids[0]
    mean_map = g.attention_map_mean(trace, layers=[0, 1])
    max_map = g.attention_map_max(trace, layers=[-1])
    assert mean_map.shape == max_map.shape == (len(trace.steps), rows, cols)
    s, i = 1, 5
    pos, r, c = int(span.positions[i]), int(span.row[i]), int(span.col[i])
    att = trace.steps[s].attention
    assert mean_map[s, r, c] == pytest.approx(float(att[:, :, pos].mean()), abs=1e-6)
    assert max_map[s, r, c] == pytest.approx(float(att[1, :, pos].max()), abs=1e-6)
    one_head = g.attention_map_mean(trace, layers=[1], heads=[0])
    assert one_head[s, r, c] == pytest.approx(float(att[1, 0, pos]), abs=1e-6)
    two_heads = g.attention_map_mean(trace, heads=[0, 1])
    assert two_heads[s, r, c] == pytest.approx(float(att[:, :2, pos].mean()), abs=1e-6)


def test_vlm_visualizer_and_rollout_match_hand(traces):
    trace = traces["llava"]
    rows, cols = trace.vision_span.grids[0]
    vit = trace.prefill["vision_encoder.encoder_layers.0.attn.hook_pattern"].float()  # only layer 0 feeds (-2)
    assert trace.info.vit_layers_used == [0]
    # VLM-Visualizer: per-patch ViT map (CLS dropped, rows renormalised) weighted by LLM attention
    v = vit.mean(0)[1:, 1:]
    v = v / v.sum(-1, keepdim=True)
    step = trace.steps[0]
    w = torch.stack([step.attention[:, :, int(p)].mean() for p in trace.vision_span.positions])
    w = w / w.sum()
    hand = sum(w[k] * v[k].reshape(rows, cols) for k in range(len(w)))
    hand = hand / hand.max()
    got = g.vlm_visualizer_map(trace)
    assert got.shape == (len(trace.steps), rows, cols)
    torch.testing.assert_close(got[0], hand, atol=1e-5, rtol=1e-4)
    # rollout over one layer: 0.5 A + 0.5 I, CLS row, patches normalised
    a = 0.5 * vit.mean(0) + 0.5 * torch.eye(vit.shape[-1])
    a = a / a.sum(-1, keepdim=True)
    torch.testing.assert_close(g.vit_rollout(trace), (a[0, 1:] / a[0, 1:].sum()).reshape(rows, cols))
    assert g.vit_rollout_map(trace).shape == (len(trace.steps), rows, cols)
    for name, fn in g.MAPS.items():
        assert fn(trace).shape == (len(trace.steps), rows, cols), name


def test_next_maps_and_paint(traces):
    trace = traces["llava_next"]
    span = trace.vision_span
    (r0, c0), (r1, c1) = span.grids
    assert g.attention_map_mean(trace, tile=1).shape == (len(trace.steps), r1, c1)
    assert g.vlm_visualizer_map(trace).shape == (len(trace.steps), r0, c0)
    h, w = span.image_size
    ones = torch.ones(len(span))
    for tile in (0, 1):
        painted = g.paint(ones, span, tile=tile)
        assert painted.shape == (h, w)
        assert painted.min() == 1  # both NeXT grids cover the whole image
    hi = g.attention_map_mean(trace, tile=1)
    assert g.paint_grid(hi, span, tile=1).shape == (len(trace.steps), h, w)


def test_paint_places_values_in_boxes(traces):
    span = traces["llava"].vision_span
    h, w = span.image_size
    vals = torch.zeros(len(span))
    vals[5] = 2.0
    painted = g.paint(vals, span)
    top, left, bottom, right = (span.boxes[5] * torch.tensor([h, w, h, w])).round().long().tolist()
    assert painted[top:bottom, left:right].min() == 2.0
    assert painted.sum() == pytest.approx(2.0 * (bottom - top) * (right - left))
    grid = span.to_grid(vals)
    assert torch.equal(g.grid_to_positions(grid, span), vals)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_maps_from_the_prefill_summary_equal_maps_from_raw_patterns(traces, family):
    """The default (summary) trace stores head-mean ViT attention and fp16 rows: same maps within fp16 error."""
    raw = traces[family]
    lens = llava_lens.load(str(raw.model_name))
    summary = lens.trace(raw.image, raw.question, max_new_tokens=3, prefill_cache=True)
    assert summary.prefill == {} and summary.summary.vit_attention is not None
    assert summary.token_ids == raw.token_ids
    torch.testing.assert_close(g.vit_rollout(summary), g.vit_rollout(raw), atol=2e-3, rtol=0)
    torch.testing.assert_close(g.vlm_visualizer_map(summary), g.vlm_visualizer_map(raw), atol=5e-3, rtol=0)
    torch.testing.assert_close(g.attention_map_mean(summary), g.attention_map_mean(raw), atol=5e-4, rtol=0)
