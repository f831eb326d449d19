"""Per-head image focus: which LM heads look at the image, and which ones the image changes.

Two rankings of every (layer, head): the share of its attention on image tokens at one step
(from the Trace), and, VHD-style, how much its output ``hook_z`` at the answer position changes
when the image is replaced by a blank one (one teacher-forced forward per image, through the
bridge with ``run_with_cache``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from llava_lens.grounding import vision_share
from llava_lens.trace import Trace


@dataclass
class HeadFocus:
    """``[L, H]`` image attention share and blank-image output change of every head."""

    image_share: torch.Tensor
    blank_change: Optional[torch.Tensor] = None
    """``|z(image) - z(blank)| / |z(image)|`` at the answer position; None when not computed."""

    def ranking(self, by: str = "image_share") -> list[tuple[int, int, float]]:
        """``(layer, head, value)`` sorted from the highest value down."""
        values = getattr(self, by)
        n_heads = values.shape[1]
        order = values.flatten().argsort(descending=True).tolist()
        return [(i // n_heads, i % n_heads, float(values.flatten()[i])) for i in order]


def head_image_share(trace: Trace, step: int) -> torch.Tensor:
    """``[L, H]``: attention share on image tokens of every head at ``step``."""
    return vision_share(trace).shares[step, :, :, 0]


@torch.no_grad()
def head_z(lens: Any, image: Any, question: str, prefix_ids: Sequence[int]) -> torch.Tensor:
    """``[L, H, d_head]``: every head's ``blocks.l.attn.hook_z`` at the last position of prompt + prefix."""
    inputs, _ = lens.prepare(image, question)
    ids = torch.cat([inputs.input_ids, torch.tensor([list(prefix_ids)], dtype=torch.long)], 1).to(lens.device)
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(lens.n_layers)]
    _, cache = lens.bridge.run_with_cache(ids, pixel_values=inputs.pixel_values.to(lens.device, lens.dtype),
                                          names_filter=lambda name: name in names)
    return torch.stack([cache[name][0, -1].float().cpu() for name in names])


def head_blank_change(lens: Any, image: np.ndarray, question: str, prefix_ids: Sequence[int],
                      blank: Optional[np.ndarray] = None) -> torch.Tensor:
    """``[L, H]``: relative change of each head's output when the image is replaced by ``blank``.

    ``blank`` defaults to a canvas of the image's mean colour.
    """
    if blank is None:
        blank = np.empty_like(image)
        blank[:] = image.reshape(-1, image.shape[-1]).mean(0).astype(image.dtype)
    z_img = head_z(lens, image, question, prefix_ids)
    z_blank = head_z(lens, blank, question, prefix_ids)
    return (z_img - z_blank).norm(dim=-1) / z_img.norm(dim=-1).clamp_min(1e-12)


def head_focus(lens: Any, trace: Trace, step: int, image: Optional[np.ndarray] = None) -> HeadFocus:
    """Both rankings for ``step`` of ``trace`` (the blank-image change needs the model)."""
    image = np.asarray(trace.image) if image is None else image
    change = head_blank_change(lens, image, trace.question, trace.token_ids[:step])
    return HeadFocus(head_image_share(trace, step), change)
