"""An offline index page over several run directories: :func:`write_index`."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import quote

from llava_lens.views.export import read_manifest
from llava_lens.views.plots import escape_control
from llava_lens.views.report import REPORT_NAME

_STYLE = """<style>
body { font-family: sans-serif; margin: 20px; }
table { border-collapse: collapse; }
td, th { padding: 6px 10px; border-bottom: 1px solid #ddd; vertical-align: middle; text-align: left; }
img.thumb { width: 128px; image-rendering: auto; }
.missing { color: #a33; }
</style>
"""


def _text(value: object) -> str:
    return html.escape(escape_control(str(value)))


def _thumb(run: Path, name: str, rel: str, alt: str) -> str:
    if not (run / rel).is_file():
        return '<span class="missing">—</span>'
    return f'<img class="thumb" alt="{html.escape(alt)}" src="{quote(name)}/{quote(rel)}">'


def _first_heatmap(run: Path) -> str:
    manifest = read_manifest(run) or {}
    steps = [f for f in manifest.get("files", []) if isinstance(f, dict) and f.get("role") == "heatmaps"]
    return str(min(steps, key=lambda f: f.get("step", 0))["path"]) if steps else "heatmaps/step_00.png"


def write_index(out_dir: str | Path, rows: Iterable[Sequence[str]], title: str = "llava-lens runs") -> Path:
    """Write ``out_dir/index.html``: per run, the input image, the first token's heatmap, Q and A.

    ``rows`` are ``(name, question, answer)``: ``name`` is the run's folder under ``out_dir``
    (holding ``report.html``, ``image.png``...). Links and images are relative, so the folder can
    be moved or opened offline; a run without a report is marked, not dropped.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = []
    for name, question, answer in rows:
        run = out / name
        link = (f'<a href="{quote(name)}/{REPORT_NAME}">{_text(name)}</a>' if (run / REPORT_NAME).is_file()
                else f'{_text(name)} <span class="missing">(no {REPORT_NAME})</span>')
        body.append(f"<tr><td>{link}</td><td>{_thumb(run, name, 'image.png', 'input image')}</td>"
                    f"<td>{_thumb(run, name, _first_heatmap(run), 'heatmap of the first token')}</td>"
                    f"<td>{_text(question)}</td><td><b>{_text(answer)}</b></td></tr>")
    table = ("<table><tr><th>run</th><th>image</th><th>first token's map</th><th>question</th>"
             f"<th>answer</th></tr>{''.join(body)}</table>")
    path = out / "index.html"
    path.write_text(f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{_text(title)}</title>{_STYLE}'
                    f"</head><body><h2>{_text(title)}</h2>{table}</body></html>\n", encoding="utf-8")
    return path
