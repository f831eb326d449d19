"""Analyses: hand-checkable grounding scores, sinks, knockout, contrastive maps, entropy."""

import math

import numpy as np
import pytest
import torch

from llava_lens.analysis import (
    contrastive_map,
    energy_in_mask,
    exclude_sinks,
    find_sinks,
    head_focus,
    image_attention_entropy,
    knockout_prob,
    pointing_hit,
    row_entropy,
)
from llava_lens.analysis.contrastive import contrastive_maps
from llava_lens.analysis.knockout import knockout_windows
from llava_lens.analysis.metrics import auc, patch_chance
from llava_lens.analysis.rescoring import deletion_insertion, masked_images, patch_order


def test_pointing_and_energy_hand_checked():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    heat = torch.zeros(4, 4)
    heat[0, 0], heat[3, 3] = 3.0, 1.0
    assert pointing_hit(heat, mask)
    assert energy_in_mask(heat, mask) == pytest.approx(0.75)
    heat[3, 3] = 5.0
    assert not pointing_hit(heat, mask)
    assert energy_in_mask(heat, mask) == pytest.approx(3 / 8)
    assert not pointing_hit(torch.ones(4, 4), mask)  # a flat map points nowhere
    assert energy_in_mask(torch.ones(4, 4), mask) == pytest.approx(1 / 16)  # = mask area: chance
    assert energy_in_mask(-torch.ones(4, 4), mask) == 0.0


def test_auc_and_patch_order():
    assert auc([1, 1, 1], [0, 0.5, 1]) == pytest.approx(1.0)
    assert auc([1, 0], [0, 1]) == pytest.approx(0.5)
    assert patch_order(torch.tensor([[0.1, 0.9], [0.5, 0.2]])).tolist() == [1, 2, 3, 0]


def test_masked_images_and_patch_chance(prefill_trace):
    span = prefill_trace.vision_span
    rows, cols = span.grids[0]
    h, w = span.image_size
    image = np.full((h, w, 3), 10, np.uint8)
    order = torch.arange(rows * cols)
    deletion, insertion = masked_images(image, span, order, (0.0, 1.0))
    assert (deletion[0] == image).all() and (insertion[1] == image).all()
    mask = np.zeros((h, w), bool)
    mask[0, 0] = True
    assert patch_chance(span, mask) == pytest.approx(1 / (rows * cols))


def _trace_with_planted_sink(trace, index: int, scale: float = 50.0):
    import dataclasses

    pos = int(trace.vision_span.positions[index])
    norms = trace.summary.resid_norms.clone()
    norms[1:, pos] *= scale
    trace.__dict__["summary"] = dataclasses.replace(trace.summary, resid_norms=norms)
    return trace


def test_sinks_detects_a_planted_massive_token(prefill_trace):
    import copy

    clean = find_sinks(prefill_trace, k=3.0)
    planted = find_sinks(_trace_with_planted_sink(copy.copy(prefill_trace), 5), k=3.0)
    assert 5 in planted.indices and 5 not in clean.indices
    assert len(planted.indices) == len(clean.indices) + 1


def test_exclude_sinks_zeroes_and_renormalises(prefill_trace):
    import copy

    trace = _trace_with_planted_sink(copy.copy(prefill_trace), 0)
    sinks = find_sinks(trace)
    rows, cols = trace.vision_span.grids[0]
    grid = torch.rand(rows, cols) + 0.1
    out = exclude_sinks(grid, trace, sinks)
    r, c = int(trace.vision_span.row[0]), int(trace.vision_span.col[0])
    assert out[r, c] == 0
    assert out.sum() == pytest.approx(float(grid.sum()), rel=1e-5)


def test_entropy_of_uniform_row_is_log_n():
    assert row_entropy(torch.ones(7)) == pytest.approx(math.log(7))
    assert row_entropy(torch.tensor([0.0, 1.0, 0.0])) == pytest.approx(0.0)


def test_image_attention_entropy_shape_and_range(prefill_trace):
    ent = image_attention_entropy(prefill_trace, normalized=True)
    assert ent.shape == (len(prefill_trace.steps), prefill_trace.info.n_layers)
    assert (ent >= 0).all() and (ent <= 1 + 1e-5).all()


def test_contrastive_map_is_the_difference():
    a, b = torch.rand(3, 3), torch.rand(3, 3)
    assert torch.allclose(contrastive_map(a, b, normalize=False), a - b)
    assert torch.allclose(contrastive_map(a, b), a / a.sum() - b / b.sum())
    assert contrastive_map(a, a).abs().max() < 1e-6


def test_contrastive_maps_on_model(lens, prefill_trace):
    maps = contrastive_maps(lens, prefill_trace, 0)
    assert torch.allclose(maps.difference, maps.task / maps.task.sum() - maps.generic / maps.generic.sum())


def test_knockout_all_layers_changes_output_and_none_changes_nothing(lens, image):
    question, prefix, target = "what color is the circle ?", [], 5
    base = knockout_prob(lens, image, question, prefix, target, [])
    everything = knockout_prob(lens, image, question, prefix, target, range(lens.n_layers))
    inputs, _ = lens.prepare(image, question)
    with torch.no_grad():
        hf = lens.hf_model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values).logits[0, -1].softmax(-1)
    assert base == pytest.approx(float(hf[target]), rel=1e-4)  # no window = the plain model
    assert abs(everything - base) > 1e-4
    result = knockout_windows(lens, image, question, prefix, target)
    assert len(result.windows) == lens.n_layers and result.baseline == pytest.approx(base)


def test_plots_return_figures(lens, prefill_trace, tmp_path, image):
    from matplotlib.figure import Figure

    from llava_lens.views.analysis_plots import plot_entropy, plot_head_focus, plot_knockout, plot_sinks
    from llava_lens.views.plots import save_figure

    focus = head_focus(lens, prefill_trace, 1)
    assert focus.image_share.shape == focus.blank_change.shape == (lens.n_layers, lens.n_heads)
    result = knockout_windows(lens, image, "what color is the circle ?", [], 5)
    figs = [plot_head_focus(focus), plot_knockout(result, title="tab\there"), plot_sinks(find_sinks(prefill_trace)),
            plot_entropy(image_attention_entropy(prefill_trace), ["a\tb", "<id:32010>", "x"])]
    assert all(isinstance(f, Figure) for f in figs)
    assert len(figs[0].axes) == 4 and len(figs[2].axes) == 2  # every heatmap panel has its colour bar
    paths = [p for i, f in enumerate(figs) for p in save_figure(f, tmp_path / f"fig{i}.png")]
    assert all(p.stat().st_size > 0 for p in paths)


def test_analysis_never_imports_views():
    import ast
    from pathlib import Path

    import llava_lens

    root = Path(llava_lens.__file__).parent
    files = [*(root / "analysis").glob("*.py"), root / "lens.py", root / "grounding.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("llava_lens.views") for n in names), f"{path.name} imports {names}"


def test_deletion_insertion_endpoints(lens, prefill_trace):
    from llava_lens.analysis.rescoring import answer_probs

    image = np.asarray(prefill_trace.image)
    rows, cols = prefill_trace.vision_span.grids[0]
    di = deletion_insertion(lens, image, prefill_trace.question, prefill_trace.vision_span,
                            torch.rand(rows, cols), [], prefill_trace.token_ids[0], (0.0, 1.0))
    full = answer_probs(lens, [image], prefill_trace.question, [], prefill_trace.token_ids[0])
    assert di.deletion[0] == pytest.approx(float(full[0]), rel=1e-4)  # nothing deleted = original
    assert di.insertion[1] == pytest.approx(float(full[0]), rel=1e-4)  # everything inserted = original
    assert di.deletion[1] == pytest.approx(float(di.insertion[0]), rel=1e-4)  # both = blank canvas


# ------------------------------------------------ TAM metrics, localization heads, evaluation options


def test_otsu_obj_iou_func_iou_against_hand_masks():
    from llava_lens.analysis.metrics import func_iou, iou_f1, obj_iou, otsu_threshold

    heat = torch.zeros(4, 4)
    heat[:2, :2] = 1.0  # a bimodal map: Otsu separates 0 from 1
    heat[3, 3] = 0.2
    assert 0 <= otsu_threshold(heat) < 1.0 and otsu_threshold(heat) >= 0.2
    mask = np.zeros((4, 4), bool)
    mask[:2, :3] = True  # 6 pixels; prediction = the 4 pixels of value 1, all inside
    assert obj_iou(heat, mask) == pytest.approx(4 / 6)
    mask[:, :] = False
    mask[2:, 2:] = True  # disjoint from the prediction
    assert obj_iou(heat, mask) == 0.0
    assert obj_iou(torch.ones(4, 4), mask) == 0.0  # a flat map predicts nothing
    # Func-IoU: share of a function word's pixels below the content map's threshold (1/3 here)
    # levels 0, 51, 255: {0} | {51, 255} has between-class variance 5202, {0, 51} | {255} 11704
    content = torch.tensor([[0.0, 0.2, 1.0]])
    assert otsu_threshold(content) == pytest.approx(0.2)
    function = torch.tensor([[0.0, 0.1, 1.0]])  # 2 of 3 pixels below 0.2
    assert func_iou([function], [content]) == pytest.approx(2 / 3)
    assert func_iou([function, torch.zeros(1, 3)], [content]) == pytest.approx((2 / 3 + 1.0) / 2)
    assert math.isnan(func_iou([], [content]))
    assert iou_f1(0.5, 1.0) == pytest.approx(2 / 3) and iou_f1(0, 0) == 0


def test_otsu_matches_a_brute_force_search():
    from llava_lens.analysis.metrics import otsu_threshold

    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0.2, 0.05, 50), rng.normal(0.7, 0.1, 30)]).clip(0, 1)
    levels = np.round((values - values.min()) / (values.max() - values.min()) * 255)
    best, best_t = -1.0, 0
    for t in range(255):  # between-class variance of {<= t} vs {> t}, by brute force
        lo, hi = levels[levels <= t], levels[levels > t]
        if len(lo) and len(hi):
            var = len(lo) * len(hi) / len(levels) ** 2 * (lo.mean() - hi.mean()) ** 2
            if var > best:
                best, best_t = var, t
    assert otsu_threshold(torch.tensor(values)) == pytest.approx(best_t / 255)


def test_components_and_spatial_entropy_by_hand():
    from llava_lens.analysis.localization import connected_components, elbow_index, spatial_entropy

    fg = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    labels = connected_components(fg)  # diagonal neighbours join (8-connectivity)
    assert labels.tolist() == [[1, 0, 0, 2], [0, 1, 0, 2], [0, 0, 0, 0], [3, 3, 0, 0]]
    grid = torch.zeros(4, 4)
    grid[0, 0] = 1.0
    assert spatial_entropy(grid) == pytest.approx(0.0)  # one blob
    grid[3, 3] = 1.0
    assert spatial_entropy(grid) == pytest.approx(math.log(2))  # two equal blobs
    grid[3, 3] = 3.0  # excess over the mean 0.25: 0.75 and 2.75
    p = torch.tensor([0.75, 2.75]) / 3.5
    assert spatial_entropy(grid) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    assert spatial_entropy(torch.ones(4, 4)) == math.inf
    assert elbow_index([10, 9, 2, 1.5, 1, 0.5]) == 2


def _planted_traces(trace, n, planted, rng):
    """``n`` copies of ``trace`` with made-up step-0 attention; head ``planted`` looks at one patch.

    Every other head splits its image attention between two patches of the first and last grid
    rows (two components: spatial entropy log 2) and puts a random share on text.
    """
    import copy
    import dataclasses

    span = trace.vision_span
    pos = span.positions
    rows, cols = span.grids[0]
    first = (span.row == 0).nonzero().flatten()
    last = (span.row == rows - 1).nonzero().flatten()
    out = []
    for _ in range(n):
        att = torch.rand(trace.steps[0].attention.shape, generator=rng)
        att[..., pos] = 0.0
        a = int(first[torch.randint(len(first), (1,), generator=rng)])
        b = int(last[torch.randint(len(last), (1,), generator=rng)])
        att[..., pos[a]] = att[..., pos[b]] = 2.0 * torch.rand(att.shape[:2], generator=rng)
        target = int(torch.randint(len(pos), (1,), generator=rng))
        la, h = planted
        att[la, h] = 0.001
        att[la, h, pos[target]] = 1.0
        att = att / att.sum(-1, keepdim=True)
        t = copy.copy(trace)
        t.steps = [dataclasses.replace(trace.steps[0], attention=att)] + trace.steps[1:]
        out.append(t)
    return out


def test_head_selection_recovers_a_planted_head(prefill_trace, tmp_path):
    from llava_lens.analysis.localization import (
        HeadSelection,
        LocalizationHeads,
        localization_heads_map,
        select_localization_heads,
    )

    rng = torch.Generator().manual_seed(0)
    n_layers = prefill_trace.info.n_layers
    planted = (n_layers - 1, 2)
    traces = _planted_traces(prefill_trace, 12, planted, rng)
    sel = select_localization_heads(traces, HeadSelection(skip_layers=n_layers - 1, top_k=1, votes_per_sample=1))
    assert sel.heads == [planted]
    assert planted in sel.candidates and sel.votes[planted[0]][planted[1]] == 12
    assert all(v == 0 for la, row in enumerate(sel.votes) for h, v in enumerate(row) if (la, h) != planted)
    both = select_localization_heads(traces, HeadSelection(skip_layers=0, top_k=2))
    assert both.heads[0] == planted  # also among every layer's heads
    path = sel.save(tmp_path / "heads.json")
    again = LocalizationHeads.load(path)
    assert again.heads == sel.heads and again.options == sel.options and again.votes == sel.votes
    # the map of one head without smoothing is its attention on the grid
    grid = localization_heads_map(traces[0], [planted], sigma=0)[0]
    want = traces[0].vision_span.to_grid(traces[0].steps[0].attention[planted][traces[0].vision_span.positions])
    torch.testing.assert_close(grid, want)


def test_bad_calibration_and_overlapping_splits_are_one_line_errors(lens, tmp_path):
    from llava_lens.analysis.evaluation import EvalOptions, EvaluationError, _check
    from llava_lens.analysis.localization import HeadSelectionError, LocalizationHeads, select_localization_heads
    from llava_lens.errors import LlavaLensError

    with pytest.raises(HeadSelectionError, match="empty"):
        select_localization_heads([])
    with pytest.raises(EvaluationError, match="overlap"):
        _check(EvalOptions(scenes=100, seed=0, calibration=50, calibration_seed=90))
    _check(EvalOptions(scenes=100, seed=0, calibration=50, calibration_seed=100))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LlavaLensError, match="cannot read"):
        LocalizationHeads.load(tmp_path / "bad.json")


def test_emergence_is_the_start_of_the_last_top1_run():
    from llava_lens.analysis.emergence import emergence_layers

    ranks = torch.tensor([[0, 3, 1], [2, 0, 0], [0, 0, 4], [0, 0, 0]])  # [L=4, S=3]
    assert emergence_layers(ranks) == [2, 1, 3]
    assert emergence_layers(torch.tensor([[0], [1]])) == [-1]


@pytest.mark.parametrize("which", ["lens", "next_lens"])
def test_token_probs_match_one_hf_forward_per_image(which, request, image):
    from llava_lens.analysis.rescoring import token_probs

    lens = request.getfixturevalue(which)
    other = image[::-1].copy()
    question, tokens = "what color is the circle ?", [5, 9, 11]
    got = token_probs(lens, [image, other], question, tokens)
    for i, im in enumerate([image, other]):
        inputs, _ = lens.prepare(im, question)
        ids = torch.cat([inputs.input_ids, torch.tensor([tokens[:-1]])], 1)
        with torch.no_grad():
            logits = lens.hf_model(input_ids=ids, pixel_values=inputs.pixel_values, **inputs.extra).logits[0]
        want = logits[inputs.input_ids.shape[1] - 1:].softmax(-1)[torch.arange(3), tokens]
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-6)
