"""Write every view of one trace under one directory: :func:`export`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from llava_lens import grounding
from llava_lens.lens import LogitLens
from llava_lens.trace import Trace
from llava_lens.views import plots
from llava_lens.views.html import write_attention_html


def _heatmaps(trace: Trace, out: Path, map_name: str, layers: Optional[Sequence[int]]) -> dict[str, list[Path]]:
    """``heatmaps/step_XX.png`` + ``heatmaps/grid.png`` of one named map painted on the image."""
    span = trace.vision_span
    if map_name in ("llm_mean", "llm_max"):
        tile = len(span.grids) - 1  # the finest grid (NeXT: the high-resolution one)
        fn = grounding.attention_map_mean if map_name == "llm_mean" else grounding.attention_map_max
        grid = fn(trace, layers, tile=tile)
    else:
        tile, grid = 0, grounding.MAPS[map_name](trace, layers=layers)
    heats = grounding.paint_grid(grid, span, tile=tile, size=(trace.image.height, trace.image.width))
    folder = out / "heatmaps"
    steps = []
    for i, token in enumerate(trace.tokens):
        steps += plots.plot_heatmap(trace.image, heats[i], folder / f"step_{i:02d}.png",
                                    title=f"step {i}: {plots.clean_token(token)} ({map_name})")
    return {"heatmaps": steps, "heatmap_grid": plots.plot_heatmap_grid(trace.image, heats, trace.tokens,
                                                                       folder / "grid.png")}


def export(trace: Trace, out_dir: str | Path, lens_result: Optional[LogitLens] = None,
           layers: Optional[Sequence[int]] = None, *, last: Optional[int] = 64,
           map_name: str = "llm_mean", inline_js: bool = False, save_trace: bool = True) -> dict[str, list[Path]]:
    """Write all views of ``trace`` into ``out_dir`` (e.g. ``analysis_results/<run>``).

    Layout: ``attention/layer_XX.html`` (+ ``attention/circuitsvis.js``), ``logit_lens.png/.svg``,
    ``logit_lens_target.png`` and ``logit_lens.safetensors/.json`` (when ``lens_result`` is given;
    compute it with :func:`llava_lens.lens.logit_lens`), ``vision_share.png``,
    ``heatmaps/step_XX.png``, ``heatmaps/grid.png``, and the trace itself (``trace.json``,
    ``trace.safetensors``, ``image.png``). ``layers`` selects attention pages and the layers
    the heatmaps average over (default: all). Never runs the model.

    Returns the written paths by kind.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    written["attention"] = write_attention_html(trace, out / "attention", layers, last=last, inline=inline_js)
    if lens_result is not None:
        written["logit_lens"] = plots.plot_logit_lens(lens_result, out / "logit_lens.png")
        written["logit_lens_target"] = plots.plot_target_curve(lens_result, out / "logit_lens_target.png")
        lens_result.save(out)
        written["logit_lens_data"] = [out / "logit_lens.safetensors", out / "logit_lens.json"]
    written["vision_share"] = plots.plot_vision_share(grounding.vision_share(trace), out / "vision_share.png")
    written.update(_heatmaps(trace, out, map_name, layers))
    if save_trace:
        trace.save(out)
        written["trace"] = [out / "trace.json", out / "trace.safetensors", out / "image.png"]
    return written
