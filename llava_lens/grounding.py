"""Where each generated token looked: vision-attention share and image-grounded maps.

Pure functions of a :class:`~llava_lens.Trace` (the model is never run). ``S`` below is the
number of generated steps, ``L`` language-model layers, ``H`` heads, ``n`` image-feature
positions (``len(trace.vision_span)``), ``(rows, cols)`` a grid of ``trace.vision_span.grids``.

Maps (each ``[S, rows, cols]``):

- :func:`attention_map_mean`: LLM attention to image positions, mean over heads and layers.
- :func:`attention_map_max`: max over heads, mean over layers.
- :func:`vlm_visualizer_map`: VLM-Visualizer's combination: each image token's ViT attention
  map, weighted by the LLM's attention to that token (base grid only; first token zeroed per
  layer as in the original, or kept with ``drop_first_token=False``).
- :func:`vit_rollout_map`: ViT attention rollout (Abnar & Zuidema 2020), prompt-independent.

:func:`paint` puts per-position values on an image-sized array via ``VisionSpan.boxes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from llava_lens import hooks
from llava_lens.errors import UnsupportedModelError, ViewNotApplicableError
from llava_lens.families import VisionSpan, family_named
from llava_lens.trace import Trace

SEGMENTS = ("image", "prompt", "generated")


@dataclass
class VisionShare:
    """Share of each step's attention on image tokens, prompt text and generated text."""

    shares: torch.Tensor
    """``[S, L, H, 3]``: attention mass on ``SEGMENTS`` (image, prompt, generated); sums to 1."""
    tokens: list[str] = field(default_factory=list)
    """``S`` generated tokens."""
    segments: tuple[str, ...] = SEGMENTS

    @property
    def per_layer(self) -> torch.Tensor:
        """``[S, L, 3]``: mean over heads."""
        return self.shares.mean(2)

    @property
    def mean(self) -> torch.Tensor:
        """``[S, 3]``: mean over layers and heads."""
        return self.shares.mean((1, 2))


def _check_attention(trace: Trace) -> None:
    if not trace.steps or trace.steps[0].attention is None:
        raise ValueError("this view needs attention rows (trace with default_capture=True)")


def _layers(trace: Trace, layers: Optional[Sequence[int]]) -> list[int]:
    n = trace.info.n_layers
    return list(range(n)) if layers is None else [layer % n for layer in layers]


def vision_share(trace: Trace) -> VisionShare:
    """Attention share on image / prompt-text / generated-text keys, per step, layer and head.

    Image keys are all ``vision_span.positions`` (NeXT newline tokens included); prompt keys
    the other prompt positions; generated keys the positions ``>= prompt_len``.
    """
    _check_attention(trace)
    prompt_len = len(trace.prompt_ids)
    is_image = torch.zeros(prompt_len, dtype=torch.bool)
    is_image[trace.vision_span.positions] = True
    rows = []
    for step in trace.steps:
        att = step.attention.float()  # [L, H, keys]
        image = att[..., :prompt_len][..., is_image].sum(-1)
        prompt = att[..., :prompt_len][..., ~is_image].sum(-1)
        generated = att[..., prompt_len:].sum(-1)
        rows.append(torch.stack([image, prompt, generated], dim=-1))
    return VisionShare(torch.stack(rows), tokens=trace.tokens)


def image_attention(trace: Trace, layers: Optional[Sequence[int]] = None, *, steps: Optional[Sequence[int]] = None,
                    heads: Optional[Sequence[int]] = None, reduce: Optional[str] = None) -> torch.Tensor:
    """``[S, L', H', n]``: each step's attention on every image-feature position, in fp32.

    ``layers`` / ``steps`` / ``heads`` select (default: all); ``reduce="mean"`` or ``"max"`` reduces
    over heads (``[S, L', n]``). Built one step at a time, so a reduced result never holds the full
    stack, which is ``4·S·L·H·n`` bytes: 300 MB for LLaVA-NeXT (2,340 image features) at 32 steps.
    """
    _check_attention(trace)
    if reduce not in (None, "mean", "max"):
        raise ValueError(f"reduce must be None, 'mean' or 'max', not {reduce!r}")
    sel = _layers(trace, layers)
    pos = trace.vision_span.positions
    chosen = trace.steps if steps is None else [trace.steps[i] for i in steps]

    def one(step) -> torch.Tensor:
        att = step.attention[sel][..., pos]
        att = (att if heads is None else att[:, list(heads)]).float()
        return att if reduce is None else att.mean(1) if reduce == "mean" else att.amax(1)

    return torch.stack([one(s) for s in chosen])


def attention_map_mean(trace: Trace, layers: Optional[Sequence[int]] = None, tile: int = 0,
                       heads: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``[S, rows, cols]``: LLM attention to the patches of grid ``tile``, mean over heads and layers.

    ``heads`` restricts the mean to those heads (of every selected layer): on the embedded model one
    head (``layers=[2], heads=[2]``) carries the image to the answer and points far better than the
    mean over all heads (docs/grounding.md).
    """
    per_pos = image_attention(trace, layers, heads=heads, reduce="mean").mean(1)
    return trace.vision_span.to_grid(per_pos, tile)


def attention_map_max(trace: Trace, layers: Optional[Sequence[int]] = None, tile: int = 0) -> torch.Tensor:
    """``[S, rows, cols]``: LLM attention to the patches of grid ``tile``, max over heads, mean over layers."""
    per_pos = image_attention(trace, layers, reduce="max").mean(1)
    return trace.vision_span.to_grid(per_pos, tile)


def vit_attention(trace: Trace) -> torch.Tensor:
    """``[V, T, T]``: base-tile ViT attention, mean over heads, of the layers feeding the projector.

    ``T = 1 + patches`` for CLIP (token 0 is CLS), ``T = patches`` for SigLIP (no CLS; see
    :func:`_vit_prefix`). Read from the prefill summary (``prefill_cache=True``) or from raw
    ``vision_encoder.encoder_layers.L.attn.hook_pattern`` captures. A family whose ViT attention
    these views cannot read (``Family.vit_views``, e.g. Qwen2.5-VL's windows) is a one-line error.
    """
    reason = _vit_views_reason(trace)
    if reason:
        raise ViewNotApplicableError(reason)
    summary = trace.summary
    if summary is not None and summary.vit_attention is not None and \
            summary.vit_layers == trace.info.vit_layers_used:
        return summary.vit_attention.float()
    mats = []
    for layer in trace.info.vit_layers_used:
        name = hooks.vit_pattern(layer)
        if name not in trace.prefill:
            raise ValueError(f"this map needs the vision encoder's attention: trace with prefill_cache=True ({name})")
        pat = trace.prefill[name].float()
        mats.append((pat[0] if pat.ndim == 4 else pat).mean(0))  # NeXT: [tiles, heads, T, T]; tile 0 = base
    return torch.stack(mats)


def _vit_views_reason(trace: Trace) -> Optional[str]:
    try:
        return family_named(trace.info.family).vit_views
    except UnsupportedModelError:  # a trace of a family this version does not know: try the views
        return None


def _vit_prefix(trace: Trace, vit: torch.Tensor) -> int:
    """ViT tokens before the patches: 1 (CLIP's CLS) or 0 (SigLIP), from ``T`` and the base grid."""
    rows, cols = trace.vision_span.grids[0]
    return vit.shape[-1] - rows * cols


def _base_feature_positions(span: VisionSpan) -> torch.Tensor:
    """Indices into ``span`` of base-grid patches, ordered like the ViT's patch tokens."""
    sel = (span.tile == 0).nonzero().flatten()
    rows, cols = span.grids[0]
    order = span.row[sel] * cols + span.col[sel]
    return sel[order.argsort()]


def _first_token_dropped(trace: Trace, layers: Optional[Sequence[int]]) -> torch.Tensor:
    """``[S, len(layers), n]``: head-mean attention with key 0 zeroed and rows renormalised, on image keys.

    VLM-Visualizer's per-layer step: the first token (``<s>``) soaks up attention ("null
    attention"), so it is removed and each layer's row rescaled to sum 1 before layers are averaged.
    """
    _check_attention(trace)
    sel = _layers(trace, layers)
    out = []
    for step in trace.steps:  # steps have different numbers of keys
        rows = step.attention[sel].float().mean(1)  # [layers, keys]
        rows[:, 0] = 0
        rows = rows / rows.sum(-1, keepdim=True).clamp_min(1e-12)
        out.append(rows[:, trace.vision_span.positions])
    return torch.stack(out)


def vlm_visualizer_map(trace: Trace, layers: Optional[Sequence[int]] = None,
                       drop_first_token: bool = True) -> torch.Tensor:
    """``[S, rows, cols]`` on the base grid: VLM-Visualizer's LLM x ViT attention combination.

    The LLM's attention on each base-grid image token (per layer: mean over heads, the first
    token's attention zeroed and the row renormalised as VLM-Visualizer does; then mean over
    ``layers``; renormalised over those image tokens) weights that token's ViT attention map (mean
    over heads and the layers feeding the projector, CLS dropped, rows renormalised); the weighted
    maps are summed and scaled to max 1. ``drop_first_token=False`` skips the first-token step
    (llava-lens before 2.0: correlation >= 0.99 with the original on the embedded model).
    """
    vit = vit_attention(trace)
    k = _vit_prefix(trace, vit)
    vit = vit[:, k:, k:]  # [V, P, P], CLS dropped
    vit = (vit / vit.sum(-1, keepdim=True)).mean(0)
    idx = _base_feature_positions(trace.vision_span)
    if drop_first_token:
        llm = _first_token_dropped(trace, layers).mean(1)[:, idx]  # [S, P]
    else:
        llm = image_attention(trace, layers, reduce="mean").mean(1)[:, idx]  # [S, P]
    llm = llm / llm.sum(-1, keepdim=True).clamp_min(1e-12)
    combined = llm @ vit  # [S, P]
    combined = combined / combined.amax(-1, keepdim=True).clamp_min(1e-12)
    rows, cols = trace.vision_span.grids[0]
    return combined.reshape(-1, rows, cols)


def vit_rollout(trace: Trace, query: str = "cls") -> torch.Tensor:
    """``[rows, cols]``: ViT attention rollout over the layers feeding the projector.

    Each layer's head-mean attention gets the residual (``0.5 A + 0.5 I``, rows renormalised);
    the product over layers is read from the CLS row (``query="cls"``) or averaged over the
    patch rows (``query="patches"``, also used for a ViT without CLS, e.g. SigLIP). Normalised
    to sum 1 over patches.
    """
    att = vit_attention(trace)  # [V, T, T]
    eye = torch.eye(att.shape[-1])
    roll = eye
    for a in att:
        a = 0.5 * a + 0.5 * eye
        roll = (a / a.sum(-1, keepdim=True)) @ roll
    k = _vit_prefix(trace, att)
    vec = roll[0, k:] if query == "cls" and k else roll[k:, k:].mean(0)
    rows, cols = trace.vision_span.grids[0]
    return (vec / vec.sum()).reshape(rows, cols)


def vit_rollout_map(trace: Trace) -> torch.Tensor:
    """``[S, rows, cols]``: :func:`vit_rollout` repeated per step (a prompt-independent baseline)."""
    return vit_rollout(trace).expand(len(trace.steps), -1, -1).clone()


MAPS = {
    "llm_mean": attention_map_mean,
    "llm_max": attention_map_max,
    "vlm_visualizer": vlm_visualizer_map,
    "vlm_visualizer_keep_first": lambda trace, layers=None: vlm_visualizer_map(trace, layers, drop_first_token=False),
    "vit_rollout": lambda trace, layers=None: vit_rollout_map(trace),
}
"""Named map functions ``f(trace, layers=None) -> [S, rows, cols]`` on the base grid."""


def grid_to_positions(grid: torch.Tensor, span: VisionSpan, tile: int = 0) -> torch.Tensor:
    """Inverse of ``VisionSpan.to_grid``: ``[..., rows, cols] -> [..., n]`` (0 off the tile)."""
    out = grid.new_zeros(*grid.shape[:-2], len(span))
    sel = span.tile == tile
    out[..., sel] = grid[..., span.row[sel], span.col[sel]]
    return out


def paint(values: torch.Tensor, span: VisionSpan, tile: int = 0, size: Optional[tuple[int, int]] = None,
          fill: float = 0.0) -> torch.Tensor:
    """Paint per-position ``values [..., n]`` onto an image-sized array ``[..., H, W]``.

    Each position of grid ``tile`` fills its box (``VisionSpan.boxes``, fractions of the
    original image); ``size`` defaults to ``span.image_size``. Works for LLaVA-1.5 (centre
    crop: outside stays ``fill``) and NeXT (``tile=1`` paints the high-resolution grid).
    """
    h, w = size or span.image_size
    out = torch.full((*values.shape[:-1], h, w), fill, dtype=torch.float32)
    sel = (span.tile == tile).nonzero().flatten()
    boxes = span.boxes[sel]
    tops, bottoms = (boxes[:, 0] * h).round().long(), (boxes[:, 2] * h).round().long()
    lefts, rights = (boxes[:, 1] * w).round().long(), (boxes[:, 3] * w).round().long()
    vals = values.float()
    for i, t, b, l, r in zip(sel.tolist(), tops.tolist(), bottoms.tolist(), lefts.tolist(), rights.tolist()):
        out[..., t:max(b, t + 1), l:max(r, l + 1)] = vals[..., i, None, None]
    return out


def paint_grid(grid: torch.Tensor, span: VisionSpan, tile: int = 0, size: Optional[tuple[int, int]] = None,
               fill: float = 0.0) -> torch.Tensor:
    """Paint a ``[..., rows, cols]`` map of grid ``tile`` onto ``[..., H, W]`` (see :func:`paint`)."""
    return paint(grid_to_positions(grid, span, tile), span, tile, size, fill)
