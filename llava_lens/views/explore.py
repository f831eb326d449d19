"""An interactive Jupyter explorer of a :class:`~llava_lens.Trace`: ``ll.explore(trace)``.

Sliders and selectors for the generated step, a layer range, heads and the map method; it shows
the image with the selected map (:func:`llava_lens.views.plots.plot_heatmap`: perceptual colormap,
opacity following the value so the image's own colours stay visible, colour bar), the logit-lens
column of the step, the step's attention split image / prompt / generated, and, on request, the
circuitsvis view of the last selected layer.
Works on a saved trace without the model (pass a precomputed :class:`~llava_lens.LogitLens`, or
the :class:`~llava_lens.LlavaLens` to compute one). Needs ``ipywidgets`` (``pip install
llava-lens[notebook]``). The state and what each panel shows are plain methods
(:meth:`Explorer.heat`, :meth:`Explorer.lens_rows`, :meth:`Explorer.shares`), so they are
testable without a browser.
"""

from __future__ import annotations

import html
from typing import Any, Optional

import torch
from matplotlib.figure import Figure

from llava_lens import grounding
from llava_lens.errors import LlavaLensError
from llava_lens.lens import LogitLens, logit_lens
from llava_lens.trace import Trace
from llava_lens.views import plots

METHODS = ("llm_mean", "llm_max", "vlm_visualizer", "vit_rollout")
"""Map methods offered: LLM attention (mean or max over heads), and the two that need the ViT's attention."""


def _widgets() -> Any:
    try:
        import ipywidgets
    except ImportError:
        raise LlavaLensError("the explorer needs ipywidgets: pip install 'llava-lens[notebook]'") from None
    return ipywidgets


class Explorer:
    """Widget state and the panels it shows; ``Explorer.widget`` is the ipywidgets box."""

    def __init__(self, trace: Trace, lens: Any = None):
        if not trace.steps or trace.steps[0].attention is None:
            raise LlavaLensError("explore needs a trace with attention rows (default_capture=True)")
        self.trace = trace
        self.result: Optional[LogitLens] = lens if isinstance(lens, LogitLens) else (
            logit_lens(trace, lens, k=3, prompt=False) if lens is not None and trace.steps[0].resid is not None
            else None)
        self.step, self.layers, self.heads, self.method = 0, (0, trace.info.n_layers - 1), None, "llm_mean"
        self.methods = [m for m in METHODS if self._available(m)]
        self.widget = None
        self.drawn: Optional[Figure] = None
        """The figure the image panel shows now."""

    def _available(self, method: str) -> bool:
        if method in ("llm_mean", "llm_max"):
            return True
        try:
            grounding.vit_attention(self.trace)
            return True
        except ValueError:
            return False

    def set(self, step: Optional[int] = None, layers: Optional[tuple[int, int]] = None,
            heads: Any = "keep", method: Optional[str] = None) -> None:
        """Change the state (what the sliders do); unknown values are errors."""
        if step is not None:
            if not 0 <= step < len(self.trace.steps):
                raise ValueError(f"step {step} out of range 0-{len(self.trace.steps) - 1}")
            self.step = step
        if layers is not None:
            lo, hi = layers
            if not 0 <= lo <= hi < self.trace.info.n_layers:
                raise ValueError(f"layers {layers} out of range 0-{self.trace.info.n_layers - 1}")
            self.layers = (lo, hi)
        if heads != "keep":
            self.heads = None if heads is None or len(heads) == 0 else tuple(sorted(heads))
        if method is not None:
            if method not in self.methods:
                raise ValueError(f"map method {method!r} not available here; choose from {self.methods}")
            self.method = method

    @property
    def layer_list(self) -> list[int]:
        """The selected layers."""
        return list(range(self.layers[0], self.layers[1] + 1))

    def grid(self) -> tuple[torch.Tensor, int]:
        """The current step's map on its grid ``[rows, cols]`` and the grid's tile."""
        span = self.trace.vision_span
        if self.method in ("llm_mean", "llm_max"):
            tile = len(span.grids) - 1  # the finest grid (NeXT: the high-resolution one)
            if self.method == "llm_mean":
                maps = grounding.attention_map_mean(self.trace, self.layer_list, tile=tile, heads=self.heads)
            else:
                maps = grounding.attention_map_max(self.trace, self.layer_list, tile=tile)
            return maps[self.step], tile
        return grounding.MAPS[self.method](self.trace, layers=self.layer_list)[self.step], 0

    def heat(self) -> torch.Tensor:
        """``[H, W]``: the current map painted on the image."""
        grid, tile = self.grid()
        image = self.trace.image
        return grounding.paint_grid(grid, self.trace.vision_span, tile=tile, size=(image.height, image.width))

    def shares(self) -> torch.Tensor:
        """``[3]``: the step's attention on image / prompt / generated keys, mean over selected layers and heads."""
        share = grounding.vision_share(self.trace).shares[self.step][self.layer_list]  # [Ls, H, 3]
        if self.heads is not None:
            share = share[:, list(self.heads)]
        return share.mean((0, 1))

    def lens_rows(self) -> list[tuple[str, list[tuple[str, float]]]]:
        """Logit-lens column of the step: ``(layer label, [(token, probability), ...])`` per row."""
        if self.result is None:
            step = self.trace.steps[self.step]
            probs = step.top_probs if step.logits is not None else torch.full((len(step.top_ids),), float("nan"))
            return [("output", [(str(int(i)), float(p)) for i, p in zip(step.top_ids[:5], probs[:5])])]
        r, s = self.result, self.step
        return [(label, [(r.vocab.get(int(i), str(int(i))), float(p))
                         for i, p in zip(r.top_ids[row, s], r.top_probs[row, s])])
                for row, label in enumerate(r.layer_labels)]

    def figure(self) -> Figure:
        """The image with the current map."""
        token = self.trace.steps[self.step].token
        heads = "all heads" if self.heads is None else f"heads {list(self.heads)}"
        title = f"step {self.step} {token!r}: {self.method}, layers {self.layers[0]}-{self.layers[1]}, {heads}"
        return plots.plot_heatmap(self.trace.image, self.heat(), title)

    def _lens_html(self) -> str:
        rows = "".join(f"<tr><td>{html.escape(label)}</td>" + "".join(
            f"<td>{html.escape(tok)} <small>{p:.2f}</small></td>" for tok, p in cells) + "</tr>"
            for label, cells in self.lens_rows())
        return f"<b>logit lens, step {self.step}</b><table>{rows}</table>"

    def _share_html(self) -> str:
        names = ("image", "prompt", "generated")
        cells = " ".join(f"{n}: <b>{float(v):.2f}</b>" for n, v in zip(names, self.shares()))
        return f"<b>attention share</b> (selected layers and heads): {cells}"

    def build(self) -> Any:
        """Build (once) and return the ipywidgets box."""
        w = _widgets()
        n_layers, n_heads = self.trace.info.n_layers, self.trace.info.n_heads
        step = w.IntSlider(0, 0, len(self.trace.steps) - 1, description="step")
        layers = w.IntRangeSlider(value=list(self.layers), min=0, max=n_layers - 1, description="layers")
        heads = w.SelectMultiple(options=list(range(n_heads)), description="heads (none=all)")
        method = w.Dropdown(options=self.methods, value=self.method, description="map")
        image, lens_box, share_box, attention = w.Output(), w.HTML(), w.HTML(), w.Output()
        show_attention = w.ToggleButton(False, description="circuitsvis view")

        def redraw(*_: Any) -> None:
            self.set(step.value, tuple(layers.value), list(heads.value), method.value)
            image.clear_output(wait=True)
            self.drawn = self.figure()
            with image:
                from IPython.display import display
                display(self.drawn)
            lens_box.value, share_box.value = self._lens_html(), self._share_html()
            attention.clear_output()
            if show_attention.value:
                from IPython.display import HTML, display

                from llava_lens.views.html import layer_views, page
                with attention:
                    display(HTML(page(f"layer {self.layers[1]}", layer_views(self.trace, self.layers[1]), inline=True)))

        for control in (step, layers, heads, method, show_attention):
            control.observe(redraw, names="value")
        redraw()
        self.widget = w.VBox([w.HBox([step, layers, method]), heads, w.HBox([image, w.VBox([share_box, lens_box])]),
                              show_attention, attention])
        return self.widget

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.widget or self.build())


def explore(trace: Trace, lens: Any = None) -> Explorer:
    """An interactive explorer of ``trace`` for Jupyter (display it, or ``.build()`` the widget).

    ``lens`` is the :class:`~llava_lens.LlavaLens` (to compute the logit lens), a precomputed
    :class:`~llava_lens.LogitLens`, or None (then the lens panel shows the step's output top-k).
    """
    return Explorer(trace, lens)
