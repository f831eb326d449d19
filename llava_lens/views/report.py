"""One self-contained, offline HTML report per run directory: :func:`write_report`.

The report reads what :func:`llava_lens.views.export` wrote (``trace.json``/``.safetensors``,
``image.png``, ``heatmaps/step_XX.png``, ``logit_lens.png``, ``vision_share.png``...) and never
runs the model. Images are embedded as base64 ``data:`` URIs, the circuitsvis bundle is inlined
once (via :func:`llava_lens.views.html.page`), and every piece of text from the trace is escaped,
so the single file opens offline and makes no network request.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from llava_lens.errors import LlavaLensError
from llava_lens.trace import Trace
from llava_lens.views.html import layer_views, page

REPORT_NAME = "report.html"
MAX_LAYERS = 8
"""Attention views in a report when no layers are named (each layer adds ~2 MB on a 7B model)."""

_STYLE = """<style>
body { font-family: sans-serif; margin: 20px; max-width: 1150px; }
section { margin: 18px 0; padding: 10px; border-top: 1px solid #ccc; }
img.figure { max-width: 100%; }
#heatmap-image, #input-image { max-width: 420px; image-rendering: auto; }
.qa td { padding: 3px 10px; vertical-align: top; }
.layer-view { display: none; }
.layer-view.active { display: block; }
</style>
"""

# Vanilla JS: token -> heatmap and layer -> attention view switches. No library, no network.
_SCRIPT = """<script>
(function () {
  var maps = JSON.parse(document.getElementById("heatmap-data").textContent);
  var tokenSelect = document.getElementById("token-select");
  var heatmap = document.getElementById("heatmap-image");
  function showToken(i) { if (maps.length) { heatmap.src = maps[i]; tokenSelect.value = String(i); } }
  if (tokenSelect) { tokenSelect.addEventListener("change", function () { showToken(+tokenSelect.value); }); }
  showToken(0);
  var layerSelect = document.getElementById("layer-select");
  function showLayer(name) {
    var views = document.querySelectorAll(".layer-view");
    for (var k = 0; k < views.length; k++) { views[k].classList.toggle("active", views[k].id === name); }
  }
  if (layerSelect) {
    layerSelect.addEventListener("change", function () { showLayer(layerSelect.value); });
    showLayer(layerSelect.value);
  }
})();
</script>
"""


def data_uri(path: Path) -> str:
    """Return ``path`` (a PNG/JPEG/SVG file) as a base64 ``data:`` URI."""
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"data:{mime.get(path.suffix.lower(), 'application/octet-stream')};base64,{encoded}"


def _figure(run: Path, name: str, title: str, element_id: str) -> str:
    path = run / name
    if not path.is_file():
        return ""
    return (f'<section id="{element_id}"><h3>{html.escape(title)}</h3>'
            f'<img class="figure" alt="{html.escape(title)}" src="{data_uri(path)}"></section>\n')


def _summary(trace: Trace, run: Path) -> str:
    image = run / "image.png"
    img = f'<img id="input-image" alt="input image" src="{data_uri(image)}">' if image.is_file() else ""
    rows = [("Model", trace.model_name), ("Question", trace.question), ("Answer", trace.text),
            ("Tokens", " | ".join(trace.tokens)), ("Stopped by", trace.stop_reason)]
    cells = "".join(f'<tr><th>{html.escape(k)}</th><td id="qa-{k.lower().replace(" ", "-")}">'
                    f"{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f'<section id="summary">{img}<table class="qa">{cells}</table></section>\n'


def _heatmaps(trace: Trace, run: Path) -> str:
    """Token selector + heatmap image; the PNGs are embedded once, as JSON, in a data block."""
    paths = [run / "heatmaps" / f"step_{i:02d}.png" for i in range(len(trace))]
    maps = [data_uri(p) for p in paths if p.is_file()]
    options = "".join(f'<option value="{i}">{i}: {html.escape(tok)}</option>'
                      for i, tok in enumerate(trace.tokens[: len(maps)]))
    # base64 URIs hold no "<", but escape anyway so the block can never close its script element
    blob = json.dumps(maps).replace("<", "\\u003c")
    return (f'<section id="heatmaps"><h3>Where each generated token looked</h3>'
            f'<label>token <select id="token-select">{options}</select></label><br>'
            f'<img id="heatmap-image" alt="heatmap of the selected token">'
            f'<script type="application/json" id="heatmap-data">{blob}</script></section>\n')


def _report_layers(trace: Trace, run: Path, layers: Optional[Sequence[int]]) -> list[int]:
    """Pick the layers to show: as asked, else those export wrote pages for (else all).

    The default is thinned out evenly to ``MAX_LAYERS`` (last layer kept), so that a 32-layer
    model's report stays a few MB.
    """
    n = trace.info.n_layers
    if layers is not None:
        return sorted({layer % n for layer in layers})
    pages = sorted(run.glob("attention/layer_*.html"))
    found = [int(m.group(1)) for p in pages if (m := re.match(r"layer_(\d+)$", p.stem))]
    found = [x for x in found if x < n] or list(range(n))
    if len(found) <= MAX_LAYERS:
        return found
    picks = {round(i * (len(found) - 1) / (MAX_LAYERS - 1)) for i in range(MAX_LAYERS)}
    return [found[i] for i in sorted(picks)]


def _attention(trace: Trace, layers: list[int], last: Optional[int]) -> str:
    options = "".join(f'<option value="layer-{x}">layer {x}</option>' for x in layers)
    views = "".join(f'<div class="layer-view" id="layer-{x}">{layer_views(trace, x, last=last)}</div>\n'
                    for x in layers)
    return (f'<section id="attention"><h3>Attention per layer</h3>'
            f'<label>layer <select id="layer-select">{options}</select></label>\n{views}</section>\n')


def write_report(run_dir: str | Path, layers: Optional[Sequence[int]] = None,
                 last: Optional[int] = 64) -> Path:
    """Write ``run_dir/report.html``: one offline file with everything :func:`export` wrote.

    ``layers`` picks the attention views (default: the layers exported, at most ``MAX_LAYERS``
    evenly spaced); ``last`` the positions shown in them. Raises
    :class:`llava_lens.LlavaLensError` when ``run_dir`` holds no trace.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise LlavaLensError(f"run directory not found: {run}")
    trace = Trace.load(run)
    body = "".join([
        _STYLE, _summary(trace, run), _heatmaps(trace, run),
        _figure(run, "logit_lens.png", "Logit lens (top-1 decoding per layer)", "logit-lens"),
        _figure(run, "logit_lens_target.png", "Probability and rank of each generated token",
                "logit-lens-target"),
        _figure(run, "vision_share.png", "Attention share: image / prompt / generated", "vision-share"),
        _figure(run, "heatmaps/grid.png", "All heatmaps", "heatmap-grid"),
        _attention(trace, _report_layers(trace, run, layers), last), _SCRIPT,
    ])
    path = run / REPORT_NAME
    path.write_text(page(f"llava-lens report — {trace.question}", body, inline=True), encoding="utf-8")
    return path
