"""Contrastive maps (CARVE-style): task-question attention minus generic-question attention.

Attention that a generic instruction also produces (sinks, position biases, salient clutter) is
not about the question; subtracting it keeps what the question adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llava_lens.grounding import MAPS
from llava_lens.trace import Trace

GENERIC_QUESTION = "describe the image ."
"""A question every word of which is in the embedded model's vocabulary."""


def _unit(grid: torch.Tensor) -> torch.Tensor:
    return grid / grid.sum((-2, -1), keepdim=True).clamp_min(1e-12)


def contrastive_map(task: torch.Tensor, generic: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``task - generic`` (``[..., rows, cols]``), each first scaled to sum 1 when ``normalize``."""
    return _unit(task) - _unit(generic) if normalize else task - generic


@dataclass
class ContrastiveMaps:
    """The task map, the generic map and their difference, ``[rows, cols]`` each."""

    task: torch.Tensor
    generic: torch.Tensor
    difference: torch.Tensor


def generic_map(lens: Any, image: Any, method: str = "llm_mean", layers=None,
                question: str = GENERIC_QUESTION) -> torch.Tensor:
    """``[rows, cols]``: ``method``'s map at the first generated step for the generic question."""
    trace = lens.trace(image, question, max_new_tokens=1, prefill_cache=method in ("vlm_visualizer", "vit_rollout"))
    return MAPS[method](trace, layers)[0]


def contrastive_maps(lens: Any, trace: Trace, step: int, method: str = "llm_mean", layers=None,
                     question: str = GENERIC_QUESTION) -> ContrastiveMaps:
    """Contrast ``trace``'s map at ``step`` with the generic question's map on the same image."""
    task = MAPS[method](trace, layers)[step]
    generic = generic_map(lens, trace.image, method, layers, question)
    return ContrastiveMaps(task, generic, contrastive_map(task, generic))


def contrastive_map_fn(lens: Any, method: str = "llm_mean", question: str = GENERIC_QUESTION):
    """A ``MAPS``-style function ``f(trace, layers) -> [S, rows, cols]`` of contrastive maps (for scoring)."""
    memo: dict = {}

    def fn(trace: Trace, layers=None) -> torch.Tensor:
        key = (id(trace.image), None if layers is None else tuple(layers))
        if key not in memo:
            if any(k[0] != key[0] for k in memo):
                memo.clear()  # a new image: forget the last one's generic maps
            memo[key] = generic_map(lens, trace.image, method, layers, question)
        return contrastive_map(MAPS[method](trace, layers), memo[key])

    return fn
