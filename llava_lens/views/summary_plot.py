"""The plots of a sweep summary (:func:`llava_lens.sweep.summarize`), each a matplotlib Figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def emergence_figure(summary: dict[str, Any]) -> Figure:
    """Histogram of the layer from which the first answer token stays top-1, over the examples."""
    fig, ax = _figure()
    values = summary["emergence_first_values"]
    n_layers = len(summary["vision_share_by_layer"]) + 1
    ax.hist(values, bins=range(0, max(n_layers, max(values, default=0) + 1) + 1), align="left", rwidth=0.85)
    ax.set(xlabel="emergence layer of the first answer token", ylabel="examples",
           title="When does the answer become top-1?")
    return fig


def vision_share_figure(summary: dict[str, Any]) -> Figure:
    """Mean attention share on image tokens by layer."""
    fig, ax = _figure()
    share = summary["vision_share_by_layer"]
    ax.plot(range(len(share)), share, marker="o")
    ax.set(xlabel="layer", ylabel="attention share on image tokens", ylim=(0, 1),
           title="Vision-attention share by layer")
    ax.grid(alpha=0.3)
    return fig


def plot_summary(summary: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``summary_emergence.png`` and ``summary_vision_share.png`` into ``out_dir``; return their paths."""
    written = []
    for name, make in (("summary_emergence.png", emergence_figure), ("summary_vision_share.png", vision_share_figure)):
        path = Path(out_dir) / name
        make(summary).savefig(path, dpi=110, bbox_inches="tight")
        written.append(path)
    return written
