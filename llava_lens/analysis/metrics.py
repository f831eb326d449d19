"""Scores of one image map against a ground-truth object mask (no model involved).

``heat`` is an image-sized map ``[H, W]`` (a patch map painted with
:func:`llava_lens.grounding.paint_grid`), ``mask`` a boolean ``[H, W]`` array.

- :func:`pointing_hit`: the map's maximum lies inside the mask (pointing game);
- :func:`energy_in_mask`: share of the (non-negative) map's mass inside the mask;
- :func:`obj_iou`, :func:`func_iou`, :func:`iou_f1`: TAM's plausibility metrics (Li et al., ICCV
  2025): IoU of the Otsu-thresholded map with the object mask for content words; for function words
  (whose map should be empty) the share of pixels below the content words' Otsu threshold;
- :func:`patch_chance`: the pointing game's chance level; :func:`auc`: area under a sampled curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from llava_lens.families import VisionSpan
from llava_lens.grounding import paint_grid

OTSU_BINS = 256
"""Histogram bins of :func:`otsu_threshold` (TAM thresholds 8-bit maps: 256 levels)."""


def as_tensor(x: Any) -> torch.Tensor:
    """``x`` as a tensor (numpy arrays and lists converted, tensors passed through)."""
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def pointing_hit(heat: Any, mask: Any) -> bool:
    """True when a maximal pixel of ``heat [H, W]`` lies inside boolean ``mask [H, W]``.

    Several pixels share the maximum when the map was painted from patches: the hit counts when
    any of them is in the mask (so the right chance level is the share of patches touching the
    mask, see :func:`patch_chance`). A constant map carries no information and never hits.
    """
    heat, mask = as_tensor(heat).float(), as_tensor(mask).bool()
    if heat.max() <= heat.min():
        return False
    return bool((mask & (heat == heat.max())).any())


def energy_in_mask(heat: Any, mask: Any) -> float:
    """Share of ``heat``'s mass (negative values clamped to 0) inside ``mask``; 0 for an empty map."""
    heat, mask = as_tensor(heat).float().clamp_min(0), as_tensor(mask).bool()
    total = float(heat.sum())
    return float(heat[mask].sum()) / total if total > 0 else 0.0


def patch_chance(span: VisionSpan, mask: Any) -> float:
    """Share of grid-0 patches whose box touches ``mask``: the pointing chance of a random patch."""
    rows, cols = span.grids[0]
    cells = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    painted = paint_grid(cells, span, size=tuple(as_tensor(mask).shape))
    touched = painted[as_tensor(mask).bool()].long().unique()
    return len(touched) / (rows * cols)


def auc(values: Sequence[float], fractions: Sequence[float]) -> float:
    """Area under a curve sampled at ``fractions`` (trapezoids; x in [0, 1])."""
    return float(np.trapezoid(np.asarray(values, dtype=float), np.asarray(fractions, dtype=float)))


def normalize_map(heat: Any) -> torch.Tensor:
    """``heat`` min-max scaled to [0, 1] (a constant map becomes all zeros)."""
    heat = as_tensor(heat).float()
    lo, hi = heat.min(), heat.max()
    return (heat - lo) / (hi - lo) if hi > lo else torch.zeros_like(heat)


def otsu_threshold(heat: Any, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of a map scaled to [0, 1]: the level maximising the between-class variance.

    Values are quantised to ``bins`` levels (as TAM's 8-bit maps are); pixels ``> threshold`` are
    foreground. Returns a value in [0, 1] (0 for a constant map).
    """
    levels = (normalize_map(heat).flatten() * (bins - 1)).round().long()
    hist = torch.bincount(levels, minlength=bins).double()
    p = hist / hist.sum()
    omega = p.cumsum(0)  # weight of the class <= t
    mu = (p * torch.arange(bins, dtype=torch.float64)).cumsum(0)
    between = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega)).clamp_min(1e-12)
    between[(omega <= 0) | (omega >= 1)] = -1  # a threshold that leaves one class empty
    return float(between.argmax()) / (bins - 1)


def obj_iou(heat: Any, mask: Any) -> float:
    """IoU of the Otsu foreground of ``heat`` (scaled to [0, 1]) with ``mask``; 0 for a flat map."""
    heat, mask = normalize_map(heat), as_tensor(mask).bool()
    if heat.max() <= 0:
        return 0.0
    pred = heat > otsu_threshold(heat)
    union = float((pred | mask).sum())
    return float((pred & mask).sum()) / union if union else 0.0


def func_iou(function_maps: Sequence[Any], content_maps: Sequence[Any]) -> float:
    """TAM's Func-IoU: how empty the maps of function words are (1 = empty, higher is better).

    The threshold is the mean Otsu threshold of the content words' maps (each scaled to [0, 1]);
    each function word's map (scaled the same way) scores the share of its pixels below it; the
    scores are averaged. NaN when either list is empty.
    """
    if not function_maps or not content_maps:
        return float("nan")
    thresh = float(np.mean([otsu_threshold(m) for m in content_maps]))
    return float(np.mean([float((normalize_map(m) < thresh).float().mean()) for m in function_maps]))


def iou_f1(obj: float, func: float) -> float:
    """Harmonic mean of Obj-IoU and Func-IoU (TAM's F1); 0 when both are 0."""
    return 2 * obj * func / (obj + func) if obj + func > 0 else 0.0
