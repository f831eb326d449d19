"""Attention knockout: cut the answer position off from the image in windows of layers.

Neo et al. 2024 / Zhang et al. 2024: block the attention from the last position to the image
positions in a window of layers (zero those columns of the last query row of
``blocks.l.attn.hook_pattern`` and renormalise the row) and see how much the answer's
probability drops: the layers where it drops are where image information reaches the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def _block_image(positions: torch.Tensor):
    def hook(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
        out = pattern.clone()
        row = out[:, :, -1]
        row[..., positions] = 0
        out[:, :, -1] = row / row.sum(-1, keepdim=True).clamp_min(1e-12)
        return out
    return hook


@torch.no_grad()
def knockout_prob(lens: Any, image: Any, question: str, prefix_ids: Sequence[int], target_id: int,
                  layers: Sequence[int]) -> float:
    """Probability of ``target_id`` after prompt + ``prefix_ids`` with image attention blocked in ``layers``.

    Only the last position's attention is blocked (the position that predicts ``target_id``).
    ``layers=[]`` is the unmodified forward through the bridge.
    """
    inputs, span = lens.prepare(image, question)
    ids = torch.cat([inputs.input_ids, torch.tensor([list(prefix_ids)], dtype=torch.long)], 1).to(lens.device)
    hook = _block_image(span.positions.to(lens.device))
    hooks = [(f"blocks.{layer}.attn.hook_pattern", hook) for layer in layers]
    logits = lens.bridge.run_with_hooks(ids, pixel_values=inputs.pixel_values.to(lens.device, lens.dtype),
                                        fwd_hooks=hooks)
    return float(logits[0, -1].float().softmax(-1)[target_id])


@dataclass
class Knockout:
    """Answer probability with the image blocked in each window of layers."""

    windows: list[tuple[int, ...]]
    probs: torch.Tensor
    baseline: float
    """No knockout."""
    all_layers: float
    """Image blocked in every layer."""


def knockout_windows(lens: Any, image: Any, question: str, prefix_ids: Sequence[int], target_id: int,
                     window: int = 1) -> Knockout:
    """Knock the image out in every window of ``window`` consecutive layers (plus none / all)."""
    n = lens.n_layers
    windows = [tuple(range(s, s + window)) for s in range(n - window + 1)]
    probs = torch.tensor([knockout_prob(lens, image, question, prefix_ids, target_id, w) for w in windows])
    base = knockout_prob(lens, image, question, prefix_ids, target_id, [])
    everything = knockout_prob(lens, image, question, prefix_ids, target_id, list(range(n)))
    return Knockout(windows, probs, base, everything)
