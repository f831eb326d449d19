"""Views of a :class:`~llava_lens.Trace`, written by :func:`export` under one directory.

Attention HTML (circuitsvis, offline), matplotlib figures (returned as ``Figure`` s; write them
with :func:`save_figure`), the self-contained report, and an index page over several runs.
"""

from llava_lens.views.export import MANIFEST, export, read_manifest
from llava_lens.views.html import parse_window, position_labels, write_attention_html
from llava_lens.views.index import write_index
from llava_lens.views.plots import (
    plot_heatmap,
    plot_heatmap_grid,
    plot_logit_lens,
    plot_target_curve,
    plot_vision_share,
    save_figure,
)
from llava_lens.views.report import write_report

__all__ = [
    "export", "write_report", "write_index", "read_manifest", "MANIFEST", "write_attention_html",
    "position_labels", "parse_window", "plot_logit_lens", "plot_target_curve", "plot_vision_share",
    "plot_heatmap", "plot_heatmap_grid", "save_figure",
]
