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
from llava_lens.analysis.scoring import auc, deletion_insertion, masked_images, patch_chance, patch_order


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
    from llava_lens.analysis.scoring import answer_probs

    image = np.asarray(prefill_trace.image)
    rows, cols = prefill_trace.vision_span.grids[0]
    di = deletion_insertion(lens, image, prefill_trace.question, prefill_trace.vision_span,
                            torch.rand(rows, cols), [], prefill_trace.token_ids[0], (0.0, 1.0))
    full = answer_probs(lens, [image], prefill_trace.question, [], prefill_trace.token_ids[0])
    assert di.deletion[0] == pytest.approx(float(full[0]), rel=1e-4)  # nothing deleted = original
    assert di.insertion[1] == pytest.approx(float(full[0]), rel=1e-4)  # everything inserted = original
    assert di.deletion[1] == pytest.approx(float(di.insertion[0]), rel=1e-4)  # both = blank canvas
