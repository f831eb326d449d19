"""Figures of the deeper analyses (:mod:`llava_lens.analysis`): sinks, head focus, knockout, entropy.

They live here so that ``llava_lens.analysis`` never imports the views. Each returns a
:class:`matplotlib.figure.Figure`; save it with :func:`llava_lens.views.plots.save_figure`.
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from llava_lens.analysis.heads import HeadFocus
from llava_lens.analysis.knockout import Knockout
from llava_lens.analysis.sinks import Sinks
from llava_lens.views.plots import clean_token, figure


def plot_entropy(entropy: torch.Tensor, tokens: list[str]) -> Figure:
    """One line per generated step: image-attention entropy ``[S, L]`` by layer."""
    fig = figure(5, 3)
    ax = fig.add_subplot(1, 1, 1)
    values = entropy.float()
    for s, tok in enumerate(tokens):
        ax.plot(range(values.shape[1]), values[s].tolist(), marker="o", label=clean_token(tok))
    ax.set_xlabel("layer")
    ax.set_ylabel("image-attention entropy")
    ax.legend(fontsize=7, ncol=2)
    return fig


def plot_head_focus(focus: HeadFocus) -> Figure:
    """Layer x head heatmaps of the image share (and the blank-image change when present)."""
    panels = [("image attention share (absolute, 0-1)", focus.image_share, (0.0, 1.0))]
    if focus.blank_change is not None:
        panels.append(("output change, blank image (relative)", focus.blank_change, (0.0, None)))
    fig = figure(4.5 * len(panels), 3.2)
    for i, (title, values, (vmin, vmax)) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        im = ax.imshow(values.float().numpy(), cmap="viridis", origin="lower", aspect="auto", vmin=vmin, vmax=vmax)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
    return fig


def plot_knockout(result: Knockout, title: str = "") -> Figure:
    """Bar chart of the answer probability per knocked-out window, with the no-knockout baseline."""
    fig = figure(5, 3)
    ax = fig.add_subplot(1, 1, 1)
    labels = [f"L{w[0]}" if len(w) == 1 else f"L{w[0]}-{w[-1]}" for w in result.windows] + ["all"]
    ax.bar(labels, result.probs.float().tolist() + [result.all_layers], color="#1f77b4")
    ax.axhline(result.baseline, color="k", ls="--", lw=1, label="no knockout")
    ax.set_ylim(0, 1)
    ax.set_ylabel("answer probability")
    ax.set_xlabel("layers with image attention blocked")
    ax.set_title(clean_token(title, 80) if title else "attention knockout (last position -> image)", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def plot_sinks(sinks: Sinks) -> Figure:
    """Norm ratio per image token and layer (a heatmap), sinks marked."""
    fig = figure(8, 2.5)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(sinks.ratio.float().numpy(), aspect="auto", cmap="magma")
    for i in sinks.indices:
        ax.axvline(i, color="cyan", lw=0.6, ls=":")
    ax.set_xlabel("image token")
    ax.set_ylabel("layer (resid_pre)")
    ax.set_title(f"residual norm / median (sinks: > {sinks.k:g}x, {len(sinks.indices)} found)")
    fig.colorbar(im, ax=ax, label="norm / median image-token norm")
    return fig
