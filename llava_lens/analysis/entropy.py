"""Entropy of each layer's attention over the image tokens (focused = low, diffuse = high)."""

from __future__ import annotations

import math

import torch

from llava_lens.grounding import image_attention
from llava_lens.trace import Trace


def row_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the last dim of ``p`` after renormalising it to sum 1 (0 log 0 = 0)."""
    p = p.float().clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def image_attention_entropy(trace: Trace, normalized: bool = False) -> torch.Tensor:
    """``[S, L]``: entropy of each head's attention restricted to image tokens, mean over heads.

    With ``normalized``, divided by ``log(n)`` (n image tokens): 1 = uniform, 0 = one token.
    """
    ent = torch.stack([row_entropy(image_attention(trace, steps=[i])[0]).mean(-1)  # [L, H] -> [L], step by step
                       for i in range(len(trace.steps))])
    return ent / math.log(len(trace.vision_span)) if normalized else ent
