"""Token Activation Maps (TAM; Li et al., ICCV 2025, github.com/xmed-lab/TAM).

A generated token's map is its class activation on the image: the logit of that token read from
the last layer's hidden state at every image position (``ln_final`` then ``W_U``, clipped at 0).
No attention is used. Two corrections follow TAM's code (``tam.py``):

- *Estimated causal inference* (ECI): the context tokens (the question's tokens and the tokens
  generated before) activate the image too; their maps, weighted by how much each context token's
  own position activates the current token (clipped at 0, normalised to sum 1; context tokens
  spelled like the current one left out), make an interference map; its least-squares multiple is
  subtracted and the result clipped at 0.
- *Rank Gaussian filter*: min-max scaling together with the context scores, then a 3x3 filter
  that sorts each window and averages it with Gaussian weights over the ranks, whose width is the
  window's coefficient of variation (robust to isolated outliers).

Differences from TAM's code, on purpose: the map of the first generated token is its own (TAM
returns the first prompt token's map there), every question token's class is its own id, and the
question tokens are the prompt positions between the image and the last prompt position. Maps
stay float (TAM quantises to 8 bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llava_lens import hooks
from llava_lens.errors import LlavaLensError
from llava_lens.trace import Trace


class TamError(LlavaLensError):
    """A trace TAM cannot read (no prefill residual of the last layer)."""


@dataclass
class TamLogits:
    """Last-layer logits of a trace at every position TAM reads (``V`` = vocabulary size)."""

    image: torch.Tensor
    """``[n, V]``: at the image-feature positions (``trace.vision_span`` order)."""
    context: torch.Tensor
    """``[Q + S, V]``: at the ``Q`` question positions, then at each step's query position."""
    context_ids: list[int]
    """``Q + S`` token ids: the question's tokens, then the generated tokens."""
    n_question: int


@torch.no_grad()
def tam_logits(lens: Any, trace: Trace) -> TamLogits:
    """Project the last layer's residual at every image / question / step position onto ``W_U``.

    Needs the raw prefill capture ``blocks.{L-1}.hook_resid_post`` (trace with
    ``prefill_cache=[llava_lens.hooks.resid_post(n_layers - 1)]``, plus any other names wanted) and
    the steps' residuals (``Step.resid``, default capture).
    """
    name = hooks.resid_post(trace.info.n_layers - 1)
    if name not in trace.prefill or trace.steps[0].resid is None:
        raise TamError(f"TAM needs the prefill's {name} and Step.resid: trace with prefill_cache=['{name}']")
    bridge = lens.bridge
    param = next(bridge.unembed.parameters())
    prompt = trace.prefill[name]
    last_image = int(trace.vision_span.positions.max())
    question = torch.arange(last_image + 1, prompt.shape[0] - 1)
    hidden = torch.cat([prompt[trace.vision_span.positions], prompt[question],
                        torch.stack([s.resid[-1] for s in trace.steps])])
    logits = bridge.unembed(bridge.ln_final(hidden[None].to(param.device, param.dtype)))[0].float().cpu()
    n, q = len(trace.vision_span), len(question)
    ids = trace.prompt_ids[question].tolist() + list(trace.token_ids)
    return TamLogits(logits[:n], logits[n:], ids, q)


def rank_gaussian_filter(grid: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """TAM's rank Gaussian filter of a ``[rows, cols]`` map (reflect padding, as ``np.pad``)."""
    pad = kernel_size // 2
    rows, cols = grid.shape
    x = F.pad(grid.double()[None, None], (pad, pad, pad, pad), mode="reflect")
    windows = F.unfold(x, kernel_size)[0].T.sort(-1).values  # [rows * cols, k * k], ascending
    mean = windows.mean(-1, keepdim=True)
    sigma = windows.std(-1, unbiased=False, keepdim=True) / mean.clamp_min(1e-300)
    ax = torch.arange(kernel_size ** 2, dtype=torch.float64) - kernel_size ** 2 // 2
    kernel = torch.exp(-ax ** 2 / (2 * sigma.clamp_min(1e-12) ** 2))
    value = (windows * kernel / kernel.sum(-1, keepdim=True)).sum(-1)
    value = torch.where(sigma[:, 0] > 0, value, mean[:, 0])  # a flat window: its value
    return torch.where(mean[:, 0] > 0, value, torch.zeros_like(value)).reshape(rows, cols).float()


def eci(image: torch.Tensor, context_maps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Remove the context's interference from ``image [n]``: ``relu(image - a * sum_i w_i map_i)``.

    ``weights [m]`` (clipped scores of the context tokens) are normalised to sum 1; ``a`` is the
    least-squares scale of the interference map onto ``image``.
    """
    if len(weights) == 0:
        return image
    w = weights / (weights.sum() + 1e-8)
    interference = (context_maps * w[:, None]).sum(0)
    denom = float((interference * interference).sum())
    if denom == 0:
        return image
    scale = float((image * interference).sum()) / denom
    return (image - scale * interference).clamp_min(0)


def _one_map(lg: TamLogits, s: int, use_eci: bool) -> torch.Tensor:
    """Per-position scores of step ``s`` (``[n]``, scaled to [0, 1] with the context scores)."""
    v = lg.n_question + s  # the explained token among question + generated tokens
    cls = lg.context_ids[v]
    img = lg.image[:, cls].clamp_min(0)
    # context scores at the question positions and at the query positions of steps 0..s (TAM's order)
    txt = lg.context[:v + 1, cls].clamp_min(0)
    if use_eci and v > 0:
        keep = [i for i in range(v) if lg.context_ids[i] != cls]
        maps = lg.image[:, [lg.context_ids[i] for i in keep]].T.clamp_min(0)
        img = eci(img, maps, txt[keep])
    both = torch.cat([img, txt[:-1]])  # the explained token's own score left out, as in TAM
    lo, hi = both.min(), both.max()
    return (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)


def tam_map(lens: Any, trace: Trace, tile: int = 0, use_eci: bool = True, rank_filter: bool = True) -> torch.Tensor:
    """``[S, rows, cols]``: the Token Activation Map of every generated token on grid ``tile``."""
    lg = tam_logits(lens, trace)
    out = []
    for s in range(len(trace.steps)):
        grid = trace.vision_span.to_grid(_one_map(lg, s, use_eci), tile)
        out.append(rank_gaussian_filter(grid) if rank_filter else grid)
    return torch.stack(out)
