"""Matplotlib figures (Agg canvas, no pyplot state): logit lens, vision share, image heatmaps.

Every function takes result dataclasses / tensors (never the model), writes files and returns
their paths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from llava_lens.grounding import VisionShare
from llava_lens.lens import LogitLens

SEGMENT_COLORS = ("#d62728", "#7f7f7f", "#1f77b4")


def clean_token(token: str, width: int = 10) -> str:
    """A token made safe and short for matplotlib text (no mathtext, SentencePiece space shown)."""
    text = token.replace("▁", " ").replace("Ġ", " ").replace("\n", "\\n").strip() or "␣"
    text = text.replace("$", r"\$")
    return text if len(text) <= width else text[: width - 1] + "…"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path, formats: Sequence[str] = ("png",), dpi: int = 110) -> list[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        target = path.with_suffix("." + fmt)
        fig.savefig(target, dpi=dpi, bbox_inches="tight")
        out.append(target)
    return out


def plot_logit_lens(result: LogitLens, path: str | Path, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Grid of top-1 decodings: rows layers (bottom = embeddings), columns generated tokens.

    Cell colour = top-1 probability, cell text = top-1 token; cells whose top-1 equals the token
    finally generated are outlined and bold. Sized to stay readable at 32 layers x 40 tokens.
    """
    n_rows, n_cols = result.top_ids.shape[:2]
    probs = result.top_probs[..., 0].numpy()
    fig = _figure(max(4.0, 0.62 * n_cols + 2.5), max(3.0, 0.28 * n_rows + 1.8))
    ax = fig.add_subplot()
    im = ax.imshow(probs, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1)
    words = result.top_tokens()
    match = (result.top_ids[..., 0] == result.target_ids[None]).numpy()
    size = 7 if n_cols <= 24 else 6
    for r in range(n_rows):
        for c in range(n_cols):
            dark = probs[r, c] < 0.6
            ax.text(c, r, clean_token(words[r][c], 8), ha="center", va="center", fontsize=size,
                    color="white" if dark else "black", fontweight="bold" if match[r, c] else "normal")
            if match[r, c]:
                ax.add_patch(_cell_outline(c, r))
    ax.set_xticks(range(n_cols), [clean_token(t) for t in result.tokens], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), result.layer_labels or [str(i) for i in range(n_rows)], fontsize=7)
    ax.set_xlabel("generated token")
    ax.set_ylabel("residual stream (layer)")
    ax.set_title("Logit lens: top-1 decoding (outlined = final token)")
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label="top-1 probability")
    return _save(fig, Path(path), formats)


def _cell_outline(c: int, r: int):
    from matplotlib.patches import Rectangle
    return Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="#ff7f0e", linewidth=1.2)


def plot_target_curve(result: LogitLens, path: str | Path) -> list[Path]:
    """Probability (left) and rank (right, log) of each finally generated token, per layer."""
    fig = _figure(11, 4)
    ax_p, ax_r = fig.subplots(1, 2)
    layers = np.arange(result.n_layers)
    probs, ranks = result.target_probs.numpy(), result.target_ranks.numpy()
    for s in range(probs.shape[1]):
        ax_p.plot(layers, probs[:, s], color="#1f77b4", alpha=0.25, linewidth=0.8)
        ax_r.plot(layers, ranks[:, s] + 1, color="#1f77b4", alpha=0.25, linewidth=0.8)
    ax_p.plot(layers, probs.mean(1), color="black", linewidth=2, label="mean over tokens")
    ax_r.plot(layers, np.exp(np.log(ranks + 1).mean(1)), color="black", linewidth=2, label="geometric mean")
    ax_p.set(xlabel="residual stream (layer)", ylabel="p(final token)", ylim=(0, 1),
             title="Probability of the generated token")
    ax_r.set(xlabel="residual stream (layer)", ylabel="rank + 1", yscale="log", title="Rank of the generated token")
    step = max(1, math.ceil(len(layers) / 12))  # readable ticks up to 33 residual layers
    for ax in (ax_p, ax_r):
        ax.set_xticks(layers[::step])
        if result.layer_labels:
            ax.set_xticklabels(result.layer_labels[::step], rotation=45, ha="right", fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def plot_vision_share(share: VisionShare, path: str | Path, layer: Optional[int] = None) -> list[Path]:
    """Stacked bars per generated token: attention share on image / prompt / generated keys.

    Averaged over layers and heads, or over heads of one ``layer``.
    """
    values = (share.mean if layer is None else share.per_layer[:, layer]).numpy()
    n = values.shape[0]
    fig = _figure(max(5.0, 0.35 * n + 2), 3.6)
    ax = fig.add_subplot()
    bottom = np.zeros(n)
    for k, name in enumerate(share.segments):
        ax.bar(np.arange(n), values[:, k], bottom=bottom, color=SEGMENT_COLORS[k], label=name, width=0.85)
        bottom += values[:, k]
    ax.set_xticks(range(n), [clean_token(t) for t in share.tokens], rotation=60, ha="right", fontsize=8)
    ax.set(ylim=(0, 1), ylabel="attention share",
           title="Attention share per token" + ("" if layer is None else f" (layer {layer})"))
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return _save(fig, Path(path))


def _overlay(ax, image: Image.Image, heat: np.ndarray, title: str) -> None:
    ax.imshow(np.asarray(image))
    vmax = float(np.nanmax(heat)) if np.isfinite(heat).any() and np.nanmax(heat) > 0 else 1.0
    extent = (-0.5, image.width - 0.5, image.height - 0.5, -0.5)
    ax.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=vmax, extent=extent)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def plot_heatmap(image: Image.Image, heat: torch.Tensor, path: str | Path, title: str = "") -> list[Path]:
    """One heatmap ``heat [H, W]`` (image-sized, e.g. from ``grounding.paint``) over the image."""
    fig = _figure(5, 5 * image.height / max(image.width, 1) + 0.4)
    _overlay(fig.add_subplot(), image, heat.float().numpy(), title)
    return _save(fig, Path(path))


def plot_heatmap_grid(image: Image.Image, heats: torch.Tensor, titles: Sequence[str], path: str | Path,
                      n_cols: int = 8) -> list[Path]:
    """All steps' heatmaps ``heats [S, H, W]`` over the image in one figure."""
    n = heats.shape[0]
    n_cols = max(1, min(n_cols, n))
    n_rows = math.ceil(n / n_cols)
    aspect = image.height / max(image.width, 1)
    fig = _figure(2.2 * n_cols, (2.2 * aspect + 0.35) * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).flatten()
    for i, ax in enumerate(axes):
        if i < n:
            _overlay(ax, image, heats[i].float().numpy(), f"{i}: {clean_token(titles[i])}")
        else:
            ax.axis("off")
    return _save(fig, Path(path))
