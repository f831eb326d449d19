"""Per-layer attention HTML with circuitsvis, openable offline.

circuitsvis' ``str(html)`` imports its JavaScript from a CDN; here the bundle that ships inside
the circuitsvis package (``circuitsvis/dist/cdn/iife.js``) is either written once beside the
pages (``circuitsvis.js``, the default) or inlined once per page (``inline=True``). No page
references a URL. Token labels are HTML-escaped (circuitsvis renders them as HTML) and the props
JSON-encoded with ``<``, ``>`` and ``&`` escaped, so a token such as ``</script>`` can neither close
the script element nor inject markup.
"""

from __future__ import annotations

import html
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import circuitsvis
import numpy as np
import torch
from circuitsvis.utils.convert_props import convert_prop_type

from llava_lens import hooks
from llava_lens.trace import Trace

JS_NAME = "circuitsvis.js"


def circuitsvis_js() -> str:
    """The circuitsvis browser bundle shipped in the installed package, safe to inline."""
    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return path.read_text(encoding="utf-8").replace("</script", "<\\/script")


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


def attention_matrix(trace: Trace, layer: int) -> torch.Tensor:
    """``[H, T, T]`` attention of ``layer`` over positions ``T = prompt_len + n_steps - 1``.

    Rows of prompt positions come from a raw ``blocks.L.attn.hook_pattern`` prefill capture, else
    (text queries only) from ``trace.summary``; rows not captured are zeros. The rows of the
    positions that produced each generated token come from ``Step.attention`` (future keys are 0).
    """
    prompt_len = len(trace.prompt_ids)
    n_t = prompt_len + len(trace.steps) - 1
    n_heads = trace.info.n_heads
    mat = torch.zeros(n_heads, n_t, n_t)
    pre = trace.prefill.get(hooks.attn_pattern(layer))
    rows = trace.summary.rows(layer) if trace.summary is not None else None
    if pre is not None:
        mat[:, :prompt_len, :prompt_len] = pre.float()
    elif rows is not None:
        mat[:, trace.summary.text_positions, :prompt_len] = rows.float()
    for step in trace.steps:
        row = step.attention[layer].float()  # [H, keys]
        mat[:, step.position, : row.shape[-1]] = row
    return mat


def _window(n_t: int, last: Optional[int], window: Optional[tuple[int, int]]) -> slice:
    if window is not None:
        return slice(max(window[0], 0), min(window[1], n_t))
    return slice(max(n_t - (last or n_t), 0), n_t)


def _props_json(**props) -> str:
    """JSON of circuitsvis props with ``<``, ``>``, ``&`` escaped (safe inside ``<script>``)."""
    data = {k: convert_prop_type(v) for k, v in props.items() if v is not None}
    text = json.dumps(data, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_view(element: str, **props) -> str:
    """A div + script rendering circuitsvis component ``element`` (expects ``CircuitsVis`` loaded)."""
    uid = "circuits-vis-" + uuid.uuid4().hex[:12]
    return (f'<div id="{uid}" style="margin: 15px 0;"></div>\n'
            f'<script>CircuitsVis.render("{uid}", CircuitsVis.{element}, {_props_json(**props)});</script>\n')


def page(title: str, body: str, inline: bool = False) -> str:
    """A whole HTML page loading the circuitsvis bundle once (inline or ``circuitsvis.js`` beside it)."""
    script = f"<script>{circuitsvis_js()}</script>" if inline else f'<script src="{JS_NAME}"></script>'
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f'{script}\n</head><body>\n<h2>{html.escape(title)}</h2>\n{body}</body></html>\n')


def layer_views(trace: Trace, layer: int, last: Optional[int] = 64,
                window: Optional[tuple[int, int]] = None, heads: bool = True) -> str:
    """HTML body for one layer: ``attention_patterns`` (and ``attention_heads``) over a window.

    ``window=(start, end)`` selects sequence positions; otherwise the ``last`` positions.
    """
    mat = attention_matrix(trace, layer)
    sl = _window(mat.shape[-1], last, window)
    att = np.round(mat[:, sl, sl].double().numpy(), 4)
    # circuitsvis puts token labels into the page as HTML (innerHTML): escape them so a token
    # such as `<img src=x onerror=...>` shows as text instead of running
    labels = [html.escape(label) for label in position_labels(trace)[sl]]
    parts = [f"<p>positions {sl.start}–{sl.stop - 1} of {mat.shape[-1]}; answer: "
             f"{html.escape(trace.text)}</p>\n", render_view("AttentionPatterns", tokens=labels, attention=att)]
    if heads:
        names = [f"L{layer}H{h}" for h in range(att.shape[0])]
        parts.append(render_view("AttentionHeads", tokens=labels, attention=att,
                                 attentionHeadNames=names, maskUpperTri=True))
    return "".join(parts)


def write_attention_html(trace: Trace, out_dir: str | Path, layers: Optional[Sequence[int]] = None,
                         last: Optional[int] = 64, window: Optional[tuple[int, int]] = None,
                         inline: bool = False, heads: bool = True) -> list[Path]:
    """Write ``layer_XX.html`` per layer into ``out_dir`` (plus ``circuitsvis.js`` unless ``inline``).

    Returns the written page paths. Pages open offline; see the module docstring.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not inline:
        (out / JS_NAME).write_text(circuitsvis_js(), encoding="utf-8")
    n_layers = trace.info.n_layers
    paths = []
    for layer in (range(n_layers) if layers is None else [x % n_layers for x in layers]):
        body = layer_views(trace, layer, last=last, window=window, heads=heads)
        path = out / f"layer_{layer:02d}.html"
        path.write_text(page(f"Layer {layer} attention — {trace.question}", body, inline), encoding="utf-8")
        paths.append(path)
    return paths
