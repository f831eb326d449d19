"""Write every view of one trace under one directory, and a manifest of it: :func:`export`.

The manifest ``run.json`` lists each written file (path relative to the run directory, its kind
and its role, e.g. ``{"path": "logit_lens.png", "kind": "png", "role": "logit_lens"}``) and the
options used (layers, map name, window, model), so that :func:`llava_lens.views.write_report`
reads what was written instead of guessing file names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from llava_lens import grounding
from llava_lens.errors import LlavaLensError
from llava_lens.lens import LogitLens
from llava_lens.trace import Trace
from llava_lens.views import plots
from llava_lens.views.html import write_attention_html

MANIFEST = "run.json"
MANIFEST_VERSION = 1


def _write(fig: Any, path: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Save ``fig``, then clear it.

    Matplotlib's reference cycles otherwise keep each figure's pixel arrays until a full garbage
    collection (200 MB over the 32 heatmaps of a 640x480 photo).
    """
    paths = plots.save_figure(fig, path, formats)
    fig.clear()
    return paths


def _heatmaps(trace: Trace, out: Path, map_name: str, layers: Optional[Sequence[int]]) -> dict[str, list[Path]]:
    """``heatmaps/step_XX.png`` + ``heatmaps/grid.png`` of one named map painted on the image."""
    span = trace.vision_span
    if map_name in ("llm_mean", "llm_max"):
        tile = len(span.grids) - 1  # the finest grid (NeXT: the high-resolution one)
        fn = grounding.attention_map_mean if map_name == "llm_mean" else grounding.attention_map_max
        grid = fn(trace, layers, tile=tile)
    elif map_name in grounding.MAPS:
        tile, grid = 0, grounding.MAPS[map_name](trace, layers=layers)
    else:
        raise LlavaLensError(f"unknown map {map_name!r}; choose one of {sorted(grounding.MAPS)}")
    heats = grounding.paint_grid(grid.float(), span, tile=tile, size=(trace.image.height, trace.image.width))
    folder = out / "heatmaps"
    steps = []
    for i, token in enumerate(trace.tokens):
        fig = plots.plot_heatmap(trace.image, heats[i], title=f"step {i}: {plots.clean_token(token)} ({map_name})")
        steps += _write(fig, folder / f"step_{i:02d}.png")
    grid_fig = plots.plot_heatmap_grid(trace.image, heats, trace.tokens)
    return {"heatmaps": steps, "heatmap_grid": _write(grid_fig, folder / "grid.png")}


def _entry(out: Path, path: Path, role: str, **extra: Any) -> dict[str, Any]:
    return {"path": path.relative_to(out).as_posix(), "kind": path.suffix.lstrip("."), "role": role, **extra}


def write_manifest(out: Path, trace: Trace, written: dict[str, list[Path]], options: dict[str, Any]) -> Path:
    """Write ``run.json``: every file in ``written`` (role = its key) and the ``options`` used."""
    files = []
    for role, paths in written.items():
        for path in paths:
            extra: dict[str, Any] = {}
            if role == "attention" and path.stem.startswith("layer_"):
                extra["layer"] = int(path.stem.split("_")[1])
            elif role == "heatmaps":
                extra["step"] = int(path.stem.split("_")[1])
            files.append(_entry(out, path, "attention_js" if path.suffix == ".js" else role, **extra))
    manifest = {"manifest_version": MANIFEST_VERSION, "model": trace.model_name, "question": trace.question,
                "answer": trace.text, "steps": len(trace), "options": options, "files": files}
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False), encoding="utf-8")
    return path


def read_manifest(run_dir: str | Path) -> Optional[dict[str, Any]]:
    """The ``run.json`` of ``run_dir`` (None when there is none); a one-line error when it is unreadable."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LlavaLensError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise LlavaLensError(f"{path} is not a llava-lens manifest (no 'files' list)")
    return manifest


def export(trace: Trace, out_dir: str | Path, lens_result: Optional[LogitLens] = None,
           layers: Optional[Sequence[int]] = None, *, window: Optional[tuple[int, int]] = None,
           map_name: str = "llm_mean", inline_js: bool = False, save_trace: bool = True) -> dict[str, list[Path]]:
    """Write all views of ``trace`` into ``out_dir`` (e.g. ``analysis_results/<run>``), plus ``run.json``.

    Layout: ``attention/layer_XX.html`` (+ ``attention/circuitsvis.js``), ``logit_lens.png/.svg``,
    ``logit_lens_target.png`` and ``logit_lens.safetensors/.json`` (when ``lens_result`` is given;
    compute it with :func:`llava_lens.lens.logit_lens`), ``vision_share.png``,
    ``heatmaps/step_XX.png``, ``heatmaps/grid.png``, the trace itself (``trace.json``,
    ``trace.safetensors``, ``image.png``) and the manifest ``run.json``. ``layers`` selects
    attention pages and the layers the heatmaps average over (default: all); ``window=(start, end)`` the positions the
    attention pages show one by one (default: every position, image features grouped per grid row;
    see :func:`llava_lens.views.html.write_attention_html`, whose ``group_image=False`` shows every
    image feature on its own). Never runs the model.

    Returns the written paths by role (the manifest's own path under ``"manifest"``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_layers = trace.info.n_layers
    chosen = None if layers is None else sorted({x % n_layers for x in layers})
    written: dict[str, list[Path]] = {}
    pages = write_attention_html(trace, out / "attention", chosen, window=window, inline=inline_js)
    written["attention"] = pages + ([] if inline_js else [out / "attention" / "circuitsvis.js"])
    if lens_result is not None:
        written["logit_lens"] = _write(plots.plot_logit_lens(lens_result), out / "logit_lens.png", ("png", "svg"))
        written["logit_lens_target"] = _write(plots.plot_target_curve(lens_result), out / "logit_lens_target.png")
        lens_result.save(out)
        written["logit_lens_data"] = [out / "logit_lens.safetensors", out / "logit_lens.json"]
    share = plots.plot_vision_share(grounding.vision_share(trace))
    written["vision_share"] = _write(share, out / "vision_share.png")
    written.update(_heatmaps(trace, out, map_name, chosen))
    if save_trace:
        trace.save(out)
        written["trace"] = [out / "trace.json", out / "trace.safetensors"]
        written["image"] = [out / "image.png"]
    options = {"layers": chosen, "map": map_name, "window": None if window is None else list(window),
               "group_image": True, "inline_js": inline_js}
    written["manifest"] = [write_manifest(out, trace, written, options)]
    return written
