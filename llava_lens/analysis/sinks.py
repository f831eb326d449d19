"""Visual attention sinks: image tokens with massive residual norms that soak up attention.

Kang et al. 2025 ("See What You Are Told") find a few image tokens whose hidden states have
massive norms; they draw attention whatever the question is, so raw attention maps light them
up. :func:`find_sinks` detects them from the prefill residual stream (norm > ``k`` x median over
image tokens); :func:`exclude_sinks` zeroes them in a map and renormalises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from llava_lens import hooks
from llava_lens.trace import Trace


@dataclass
class Sinks:
    """Residual norms of the image tokens and which of them are sinks."""

    norms: torch.Tensor
    """``[L, n]``: ``|blocks.l.hook_resid_pre|`` at every image position, per LM layer."""
    is_sink: torch.Tensor
    """``[n]`` bool: sink in any of the ``layers`` used for detection."""
    ratio: torch.Tensor
    """``[L, n]``: norm / median norm over image tokens of that layer."""
    k: float
    layers: list[int]

    @property
    def indices(self) -> list[int]:
        """Indices into the vision span of the sink tokens."""
        return self.is_sink.nonzero().flatten().tolist()


def find_sinks(trace: Trace, k: float = 3.0, layers: Optional[Sequence[int]] = None) -> Sinks:
    """Image tokens whose residual norm exceeds ``k`` x the median image-token norm.

    Reads the prefill's ``blocks.{l}.hook_resid_pre`` norms (``Trace.summary.resid_norms`` when
    traced with ``prefill_cache=True``, or the raw residuals); ``layers`` defaults to every layer
    but the first (the embeddings).
    """
    n_layers = trace.info.n_layers
    pos = trace.vision_span.positions
    names = [hooks.resid_pre(layer) for layer in range(n_layers)]
    if trace.summary is not None and trace.summary.resid_norms is not None:
        norms = trace.summary.resid_norms[:n_layers, pos].float()
    elif all(name in trace.prefill for name in names):
        norms = torch.stack([trace.prefill[name][pos].float().norm(dim=-1) for name in names])
    else:
        raise ValueError("find_sinks needs the prefill residual stream (trace with prefill_cache=True)")
    ratio = norms / norms.median(dim=-1, keepdim=True).values.clamp_min(1e-12)
    layers = list(range(1, n_layers)) if layers is None else [layer % n_layers for layer in layers]
    is_sink = (ratio[layers] > k).any(0)
    return Sinks(norms, is_sink, ratio, k, layers)


def exclude_sinks(grid: torch.Tensor, trace: Trace, sinks: Sinks) -> torch.Tensor:
    """A ``[..., rows, cols]`` map with the sink patches set to 0, renormalised to its former sum."""
    keep = 1 - trace.vision_span.to_grid(sinks.is_sink.float(), 0)
    out = grid * keep
    total, kept = grid.sum((-2, -1), keepdim=True), out.sum((-2, -1), keepdim=True)
    return out * (total / kept.clamp_min(1e-12))


def sink_excluded_map(map_fn, sinks_k: float = 3.0):
    """Wrap a ``grounding.MAPS`` function so its maps exclude the trace's sinks (for scoring)."""
    def fn(trace: Trace, layers=None) -> torch.Tensor:
        return exclude_sinks(map_fn(trace, layers), trace, find_sinks(trace, sinks_k))
    return fn
