r"""Per-layer attention HTML with circuitsvis, openable offline, sized for 576-2,900 image tokens.

Every sequence position is shown, none silently cropped: text tokens one by one, and image
features grouped per grid row (per few rows on large grids), a group's attention being the sum
over its keys and the mean over its query rows. ``window=(start, end)`` shows positions
``start..end-1`` individually (image rows still grouped unless ``group_image=False``) and folds the
positions before/after it into one group each; the page says what is shown. Each layer also gets
one image-attention map per head on the patch grid, for the generated step picked on the page.

Data travel compactly (attention quantised to 1/255, ``uint8`` base64, lower triangle) and the
circuitsvis widgets are built in the browser the first time a layer is shown (a widget built
inside a hidden tab would measure 0x0). The circuitsvis bundle ships inside the Python package
(``circuitsvis/dist/cdn/iife.js``): written once beside the pages (``circuitsvis.js``) or inlined
(``inline=True``). No page references a URL. Labels are escaped (control characters as ``\t``...,
then HTML, since circuitsvis renders labels as HTML) and JSON blocks escape ``<``, ``>``, ``&``.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import circuitsvis
import torch

from llava_lens import hooks
from llava_lens.errors import LlavaLensError
from llava_lens.trace import Trace
from llava_lens.views.plots import escape_control
from llava_lens.views.scripts import ATTENTION_JS, STYLE, colormap_json

JS_NAME = "circuitsvis.js"
MAX_IMAGE_GROUPS = 32
"""Image groups per grid at most: rows are merged k at a time above this (a 48-row NeXT grid: 2)."""
MAX_SHOWN = 400
"""Rows/columns an attention view may have (its data grow with their square): more is an error."""


def circuitsvis_js() -> str:
    """The circuitsvis browser bundle shipped in the installed package, safe to inline."""
    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return path.read_text(encoding="utf-8").replace("</script", "<\\/script")


def label(text: str) -> str:
    """A token made safe for circuitsvis (which renders labels as HTML): escapes, then HTML-escaped."""
    return html.escape(escape_control(text))


def json_block(data: object) -> str:
    """JSON safe inside a ``<script>`` element (``<``, ``>``, ``&`` as unicode escapes)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def u8_base64(values: torch.Tensor) -> str:
    """Values in [0, 1], flattened, quantised to ``round(255 v)`` bytes, base64."""
    data = (values.float().clamp(0, 1) * 255).round().to(torch.uint8).flatten().numpy()
    return base64.b64encode(data.tobytes()).decode("ascii")


def position_labels(trace: Trace) -> list[str]:
    """A label per sequence position (prompt, then generated): image features compactly.

    ``▣r3c5`` for a LLaVA-1.5 patch, ``▣t1r3c5`` for a LLaVA-NeXT patch of tile ``t``, ``⏎`` for a
    NeXT row-end newline feature, ``▣cls`` for a kept CLS feature.
    """
    labels = list(trace.all_tokens)
    span = trace.vision_span
    multi = len(span.grids) > 1
    for i, pos in enumerate(span.positions.tolist()):
        t, r, c = int(span.tile[i]), int(span.row[i]), int(span.col[i])
        if t < 0:
            labels[pos] = "⏎" if multi else "▣cls"
        else:
            labels[pos] = f"▣t{t}r{r}c{c}" if multi else f"▣r{r}c{c}"
    return labels


def n_positions(trace: Trace) -> int:
    """Query positions of a trace: the prompt, then every generated token but the last."""
    return len(trace.prompt_ids) + max(len(trace.steps) - 1, 0)


def prompt_rows(trace: Trace, layer: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(rows [H, q, P], query positions [q])`` of ``layer``'s prompt attention, or ``(None, None)``.

    From a raw ``blocks.L.attn.hook_pattern`` prefill capture (every prompt query), else from the
    prefill summary (text queries only, for the layers it kept).
    """
    pre = trace.prefill.get(hooks.attn_pattern(layer))
    if pre is not None:
        return pre, torch.arange(pre.shape[1])
    summary = getattr(trace, "summary", None)
    rows = summary.rows(layer) if summary is not None else None
    return (rows, summary.text_positions) if rows is not None else (None, None)


def attention_matrix(trace: Trace, layer: int) -> torch.Tensor:
    """``[H, T, T]`` attention of ``layer`` over positions ``T = prompt_len + n_steps - 1``.

    Prompt rows come from :func:`prompt_rows` (rows not captured are zeros); the rows of the
    positions that produced each generated token from ``Step.attention`` (future keys are 0).
    Memory ``H T^2``: for small traces; the views use :func:`grouped_attention`.
    """
    prompt_len, n_t = len(trace.prompt_ids), n_positions(trace)
    mat = torch.zeros(trace.info.n_heads, n_t, n_t)
    rows, queries = prompt_rows(trace, layer)
    if rows is not None:
        mat[:, queries, :prompt_len] = rows.float()
    for step in trace.steps:
        row = step.attention[layer].float()  # [H, keys]
        mat[:, step.position, : row.shape[-1]] = row
    return mat


@dataclass
class PositionGroups:
    """How sequence positions are shown: ``group[p]`` is the column/row showing position ``p``."""

    group: torch.Tensor
    """``[T]`` long: group index of every position."""
    labels: list[str]
    """Raw (unescaped) label of each group."""
    note: str
    """What is shown, in words (goes on the page)."""
    sizes: list[int] = field(default_factory=list)
    """Positions per group."""


def _image_group_keys(trace: Trace) -> dict[int, tuple[str, tuple]]:
    """Position -> (label, key) of its image-row group; newline/CLS features join the row before them."""
    span = trace.vision_span
    multi = len(span.grids) > 1
    out: dict[int, tuple[str, tuple]] = {}
    last = None
    for i, pos in enumerate(span.positions.tolist()):
        t, r = int(span.tile[i]), int(span.row[i])
        if t < 0:
            out[pos] = last or ("▣cls", ("cls", pos))
            continue
        k = math.ceil(span.grids[t][0] / MAX_IMAGE_GROUPS)
        lo, hi = (r // k) * k, min((r // k) * k + k, span.grids[t][0]) - 1
        rows = f"r{lo}" if k == 1 else f"r{lo}-{hi}"
        last = out[pos] = (f"▣t{t}{rows}" if multi else f"▣{rows}", (t, lo))
    return out


def group_positions(trace: Trace, window: Optional[tuple[int, int]] = None,
                    group_image: bool = True) -> PositionGroups:
    """Groups for the attention views: text one per position, image features per grid row(s).

    ``window=(start, end)`` keeps positions ``start..end-1`` as above and folds those before and
    after into one group each; ``group_image=False`` shows every image feature on its own.
    """
    n_t = n_positions(trace)
    start, end = (0, n_t) if window is None else (max(int(window[0]), 0), min(int(window[1]), n_t))
    if start >= end:
        raise LlavaLensError(f"window {window} selects no position (the trace has positions 0-{n_t - 1})")
    raw = position_labels(trace)
    image = _image_group_keys(trace) if group_image else {}
    group, labels, keys = torch.empty(n_t, dtype=torch.long), [], {}
    for p in range(n_t):
        if p < start or p >= end:
            key, text = ("outside", p < start), (f"⋯{0}–{start - 1}" if p < start else f"⋯{end}–{n_t - 1}")
        elif p in image:
            text, key = image[p]
        else:
            key, text = ("pos", p), raw[p]
        if key not in keys:
            keys[key] = len(labels)
            labels.append(text)
        group[p] = keys[key]
    if len(labels) > MAX_SHOWN:
        raise LlavaLensError(f"the attention view would show {len(labels)} rows/columns (at most {MAX_SHOWN}): "
                             "pick a smaller window or keep image features grouped")
    sizes = torch.bincount(group, minlength=len(labels)).tolist()
    n_img = sum(1 for p in image if start <= p < end)
    note = (f"positions {start}–{end - 1} of {n_t} ({'all' if window is None else 'window'}); "
            f"{len(labels)} rows/columns")
    if n_img:
        note += f"; {n_img} image features grouped per grid row (attention summed over a group's keys, " \
                "averaged over its query rows)"
    if window is not None and (start > 0 or end < n_t):
        note += "; positions outside the window folded into one ⋯ group each side"
    return PositionGroups(group, labels, note, sizes)


def grouped_attention(trace: Trace, layer: int, groups: PositionGroups,
                      chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``[H, G, G]`` attention between position groups of ``layer``, and ``[G]`` bool "rows known".

    Keys are summed within a group and query rows averaged over the group's rows that were
    captured (prompt rows: :func:`prompt_rows`; generated rows: ``Step.attention``). The prefill
    is read ``chunk`` query rows at a time, so memory is ``H (chunk T + G^2)``, never ``H T^2``.
    """
    n_heads, n_groups = trace.info.n_heads, len(groups.labels)
    g = groups.group
    out = torch.zeros(n_heads, n_groups, n_groups)
    counts = torch.zeros(n_groups)
    pre, queries = prompt_rows(trace, layer)
    if pre is not None:
        # the step rows are authoritative (step 0's query is also the last prompt row)
        fresh = ~torch.isin(queries, torch.tensor([s.position for s in trace.steps], dtype=torch.long))
        for q0 in range(0, pre.shape[1], chunk):
            keep = fresh[q0:q0 + chunk]
            rows = pre[:, q0:q0 + chunk][:, keep].float()  # [H, c, P]
            q = g[queries[q0:q0 + chunk][keep]]
            keyed = torch.zeros(n_heads, rows.shape[1], n_groups).index_add_(2, g[: rows.shape[2]], rows)
            out.index_add_(1, q, keyed)
            counts.index_add_(0, q, torch.ones(rows.shape[1]))
    for step in trace.steps:
        row = step.attention[layer].float()  # [H, keys]
        keyed = torch.zeros(n_heads, n_groups).index_add_(1, g[: row.shape[-1]], row)
        out[:, g[step.position]] += keyed
        counts[g[step.position]] += 1
    return out / counts.clamp_min(1)[None, :, None], counts > 0


def head_image_maps(trace: Trace, layer: int, tile: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's attention on grid ``tile``'s patches per step, scaled to max 1, and the maxima.

    Returns ``[S, H, rows*cols]`` maps and ``[S, H]`` maxima.
    """
    span = trace.vision_span
    rows = [span.to_grid(s.attention[layer].float()[:, span.positions], tile).flatten(1) for s in trace.steps]
    if not rows:
        cells = span.grids[tile][0] * span.grids[tile][1]
        return torch.zeros(0, trace.info.n_heads, cells), torch.zeros(0, trace.info.n_heads)
    maps = torch.stack(rows)
    top = maps.amax(-1)
    return maps / top.clamp_min(1e-12)[..., None], top


def layer_data(trace: Trace, layer: int, groups: PositionGroups) -> dict:
    """JSON-able data one layer's views are built from in the browser (see module docstring)."""
    att, known = grouped_attention(trace, layer, groups)
    n = att.shape[-1]
    tri = torch.tril_indices(n, n)
    maps, top = head_image_maps(trace, layer)
    rows, cols = trace.vision_span.grids[0]
    missing = [groups.labels[i] for i in (~known).nonzero().flatten().tolist()]
    return {
        # AttentionPatterns renders labels as HTML (escaped here), AttentionHeads as text (raw)
        "layer": layer, "heads": att.shape[0], "tokens": [label(t) for t in groups.labels],
        "raw": [escape_control(t) for t in groups.labels],
        "att": u8_base64(att[:, tri[0], tri[1]]), "grid": [rows, cols],
        "maps": u8_base64(maps), "mapMax": [[float(f"{v:.4g}") for v in r] for r in top.tolist()],
        "missing": len(missing),
    }


def _missing_note(trace: Trace, layer: int) -> str:
    if hooks.attn_pattern(layer) in trace.prefill:
        return ""
    summary = getattr(trace, "summary", None)
    if summary is not None and layer in summary.layers:
        return ("<p class=\"missing\">Prompt rows: the trace's prefill summary keeps the rows of the text queries "
                "only; the rows of image-feature queries are empty (capture "
                f"<code>{hooks.attn_pattern(layer)}</code> raw for them).</p>")
    kept = f" (it keeps layers {summary.layers})" if summary is not None else ""
    return (f"<p class=\"missing\">Prompt rows not available: this trace has no prefill attention for layer "
            f"{layer}{kept}, raw (<code>{hooks.attn_pattern(layer)}</code>) or summarised; only the rows of "
            "the generated tokens are shown, the prompt rows are empty.</p>")


def layer_section(trace: Trace, layer: int, groups: PositionGroups, active: bool = False) -> str:
    """One layer's container: its data block; the browser builds the views when it is first shown."""
    data = json_block(layer_data(trace, layer, groups))
    rows, cols = trace.vision_span.grids[0]
    return (f'<div class="layer-view{" active" if active else ""}" id="layer-{layer}" data-layer="{layer}">'
            f"<h4>Layer {layer}</h4><p class=\"note\">{html.escape(groups.note)}. Values rounded to 1/255.</p>"
            f"{_missing_note(trace, layer)}"
            f"<h5>Image attention per head (grid {rows}×{cols}, step picked above; each head scaled to its "
            "own max, shown under it)</h5><div class=\"head-maps\"></div>"
            '<div class="cv cv-patterns"></div><button class="cv-heads-button">Show every head zoomed '
            "(circuitsvis AttentionHeads; takes seconds with many heads)</button>"
            '<div class="cv cv-heads"></div>'
            f'<script type="application/json" class="layer-data">{data}</script></div>\n')


def step_select(trace: Trace, element_id: str = "step-select") -> str:
    """A ``<select>`` of the generated steps (drives the per-head maps and the report's heatmap)."""
    options = "".join(f'<option value="{i}">{i}: {label(t)}</option>' for i, t in enumerate(trace.tokens))
    return f'<label>generated token <select id="{element_id}">{options}</select></label>'


def attention_section(trace: Trace, layers: Sequence[int], window: Optional[tuple[int, int]] = None,
                      group_image: bool = True, note: str = "") -> str:
    """The attention section: a layer picker, one lazily built view per layer, and the script."""
    groups = group_positions(trace, window, group_image)
    options = "".join(f'<option value="layer-{x}">layer {x}</option>' for x in layers)
    picker = f'<label>layer <select id="layer-select">{options}</select></label> ' if len(layers) > 1 else ""
    views = "".join(layer_section(trace, x, groups, active=i == 0) for i, x in enumerate(layers))
    return (f'<section id="attention"><h3>Attention per layer</h3>{note}{picker}'
            f"{views}<script>{ATTENTION_JS}</script></section>\n")


def page(title: str, body: str, inline: bool = False) -> str:
    """A whole HTML page loading the circuitsvis bundle once (inline or ``circuitsvis.js`` beside it)."""
    script = f"<script>{circuitsvis_js()}</script>" if inline else f'<script src="{JS_NAME}"></script>'
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f'{STYLE}<script type="application/json" id="colormap">{colormap_json()}</script>\n'
            f'{script}\n</head><body>\n<h2>{html.escape(title)}</h2>\n{body}</body></html>\n')


def write_attention_html(trace: Trace, out_dir: str | Path, layers: Optional[Sequence[int]] = None,
                         window: Optional[tuple[int, int]] = None, inline: bool = False,
                         group_image: bool = True) -> list[Path]:
    """Write ``layer_XX.html`` per layer into ``out_dir`` (plus ``circuitsvis.js`` unless ``inline``).

    Returns the written page paths. Pages open offline; see the module docstring for what they show.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not inline:
        (out / JS_NAME).write_text(circuitsvis_js(), encoding="utf-8")
    n_layers = trace.info.n_layers
    paths = []
    for layer in (range(n_layers) if layers is None else [x % n_layers for x in layers]):
        body = (f"<p>Answer: {html.escape(escape_control(trace.text))}</p>{step_select(trace)}"
                + attention_section(trace, [layer], window, group_image))
        path = out / f"layer_{layer:02d}.html"
        path.write_text(page(f"Layer {layer} attention — {escape_control(trace.question)}", body, inline),
                        encoding="utf-8")
        paths.append(path)
    return paths


def parse_window(text: Optional[str]) -> Optional[tuple[int, int]]:
    """``"START:END"`` (either side may be empty) as a window tuple; None/empty gives None."""
    if not text:
        return None
    try:
        lo, hi = text.split(":")
        return (int(lo) if lo else 0, int(hi) if hi else 1 << 30)
    except ValueError:
        raise LlavaLensError(f"window {text!r} is not START:END (e.g. 0:200)") from None

