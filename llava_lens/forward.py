"""What one forward pass of the engine is asked for and returns, whichever implementation runs it.

Two implementations return the same :class:`ForwardOut` for the same :class:`Request`:
:class:`llava_lens.fastpath.FastForward` (HF's own modules and sdpa, computing only the attention
rows asked for) and :class:`llava_lens.bridgepath.BridgeForward` (every TransformerLens hook
fires). ``B`` = batch, ``L`` = LM layers, ``H`` = heads, ``K`` = keys, ``Q`` = summary queries,
``T`` = padded prompt length, ``P`` = ViT tokens per tile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class SummarySpec:
    """What the prefill summary needs from the prefill forward."""

    queries: torch.Tensor
    """``[B, Q]`` long: padded-sequence positions whose attention rows are kept (text queries)."""
    layers: list[int]
    """LM layers whose rows of ``queries`` are kept."""
    vit_layers: list[int]
    """Vision-encoder layers whose head-mean attention is kept."""
    vit_images: Optional[torch.Tensor] = None
    """``[B]`` long: index in the vision encoder's batch of each example's base (whole-image) tile;
    only those images' attention is computed (LLaVA-NeXT runs 5 tiles per example)."""
    resid: bool = True
    """Keep every LM layer's full residual stream (for the prompt positions' logit lens)."""


@dataclass
class Request:
    """One forward: the model's keyword arguments and what to record beyond the default."""

    kwargs: dict[str, Any]
    default: bool = True
    """Record the last position's attention rows and residual stream."""
    mid: bool = False
    """The residual stream includes each block's ``hook_resid_mid`` (see ``hooks.resid_stack``)."""
    summary: Optional[SummarySpec] = None
    names: Optional[Callable[[str], bool]] = None
    """Extra hooks recorded at the last position (bridge only)."""
    prefill_names: Optional[Callable[[str], bool]] = None
    """Hooks recorded over the whole sequence (bridge only)."""


@dataclass
class ForwardOut:
    """What a forward returns (tensors on the model's device, batch first)."""

    logits: torch.Tensor
    """``[B, d_vocab]``: logits of the last position."""
    past: Any
    """The HF KV cache to feed the next forward."""
    attention: Optional[torch.Tensor] = None
    """``[B, L, H, K]``: the last query's attention rows (pad keys get weight 0)."""
    resid: Optional[torch.Tensor] = None
    """``[B, R, d_model]``: the rows of ``hooks.resid_stack(L, mid)`` at the last position."""
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    prefill: dict[str, torch.Tensor] = field(default_factory=dict)
    text_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer -> ``[B, H, Q, K]`` attention rows of the summary's queries."""
    vit_mean: dict[int, torch.Tensor] = field(default_factory=dict)
    """ViT layer -> ``[B, P, P]`` head-mean attention of each example's base tile."""
    full_resid: Optional[torch.Tensor] = None
    """``[B, L + 1, T, d_model]`` when the summary asked for residuals."""


def attention_rows(query: torch.Tensor, key: torch.Tensor, mask: Optional[torch.Tensor], scaling: Optional[float],
                   index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention rows of some queries, from HF's attention-function arguments.

    ``query [B, H, Tq, D]``, ``key [B, Hkv, K, D]`` (grouped-query keys repeated), ``mask`` HF's
    4-d mask (bool: True = attend; float: additive) or None (causal over a cache-less prefill).
    ``index [B, Q]`` picks the query positions (default: the last). Returns ``[B, H, Q, K]`` float32.
    """
    batch, heads, n_q, _ = query.shape
    keys = key.float()
    if keys.shape[1] != heads:  # grouped-query attention: each kv head serves several query heads
        keys = keys.repeat_interleave(heads // key.shape[1], dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    n_k = keys.shape[2]
    if index is None:
        # The last query (every decode step's only one): it sees every key, so only padding can
        # mask it, and slicing replaces the gathers below (a few fewer small ops per layer and step).
        scores = (query[:, :, -1:].float() @ keys.transpose(-1, -2)) * scale  # [B, H, 1, K]
        if mask is not None:
            rows = mask[:, :, -1:, :n_k]
            scores = scores.masked_fill(~rows, float("-inf")) if rows.dtype == torch.bool else scores + rows
        return scores.softmax(-1)
    q = query.float().gather(2, index[:, None, :, None].expand(-1, heads, -1, query.shape[-1]))
    scores = (q @ keys.transpose(-1, -2)) * scale  # [B, H, Q, K]
    if mask is not None:
        rows = mask[:, :, :, :n_k].gather(2, index[:, None, :, None].expand(-1, mask.shape[1], -1, n_k))
        scores = scores.masked_fill(~rows, float("-inf")) if rows.dtype == torch.bool else scores + rows
    else:  # causal, no padding: query at position p (offset by any cached keys) sees keys <= p
        offset = n_k - n_q
        allowed = torch.arange(n_k, device=q.device)[None, None, :] <= (index + offset)[:, :, None]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1)
