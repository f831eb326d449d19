"""The report's image heatmap, computed in the page from stored rows: :func:`map_section`.

Methods: LLM attention (mean over heads, any layer range), LLM max over heads, VLM-Visualizer and
ViT rollout (when the trace holds the ViT attention they need; else the page says why not), and one
head of a layer shown in the attention section (from that layer's per-head rows, base grid).

Stored per method: ``[S, L', rows*cols]`` bytes (each ``(step, layer)`` row scaled to its max,
the maxima beside it), ``L'`` = every LM layer for ``llm_mean`` (the page averages the layer range
picked) and 1 for the precomputed maps. Bytes: ``S L n`` for ``llm_mean``, so a NeXT trace whose
high-resolution grid would not fit ``MAP_BYTES`` falls back to the base grid (the page says so).
"""

from __future__ import annotations

import html
from collections.abc import Callable

import torch

from llava_lens import grounding
from llava_lens.trace import Trace
from llava_lens.views.html import json_block, u8_base64
from llava_lens.views.plots import HEAT_ALPHA
from llava_lens.views.scripts import MAP_JS

MAP_BYTES = 2_500_000
"""Raw bytes the per-layer ``llm_mean`` rows may take before a coarser grid / fewer layers is used."""


def _region(trace: Trace, tile: int) -> list[float]:
    """(top, left, bottom, right) of grid ``tile`` as fractions of the image."""
    span = trace.vision_span
    boxes = span.boxes[span.tile == tile]
    return [float(boxes[:, 0].min()), float(boxes[:, 1].min()), float(boxes[:, 2].max()), float(boxes[:, 3].max())]


def _pack(values: torch.Tensor, trace: Trace, tile: int, label: str, unit: str) -> dict:
    """``values [S, L', rows, cols]`` as a method entry of the page's map data."""
    rows, cols = trace.vision_span.grids[tile]
    flat = values.float().flatten(2)
    top = flat.amax(-1)
    scaled = flat / top.clamp_min(1e-12)[..., None]
    return {"label": label, "unit": unit, "rows": rows, "cols": cols, "region": _region(trace, tile),
            "layers": flat.shape[1], "data": u8_base64(scaled),
            "scale": [float(f"{v:.4g}") for v in top.flatten().tolist()]}


def llm_rows(trace: Trace, tile: int) -> torch.Tensor:
    """``[S, L, rows, cols]``: each step's attention on grid ``tile``, mean over heads, per layer."""
    return trace.vision_span.to_grid(grounding.image_attention(trace, reduce="mean"), tile)


def _llm_mean(trace: Trace) -> tuple[dict, str]:
    span, steps, n_layers = trace.vision_span, len(trace), trace.info.n_layers
    tile = len(span.grids) - 1
    cells = lambda t: span.grids[t][0] * span.grids[t][1]  # noqa: E731
    note = ""
    if tile and steps * n_layers * cells(tile) > MAP_BYTES:
        tile, note = 0, "the base grid (the high-resolution grid's rows would not fit the size budget)"
    rows = llm_rows(trace, tile)
    if steps * n_layers * cells(tile) > MAP_BYTES:
        rows, note = rows.mean(1, keepdim=True), "all layers averaged (per-layer rows would not fit the size budget)"
    label = "LLM attention, mean over heads" + (", layers picked" if rows.shape[1] > 1 else ", all layers")
    return _pack(rows, trace, tile, label, "attention, mean over heads and layers"), note


def _extras() -> dict[str, tuple[str, str, Callable[[Trace], torch.Tensor]]]:
    return {
        "llm_max": ("LLM attention, max over heads, mean over layers", "attention",
                    lambda t: grounding.attention_map_max(t, tile=len(t.vision_span.grids) - 1)),
        "vlm_visualizer": ("VLM-Visualizer (LLM × ViT attention)", "relative", grounding.vlm_visualizer_map),
        "vit_rollout": ("ViT attention rollout (ignores the question)", "relative", grounding.vit_rollout_map),
    }


def map_data(trace: Trace) -> tuple[dict, list[str]]:
    """The page's map data (methods by name) and notes on what is not available."""
    main, note = _llm_mean(trace)
    methods, notes = {"llm_mean": main}, [f"LLM mean map on {note}"] if note else []
    for name, (label, unit, fn) in _extras().items():
        try:
            grid = fn(trace)
        except (ValueError, KeyError, IndexError, RuntimeError) as err:
            notes.append(f"{name} not available: {err}")
            continue
        tile = 0 if grid.shape[-2:] == tuple(trace.vision_span.grids[0]) else len(trace.vision_span.grids) - 1
        methods[name] = _pack(grid[:, None], trace, tile, label, unit)
    rows, cols = trace.vision_span.grids[0]
    base = {"rows": rows, "cols": cols, "region": _region(trace, 0), "unit": "attention of one head"}
    return {"methods": methods, "base": base, "alpha": HEAT_ALPHA}, notes


def map_section(trace: Trace) -> str:
    """Heatmap viewer: token, method and layer range pickers over a canvas of the image."""
    if not trace.steps:
        return '<section id="heatmaps"><h3>Where each generated token looked</h3><p>No generated token.</p></section>\n'
    data, notes = map_data(trace)
    methods = "".join(f'<option value="{k}">{html.escape(m["label"])}</option>' for k, m in data["methods"].items())
    methods += '<option value="head">one head (of layer "layers from"; base grid; layers shown below only)</option>'
    heads = "".join(f'<option value="{h}">H{h}</option>' for h in range(trace.info.n_heads))
    layers = "".join(f'<option value="{i}">{i}</option>' for i in range(trace.info.n_layers))
    last = trace.info.n_layers - 1
    layers_to = layers.replace(f'value="{last}"', f'value="{last}" selected')
    missing = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (f'<section id="heatmaps"><h3>Where each generated token looked</h3>'
            f'<label>map <select id="map-method">{methods}</select></label> '
            f'<label>layers <select id="layer-from">{layers}</select></label>'
            f'<label> to <select id="layer-to">{layers_to}</select></label> '
            f'<label>head <select id="map-head" disabled>{heads}</select></label><br>'
            f'<canvas id="heatmap-canvas" width="448" height="448"></canvas><br>'
            f'<span class="colorbar"></span> <span id="map-legend" class="note"></span>'
            f'<p class="note">Each map is scaled to its own max (colour bar: 0 … max); attention rows '
            f'were stored per step and layer, each scaled to its max and rounded to 1/255.</p>'
            f'{f"<ul class=missing>{missing}</ul>" if missing else ""}'
            f'<script type="application/json" id="map-data">{json_block(data)}</script>'
            f"<script>{MAP_JS}</script></section>\n")
