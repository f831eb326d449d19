"""Views of a :class:`~llava_lens.Trace`, written by :func:`export` under one directory.

Attention HTML (circuitsvis, offline), matplotlib figures, and the self-contained report.
"""

from llava_lens.views.export import export
from llava_lens.views.html import position_labels, write_attention_html
from llava_lens.views.plots import (
    plot_heatmap,
    plot_heatmap_grid,
    plot_logit_lens,
    plot_target_curve,
    plot_vision_share,
)
from llava_lens.views.report import write_report

__all__ = [
    "export", "write_report", "write_attention_html", "position_labels", "plot_logit_lens", "plot_target_curve",
    "plot_vision_share", "plot_heatmap", "plot_heatmap_grid",
]
