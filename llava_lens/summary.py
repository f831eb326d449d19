"""Per-example prefill records from one batched prefill forward: the summary and raw hook caches.

The :class:`~llava_lens.trace.PrefillSummary` is what the views read from the prefill, sized for
real models (formulas in BENCHMARKS.md): the text queries' attention rows for a few layers
instead of every layer's ``[H, T, T]`` pattern, the vision encoder's head-mean attention of the
base tile instead of ``[V, H, P, P]`` per tile, and the prompt positions' logit lens as top-k
instead of every residual stream.
"""

from __future__ import annotations

from typing import Any

import torch

from llava_lens.forward import ForwardOut, SummarySpec
from llava_lens.hooks import LM_PREFIX
from llava_lens.lens import resid_topk
from llava_lens.options import Capture
from llava_lens.trace import PrefillSummary

LENS_TOP_K = 5
"""Top-k tokens kept per layer and prompt position by the summary's logit lens."""
LENS_CHUNK = 8
"""Prompt positions decoded at once: ``(n_layers + 1) * LENS_CHUNK * d_vocab`` floats at a time
(34 MB for a 32-layer, 32k-vocabulary model; larger chunks are no faster on a GPU and cost peak memory)."""
IMAGE_PREFIXES = ("vision_encoder", "vision_projector")
"""Hooks whose batch dimension runs over images (tiles), not examples."""


def _image_counts(rows: list) -> list[int]:
    """Vision-encoder inputs per example: LLaVA-NeXT's tiles, else one image."""
    return [r.prepared.inputs.pixel_values.shape[1] if r.prepared.inputs.pixel_values.dim() == 5 else 1
            for r in rows]


def base_tiles(rows: list) -> torch.Tensor:
    """``[B]``: index of each example's base (whole-image) tile in the vision encoder's batch."""
    return torch.tensor([0] + _image_counts(rows)).cumsum(0)[:-1]


def summarize(lens: Any, out: ForwardOut, spec: SummarySpec, rows: list, capture: Capture) -> None:
    """Fill ``row.summary`` of every row from the prefill's ``out``."""
    longest = max(r.prepared.prompt_len for r in rows)
    for b, row in enumerate(rows):
        pad = longest - row.prepared.prompt_len
        n_q = int((~torch.isin(torch.arange(row.prepared.prompt_len), row.prepared.span.positions)).sum())
        queries = spec.queries[b, :n_q].cpu() - pad
        attention = torch.stack([out.text_rows[layer][b, :, :n_q, pad:] for layer in spec.layers])
        vit = torch.stack([out.vit_mean[layer][b] for layer in spec.vit_layers]) \
            if spec.vit_layers and out.vit_mean else None
        resid = out.full_resid[b, :, pad:] if out.full_resid is not None else None
        ids, probs = resid_topk(resid, lens.bridge, LENS_TOP_K, LENS_CHUNK) if resid is not None else (None, None)
        row.summary = PrefillSummary(
            text_positions=queries, layers=list(spec.layers),
            attention=attention.to("cpu", capture.attention_dtype),
            vit_layers=list(spec.vit_layers),
            vit_attention=vit.to("cpu", capture.attention_dtype) if vit is not None else None,
            lens_top_ids=ids, lens_top_probs=probs.to(capture.dtype) if probs is not None else None,
            resid_norms=resid.float().norm(dim=-1).cpu() if resid is not None else None,
        )


def _strip_pad(lens: Any, name: str, value: torch.Tensor, pad: int, longest: int) -> torch.Tensor:
    """One example's LM activation without its left-pad positions."""
    dim = lens.bridge._pos_slice_dim(name, lens.bridge.get_hook_point(name))
    dims = (-2, -1) if dim == -2 else (dim - 1 if dim > 0 else dim,)
    for d in dims:
        if value.shape[d] == longest:
            value = value.narrow(d, pad, longest - pad)
    return value


def split_prefill(lens: Any, prefill: dict[str, torch.Tensor], rows: list, longest: int,
                  dtype: torch.dtype) -> None:
    """Fill ``row.prefill`` with each example's share of the batched raw prefill captures."""
    starts = torch.tensor([0] + _image_counts(rows)).cumsum(0).tolist()
    for b, row in enumerate(rows):
        pad = longest - row.prepared.prompt_len
        own = {}
        for name, value in prefill.items():
            if name.startswith(IMAGE_PREFIXES):
                value = value[starts[b]:starts[b + 1]]
                value = value[0] if value.shape[0] == 1 and len(rows) == starts[-1] else value
            else:
                value = value[b]
                if name.startswith(LM_PREFIX) or pad:
                    value = _strip_pad(lens, name, value, pad, longest)
            own[name] = value.to("cpu", dtype if value.is_floating_point() else value.dtype).clone()
        row.prefill = own
