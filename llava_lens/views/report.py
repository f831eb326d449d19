"""One self-contained, offline HTML report per run directory: :func:`write_report`.

The report reads the run's manifest ``run.json`` (written by :func:`llava_lens.views.export`) and
the saved trace, and never runs the model. A file the manifest lists but that is gone is named on
the page, not silently dropped. Images are embedded as ``data:`` URIs, the circuitsvis bundle is
inlined once, every piece of text from the trace is escaped, and the file makes no network request.

What the page computes itself, from compactly stored rows (``uint8`` base64, each row scaled to
its max): the image heatmap of any generated token for the method and layer range picked, and
per layer (built the first time the layer is opened) the circuitsvis views and per-head image maps.

Size (bytes, about): ``1.3 MB`` (bundle) + figures + ``4/3 S L n`` (map rows: ``S`` steps, ``L``
layers, ``n`` patches) + per shown layer ``4/3 H (G (G + 1) / 2 + S n0)`` (``H`` heads, ``G``
position groups, ``n0`` base-grid patches). The default layers are thinned to fit ``MAX_BYTES``.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from llava_lens.defaults import MAX_VIEW_LAYERS, view_layers
from llava_lens.errors import LlavaLensError
from llava_lens.trace import Trace
from llava_lens.views.export import MANIFEST, read_manifest
from llava_lens.views.html import attention_section, group_positions, page, step_select
from llava_lens.views.mapdata import map_section
from llava_lens.views.plots import escape_control

REPORT_NAME = "report.html"
MAX_LAYERS = MAX_VIEW_LAYERS
"""Attention views in a report when no layers are named (fewer when they would not fit ``MAX_BYTES``)."""
MAX_BYTES = 7_500_000
"""Size the default layer choice aims to stay under (the issue's bound is 8 MB)."""
MAX_FIGURE_BYTES = 1_500_000
"""A figure larger than this is named on the page instead of embedded."""
FIGURES = (("logit_lens", "Logit lens (top-1 decoding per layer)"),
           ("logit_lens_target", "Probability and rank of each generated token"),
           ("vision_share", "Attention share: image / prompt / generated"),
           ("heatmap_grid", "All heatmaps (as exported)"))


LOSSLESS_UP_TO = 300_000
"""PNGs larger than this (photos, noisy inputs, many-panel grids) are embedded as JPEG (quality 88)."""


def data_uri(path: Path) -> str:
    """Return ``path`` (a PNG/JPEG/SVG file) as a base64 ``data:`` URI.

    A PNG over :data:`LOSSLESS_UP_TO` bytes is re-encoded as JPEG: a report shows pictures and
    plots, not data, and a 640x480 photo as PNG alone would take an eighth of the size budget.
    """
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
    data, kind = path.read_bytes(), mime.get(path.suffix.lower(), "application/octet-stream")
    if kind == "image/png" and len(data) > LOSSLESS_UP_TO:
        with Image.open(io.BytesIO(data)) as img:
            buffer = io.BytesIO()
            img.convert("RGB").save(buffer, "JPEG", quality=88)
        if buffer.tell() < len(data):
            data, kind = buffer.getvalue(), "image/jpeg"
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _text(value: Any) -> str:
    return html.escape(escape_control(str(value)))


def _summary(trace: Trace, run: Path) -> str:
    image = run / "image.png"
    img = f'<img id="input-image" alt="input image" src="{data_uri(image)}">' if image.is_file() else ""
    rows = [("Model", trace.model_name), ("Question", trace.question), ("Answer", trace.text),
            ("Tokens", " | ".join(trace.tokens)), ("Stopped by", trace.stop_reason),
            ("Geometry", f"{trace.info.n_layers} layers × {trace.info.n_heads} heads; "
                         f"{len(trace.vision_span)} image features, grids {trace.vision_span.grids}; "
                         f"{len(trace.prompt_ids)} prompt positions")]
    cells = "".join(f'<tr><th>{html.escape(k)}</th><td id="qa-{k.lower().replace(" ", "-")}">'
                    f"{_text(v)}</td></tr>" for k, v in rows)
    return f'<section id="summary">{img}<table class="qa">{cells}</table><div style="clear:both"></div></section>\n'


def _role_files(manifest: Optional[dict], role: str) -> list[dict]:
    return [f for f in (manifest or {}).get("files", []) if isinstance(f, dict) and f.get("role") == role]


def _figures(run: Path, manifest: Optional[dict]) -> tuple[str, list[str]]:
    """Embedded figures listed in the manifest, and notes on those missing or too large."""
    parts, notes = [], []
    for role, title in FIGURES:
        for entry in _role_files(manifest, role):
            if entry.get("kind") not in ("png", "jpg", "jpeg"):
                continue
            path = run / str(entry.get("path", ""))
            if not path.resolve().is_relative_to(run.resolve()):
                notes.append(f"{entry.get('path')} ({role}) is outside the run directory: not embedded")
            elif not path.is_file():
                notes.append(f"{entry.get('path')} ({role}) is listed in {MANIFEST} but missing")
            elif path.stat().st_size > MAX_FIGURE_BYTES:
                notes.append(f"{entry['path']} ({role}) not embedded: {path.stat().st_size / 1e6:.1f} MB")
            else:
                parts.append(f'<section id="{role.replace("_", "-")}"><h3>{html.escape(title)}</h3>'
                             f'<img class="figure" alt="{html.escape(title)}" src="{data_uri(path)}"></section>\n')
    return "".join(parts), notes


def _layer_cost(trace: Trace, n_groups: int) -> int:
    """Bytes one layer's attention view adds to the report (base64 of the stored bytes + JSON)."""
    rows, cols = trace.vision_span.grids[0]
    heads, steps = trace.info.n_heads, len(trace)
    stored = heads * (n_groups * (n_groups + 1) // 2 + steps * rows * cols)
    return math.ceil(stored * 4 / 3) + 10 * heads * steps + 40 * n_groups + 2_000


def report_layers(trace: Trace, manifest: Optional[dict], layers: Optional[Sequence[int]],
                  budget: Optional[int] = None, layer_cost: int = 0) -> list[int]:
    """The layers to show: as asked, else those export wrote pages for (else all), thinned out.

    Among exported layers, those whose prompt rows the trace's prefill summary kept are preferred.

    The default is thinned evenly (first and last kept) to ``MAX_LAYERS``, and further while
    ``budget`` bytes cannot hold ``layer_cost`` per layer.
    """
    n = trace.info.n_layers
    if layers is not None:
        return view_layers(n, layers)  # an out-of-range layer is an error, not wrapped around
    found = sorted({int(f["layer"]) for f in _role_files(manifest, "attention") if "layer" in f})
    found = [x for x in found if 0 <= x < n] or list(range(n))
    summary = getattr(trace, "summary", None)  # layers whose prompt rows the trace kept come first
    kept = [x for x in (summary.layers if summary is not None else []) if x in found]
    found = kept or found
    keep = MAX_LAYERS if budget is None or layer_cost <= 0 else max(1, min(MAX_LAYERS, budget // layer_cost))
    if len(found) <= keep:
        return found
    if keep == 1:
        return [found[-1]]
    picks = {round(i * (len(found) - 1) / (keep - 1)) for i in range(keep)}
    return [found[i] for i in sorted(picks)]


def _files_section(run: Path, manifest: Optional[dict], notes: list[str]) -> str:
    if manifest is None:
        notes = [f"no {MANIFEST} in this run directory (written by views.export): exported figures not "
                 "included", *notes]
    else:
        notes += [f"{f.get('path')} ({f.get('role')}) is listed in {MANIFEST} but missing"
                  for f in manifest["files"] if isinstance(f, dict) and not (run / str(f.get("path", ""))).is_file()
                  and f.get("role") not in dict(FIGURES)]
    items = "".join(f"<li>{_text(n)}</li>" for n in dict.fromkeys(notes))
    listed = "".join(f"<li><code>{_text(f.get('path'))}</code> — {_text(f.get('role'))}</li>"
                     for f in (manifest or {}).get("files", []) if isinstance(f, dict))
    return (f'<section id="files"><h3>Files of this run</h3>'
            f'{f"<ul class=missing>{items}</ul>" if items else ""}<ul>{listed}</ul></section>\n')


def write_report(run_dir: str | Path, layers: Optional[Sequence[int]] = None,
                 window: Optional[tuple[int, int]] = None, trace: Optional[Trace] = None) -> Path:
    """Write ``run_dir/report.html``: one offline file with everything :func:`export` wrote.

    ``layers`` picks the attention views (default: the layers exported, at most ``MAX_LAYERS``
    evenly spaced and as many as fit ``MAX_BYTES``); ``window`` the positions shown individually
    in them (default: the export's window, else all, image features grouped per row). Raises
    :class:`llava_lens.LlavaLensError` when ``run_dir`` holds no trace. ``trace``: the trace that
    :func:`export` wrote there, if still in memory (saves loading a second copy: 250 MB for NeXT).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise LlavaLensError(f"run directory not found: {run}")
    trace = trace if trace is not None else Trace.load(run)
    manifest = read_manifest(run)
    options = (manifest or {}).get("options") or {}
    if window is None and options.get("window"):
        window = tuple(options["window"])
    group_image = bool(options.get("group_image", True))
    figures, notes = _figures(run, manifest)
    head = "".join([_summary(trace, run), f'<div id="step-bar">{step_select(trace)}</div>', map_section(trace),
                    figures])
    groups = group_positions(trace, window, group_image)
    budget = MAX_BYTES - len(head) - 1_400_000  # the inlined bundle
    chosen = report_layers(trace, manifest, layers, budget, _layer_cost(trace, len(groups.labels)))
    shown = (f"<p class=note>Layers shown: {', '.join(map(str, chosen))} of 0–{trace.info.n_layers - 1}"
             f"{'' if layers is not None else ' (default choice; name others with layers= / --layers)'}.</p>")
    body = head + attention_section(trace, chosen, window, group_image, note=shown) + _files_section(
        run, manifest, notes)
    path = run / REPORT_NAME
    title = f"llava-lens report — {escape_control(trace.question)}"
    path.write_text(page(title, body, inline=True), encoding="utf-8")
    return path


__all__ = ["write_report", "report_layers", "data_uri", "REPORT_NAME", "MAX_LAYERS", "MAX_BYTES"]
