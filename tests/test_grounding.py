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
    # raw ViT patterns (the hand computations' reference), the last layer's residual (TAM) and
    # float32 rows (sums checked to 1e-5)
    vit = [hooks.vit_pattern(layer) for layer in range(lens.config.vision_config.num_hidden_layers)]
    raw = vit + [hooks.resid_post(lens.n_layers - 1)]
    return lens, lens.trace(image, "what color is the circle ?", max_new_tokens=3, prefill_cache=raw,
                            attention_dtype=torch.float32)


@pytest.fixture(scope="module")
def lens_traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounding")
    return {fam: _trace(root / fam, fam) for fam in ("llava", "llava_next")}


@pytest.fixture(scope="module")
def traces(lens_traces):
    return {fam: trace for fam, (_, trace) in lens_traces.items()}


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


def test_image_attention_selects_and_reduces_step_by_step(traces):
    trace = traces["llava_next"]
    pos = trace.vision_span.positions
    full = torch.stack([s.attention[..., pos].float() for s in trace.steps])  # [S, L, H, n] by hand
    assert torch.equal(g.image_attention(trace), full)
    torch.testing.assert_close(g.image_attention(trace, [1], reduce="mean"), full[:, 1:2].mean(2))
    torch.testing.assert_close(g.image_attention(trace, reduce="max"), full.amax(2))
    torch.testing.assert_close(g.image_attention(trace, [-1], steps=[2], heads=[1]), full[2:3, -1:, 1:2])
    with pytest.raises(ValueError, match="reduce"):
        g.image_attention(trace, reduce="sum")


def _first_key_heavy(trace):
    """A copy of ``trace`` whose layer-0 heads put 0.9 of their attention on key 0 (``<s>``)."""
    import copy
    import dataclasses

    steps = []
    for step in trace.steps:
        att = step.attention.clone()
        att[0] *= 0.1 / (att[0].sum(-1, keepdim=True) - att[0, :, :1])
        att[0, :, 0] = 0.9
        steps.append(dataclasses.replace(step, attention=att))
    out = copy.copy(trace)
    out.steps = steps
    return out


def test_vlm_visualizer_and_rollout_match_hand(traces):
    trace = _first_key_heavy(traces["llava"])  # the first-token step then changes the layer weights
    rows, cols = trace.vision_span.grids[0]
    vit = trace.prefill["vision_encoder.encoder_layers.0.attn.hook_pattern"].float()  # only layer 0 feeds (-2)
    assert trace.info.vit_layers_used == [0]
    # VLM-Visualizer: per-patch ViT map (CLS dropped, rows renormalised) weighted by LLM attention
    v = vit.mean(0)[1:, 1:]
    v = v / v.sum(-1, keepdim=True)
    pos = [int(p) for p in trace.vision_span.positions]
    for s in (0, 2):
        step = trace.steps[s]
        kept = torch.stack([step.attention[:, :, p].mean() for p in pos])  # llava-lens < 2.0: key 0 kept
        per_layer = []  # the original: per layer, head mean, key 0 zeroed, row renormalised
        for layer in range(trace.info.n_layers):
            row = step.attention[layer].float().mean(0).clone()
            row[0] = 0
            per_layer.append(row / row.sum())
        dropped = torch.stack(per_layer).mean(0)[pos]
        for drop, w in ((True, dropped), (False, kept)):
            w = w / w.sum()
            hand = sum(w[k] * v[k].reshape(rows, cols) for k in range(len(w)))
            got = g.vlm_visualizer_map(trace, drop_first_token=drop)
            assert got.shape == (len(trace.steps), rows, cols)
            torch.testing.assert_close(got[s], hand / hand.max(), atol=1e-5, rtol=1e-4)
    assert (g.vlm_visualizer_map(trace) - g.MAPS["vlm_visualizer_keep_first"](trace)).abs().max() > 1e-3
    # rollout over one layer: 0.5 A + 0.5 I, CLS row, patches normalised
    a = 0.5 * vit.mean(0) + 0.5 * torch.eye(vit.shape[-1])
    a = a / a.sum(-1, keepdim=True)
    torch.testing.assert_close(g.vit_rollout(trace), (a[0, 1:] / a[0, 1:].sum()).reshape(rows, cols))
    assert g.vit_rollout_map(trace).shape == (len(trace.steps), rows, cols)
    for name, fn in g.MAPS.items():
        assert fn(trace).shape == (len(trace.steps), rows, cols), name


def _tam_reference_filter(img, kernel_size=3):
    """TAM's ``rank_guassian_filter`` (xmed-lab/TAM, tam.py), copied as the reference."""
    filtered_img = np.zeros_like(img)
    pad_width = kernel_size // 2
    padded_img = np.pad(img, pad_width, mode="reflect")
    ax = np.array(range(kernel_size ** 2)) - kernel_size ** 2 // 2
    for i in range(pad_width, img.shape[0] + pad_width):
        for j in range(pad_width, img.shape[1] + pad_width):
            window = padded_img[i - pad_width:i + pad_width + 1, j - pad_width:j + pad_width + 1]
            sorted_window = np.sort(window.flatten())
            mean = sorted_window.mean()
            if mean > 0:
                sigma = sorted_window.std() / mean
                kernel = np.exp(-(ax ** 2) / (2 * sigma ** 2))
                value = (sorted_window * kernel / np.sum(kernel)).sum()
            else:
                value = 0
            filtered_img[i - pad_width, j - pad_width] = value
    return filtered_img


def _tam_by_hand(lens, trace, s):
    """TAM of step ``s`` from HF's logits over the whole sequence (one no-cache forward)."""
    inputs, _ = lens.prepare(trace.image, trace.question)
    ids = torch.cat([inputs.input_ids, torch.tensor([trace.token_ids[:-1]])], 1)
    with torch.no_grad():
        logits = lens.hf_model(input_ids=ids, pixel_values=inputs.pixel_values).logits[0].double().numpy()
    n_prompt = inputs.input_ids.shape[1]
    span = trace.vision_span
    image_pos = span.positions.numpy()
    question_pos = list(range(int(image_pos.max()) + 1, n_prompt - 1))
    query_pos = [n_prompt - 1] + [n_prompt + k for k in range(s)]  # positions that generated tokens 0..s
    cls = trace.token_ids[s]
    relu = lambda x: np.maximum(x, 0)  # noqa: E731
    img = relu(logits[image_pos, cls])
    txt = relu(logits[question_pos + query_pos, cls])
    context = inputs.input_ids[0, question_pos].tolist() + trace.token_ids[:s]
    keep = [i for i, c in enumerate(context) if c != cls]
    if keep:
        w = txt[keep] / (txt[keep].sum() + 1e-8)
        interference = sum(w[j] * relu(logits[image_pos, context[i]]) for j, i in enumerate(keep))
        alpha = np.linalg.lstsq(interference[:, None], img, rcond=None)[0][0]
        img = relu(img - alpha * interference)
    both = np.concatenate([img, txt[:-1]])
    img = (img - both.min()) / (both.max() - both.min())
    grid = span.to_grid(torch.tensor(img)).numpy()
    return _tam_reference_filter(grid)


def test_tam_matches_a_hand_computation(lens_traces):
    from llava_lens.analysis.tam import tam_map

    lens, trace = lens_traces["llava"]
    maps = tam_map(lens, trace)
    rows, cols = trace.vision_span.grids[0]
    assert maps.shape == (len(trace.steps), rows, cols)
    for s in range(len(trace.steps)):
        np.testing.assert_allclose(maps[s].numpy(), _tam_by_hand(lens, trace, s), atol=1e-4)
    raw = tam_map(lens, trace, use_eci=False, rank_filter=False)
    assert raw.min() >= 0 and raw.max() <= 1 and not torch.allclose(raw, maps)


def test_tam_on_next_and_without_prefill(lens_traces):
    from llava_lens.analysis.tam import TamError, tam_map

    lens, trace = lens_traces["llava_next"]
    (r0, c0), (r1, c1) = trace.vision_span.grids
    assert tam_map(lens, trace).shape == (len(trace.steps), r0, c0)
    assert tam_map(lens, trace, tile=1).shape == (len(trace.steps), r1, c1)
    bare = lens.trace(trace.image, trace.question, max_new_tokens=1)
    with pytest.raises(TamError, match=r"prefill_cache=\[.blocks.1.hook_resid_post.\]"):
        tam_map(lens, bare)


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


def test_cli_heads_and_eval_grounding_on_the_embedded_model(tmp_path, capsys):
    """`heads` writes a selection that `eval-grounding --heads` reuses; the table has every requested row."""
    from llava_lens import cli
    from llava_lens.analysis.evaluation import EvalOptions

    assert (cli.EVAL_SEED, cli.CALIBRATION_SEED) == (EvalOptions.seed, EvalOptions.calibration_seed)
    path = tmp_path / "heads.json"
    assert cli.main(["heads", "--calibration", "3", "--step", "answer", "--top-k", "1", "--no-progress",
                     "--out", str(path)]) == 0
    assert capsys.readouterr().out.startswith("L") and path.is_file()
    methods = "llm_mean,vlm_visualizer,vlm_visualizer_keep_first,localization_heads,tam,random"
    assert cli.main(["eval-grounding", "--scenes", "2", "--calibration", "0", "--heads", str(path), "--methods",
                     methods, "--no-deletion", "--no-progress", "--qtypes", "color,shape"]) == 0
    out = capsys.readouterr().out
    for method in methods.split(","):
        assert f"| {method} |" in out
    assert "pointing color" in out and "Func-IoU" in out and "localization_heads = L" in out
    assert cli.main(["eval-grounding", "--scenes", "10", "--calibration", "5", "--calibration-seed",
                     str(cli.EVAL_SEED + 9)]) == 2
    assert "overlap" in capsys.readouterr().err
