"""Matplotlib figures (Agg canvas, no pyplot state): logit lens, vision share, image heatmaps.

Every ``plot_*`` function takes result dataclasses / tensors (never the model) and returns a
:class:`matplotlib.figure.Figure` (a notebook shows it inline); :func:`save_figure` writes one.
Heatmaps use a perceptual colormap whose opacity follows the value, so the image's own colours
stay visible where the map is low, and each carries a colour bar naming its normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from llava_lens.grounding import VisionShare
from llava_lens.lens import LogitLens

SEGMENT_COLORS = ("#d62728", "#7f7f7f", "#1f77b4")
HEAT_CMAP = "inferno"
"""Perceptually uniform; dark at 0, where the overlay is also transparent."""
HEAT_ALPHA = 0.85
"""Opacity of the overlay at the map's maximum (it falls linearly to 0 at the minimum)."""


def escape_control(text: str) -> str:
    r"""``text`` with tabs, newlines and other control characters shown as escapes (``\t``, ``\x07``)."""
    named = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
    return "".join(named.get(ch, f"\\x{ord(ch):02x}") if ord(ch) < 32 or ord(ch) == 127 else ch
                   for ch in text)


def clean_token(token: str, width: int = 10) -> str:
    """A token made safe and short for matplotlib text: control chars escaped, no mathtext, ``▁``/``Ġ`` as space."""
    text = escape_control(token.replace("▁", " ").replace("Ġ", " ")).strip() or "␣"
    text = text.replace("$", r"\$")
    return text if len(text) <= width else text[: width - 1] + "…"


def figure(width: float, height: float) -> Figure:
    """A matplotlib Figure on an Agg canvas (no pyplot global state)."""
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, formats: Sequence[str] = ("png",), dpi: int = 110) -> list[Path]:
    """Write ``fig`` as ``path`` with each suffix in ``formats`` (parents created); return the paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        target = path.with_suffix("." + fmt)
        fig.savefig(target, dpi=dpi, bbox_inches="tight")
        out.append(target)
    return out


def plot_logit_lens(result: LogitLens) -> Figure:
    """Grid of top-1 decodings: rows layers (bottom = embeddings), columns generated tokens.

    Cell colour = top-1 probability, cell text = top-1 token; cells whose top-1 equals the token
    finally generated are outlined and bold. Sized to stay readable at 32 layers x 40 tokens.
    """
    n_rows, n_cols = result.top_ids.shape[:2]
    probs = result.top_probs[..., 0].float().numpy()
    fig = figure(max(4.0, 0.62 * n_cols + 2.5), max(3.0, 0.28 * n_rows + 1.8))
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
    fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label="top-1 probability (absolute, 0-1)")
    return fig


def _cell_outline(c: int, r: int):
    from matplotlib.patches import Rectangle
    return Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="#ff7f0e", linewidth=1.2)


def plot_target_curve(result: LogitLens) -> Figure:
    """Probability (left) and rank (right, log) of each finally generated token, per layer."""
    fig = figure(11, 4)
    ax_p, ax_r = fig.subplots(1, 2)
    layers = np.arange(result.n_layers)
    probs, ranks = result.target_probs.float().numpy(), result.target_ranks.numpy()
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
    return fig


def plot_vision_share(share: VisionShare, layer: int | None = None) -> Figure:
    """Stacked bars per generated token: attention share on image / prompt / generated keys.

    Averaged over layers and heads, or over heads of one ``layer``.
    """
    values = (share.mean if layer is None else share.per_layer[:, layer]).float().numpy()
    n = values.shape[0]
    fig = figure(max(5.0, 0.35 * n + 2), 3.6)
    ax = fig.add_subplot()
    bottom = np.zeros(n)
    for k, name in enumerate(share.segments):
        ax.bar(np.arange(n), values[:, k], bottom=bottom, color=SEGMENT_COLORS[k], label=name, width=0.85)
        bottom += values[:, k]
    ax.set_xticks(range(n), [clean_token(t) for t in share.tokens], rotation=60, ha="right", fontsize=8)
    ax.set(ylim=(0, 1), ylabel="attention share",
           title="Attention share per token" + ("" if layer is None else f" (layer {layer})"))
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


def heat_rgba(heat: np.ndarray, vmin: float = 0.0, vmax: float | None = None, cmap: str = HEAT_CMAP,
              alpha: float = HEAT_ALPHA) -> np.ndarray:
    """``[H, W, 4]`` RGBA overlay of ``heat``: colour and opacity both grow with the value.

    Low values are transparent, so the image shows through with its own colours (a purple object
    stays purple), instead of being tinted by a half-opaque colormap everywhere.
    """
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float64))
    top = float(heat.max()) if vmax is None else vmax
    scaled = np.clip((heat - vmin) / (top - vmin), 0, 1) if top > vmin else np.zeros_like(heat)
    rgba = colormaps[cmap](scaled)
    rgba[..., 3] = alpha * scaled
    return rgba


def _overlay(ax, image: Image.Image, heat: np.ndarray, title: str) -> None:
    ax.imshow(np.asarray(image.convert("RGB")))
    extent = (-0.5, image.width - 0.5, image.height - 0.5, -0.5)
    ax.imshow(heat_rgba(heat), extent=extent, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _relative_colorbar(fig: Figure, axes, label: str) -> None:
    mappable = ScalarMappable(Normalize(0, 1), colormaps[HEAT_CMAP])
    fig.colorbar(mappable, ax=axes, fraction=0.04, pad=0.02, label=label)


def plot_heatmap(image: Image.Image, heat: torch.Tensor, title: str = "") -> Figure:
    """One heatmap ``heat [H, W]`` (image-sized, e.g. from ``grounding.paint``) over the image.

    Scaled to the map's own maximum (colour bar: fraction of that maximum).
    """
    fig = figure(5.6, 5 * image.height / max(image.width, 1) + 0.4)
    ax = fig.add_subplot()
    _overlay(ax, image, heat.float().numpy(), clean_token(title, 80))
    _relative_colorbar(fig, ax, "fraction of this map's max (opacity follows value)")
    return fig


GRID_PANEL_PX = 320
"""Longest side, in pixels, of the picture in each panel of :func:`plot_heatmap_grid` (a panel is
about 240 px wide when saved; 32 full-size copies of a 640x480 photo and its overlays took 0.4 GB)."""


def _panel_size(image: Image.Image, heats: torch.Tensor) -> tuple[Image.Image, torch.Tensor]:
    """``image`` and ``heats [S, H, W]`` shrunk so the longest side is at most :data:`GRID_PANEL_PX`."""
    scale = GRID_PANEL_PX / max(image.width, image.height, 1)
    if scale >= 1:
        return image, heats
    height, width = max(1, round(image.height * scale)), max(1, round(image.width * scale))
    small = image.convert("RGB").resize((width, height), Image.BILINEAR)
    return small, torch.nn.functional.interpolate(heats[None].float(), size=(height, width), mode="nearest")[0]


def plot_heatmap_grid(image: Image.Image, heats: torch.Tensor, titles: Sequence[str], n_cols: int = 8) -> Figure:
    """All steps' heatmaps ``heats [S, H, W]`` over the image in one figure, each scaled to its own max.

    Panels are drawn from a copy of the image and maps at most :data:`GRID_PANEL_PX` pixels long.
    """
    n = heats.shape[0]
    n_cols = max(1, min(n_cols, n))
    n_rows = math.ceil(n / n_cols)
    aspect = image.height / max(image.width, 1)
    image, heats = _panel_size(image, heats)
    fig = figure(2.2 * n_cols + 0.8, (2.2 * aspect + 0.35) * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).flatten()
    for i, ax in enumerate(axes):
        if i < n:
            _overlay(ax, image, heats[i].float().numpy(), f"{i}: {clean_token(titles[i])}")
        else:
            ax.axis("off")
    _relative_colorbar(fig, list(axes), "fraction of each map's own max")
    return fig
