"""Logit lens: what each layer's residual stream decodes to, for every generated step.

The projection uses TransformerLens' own primitives on the bridge: the recorded residuals are
wrapped in an :class:`transformer_lens.ActivationCache`, ``accumulated_resid(apply_ln=True)``
applies the model's final norm (``ln_final``, an RMSNorm for LLaMA, with statistics recomputed
per layer), and ``bridge.unembed`` applies ``W_U`` (+ ``b_U``). The result is a plain
:class:`LogitLens` dataclass that saves as safetensors + JSON, so views never need the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from transformer_lens import ActivationCache

from llava_lens import hooks
from llava_lens.tokens import token_strings
from llava_lens.trace import Trace

_TENSORS = ("top_ids", "top_probs", "target_ids", "target_probs", "target_ranks",
            "prompt_top_ids", "prompt_top_probs")


@dataclass
class LogitLens:
    """Logit-lens decodings of a :class:`Trace`.

    ``L`` rows as ``Step.resid``: ``n_layers + 1`` (row ``l < n_layers`` decodes
    ``blocks.l.hook_resid_pre``, the last row the final residual ``blocks.{n-1}.hook_resid_post``,
    which reproduces the model's output), or ``2 * n_layers + 1`` with each block's
    ``hook_resid_mid`` after its ``hook_resid_pre`` for a ``mid=True`` trace (prompt positions
    always have ``n_layers + 1``).
    ``S`` = generated steps, ``P`` = prompt positions, ``k`` = top-k kept.
    """

    top_ids: torch.Tensor
    """``[L, S, k]`` long: most likely tokens per layer and step."""
    top_probs: torch.Tensor
    """``[L, S, k]`` float: their probabilities."""
    target_ids: torch.Tensor
    """``[S]`` long: the token finally generated at each step."""
    target_probs: torch.Tensor
    """``[L, S]`` float: probability of the generated token per layer."""
    target_ranks: torch.Tensor
    """``[L, S]`` long: its rank (0 = top-1) per layer."""
    prompt_top_ids: torch.Tensor
    """``[L, P, k]`` long: top tokens at each prompt position (``P = 0`` when not computed)."""
    prompt_top_probs: torch.Tensor
    """``[L, P, k]`` float: their probabilities."""
    layer_labels: list[str] = field(default_factory=list)
    """``L`` labels (``"0_pre"`` ... ``"final_post"``), as ``accumulated_resid`` names them."""
    tokens: list[str] = field(default_factory=list)
    """``S`` generated tokens (the targets), as the tokenizer spells them."""
    vocab: dict[int, str] = field(default_factory=dict)
    """Spelling of every id appearing above, so views can label cells without a tokenizer."""

    @property
    def n_layers(self) -> int:
        """Number of decoded rows ``L`` (blocks + 1)."""
        return self.top_ids.shape[0]

    def top_tokens(self, prompt: bool = False) -> list[list[str]]:
        """Top-1 token strings as ``[L][S]`` (or ``[L][P]`` with ``prompt``)."""
        ids = (self.prompt_top_ids if prompt else self.top_ids)[..., 0]
        return [[self.vocab.get(int(i), str(int(i))) for i in row] for row in ids]

    def save(self, directory: str | Path) -> Path:
        """Write ``logit_lens.safetensors`` + ``logit_lens.json`` into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: getattr(self, k).contiguous() for k in _TENSORS}, out / "logit_lens.safetensors")
        meta = {"layer_labels": self.layer_labels, "tokens": self.tokens,
                "vocab": {str(k): v for k, v in self.vocab.items()}}
        (out / "logit_lens.json").write_text(json.dumps(meta, indent=1))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> LogitLens:
        """Inverse of :meth:`save`."""
        d = Path(directory)
        tensors = load_file(d / "logit_lens.safetensors")
        meta = json.loads((d / "logit_lens.json").read_text())
        return cls(**tensors, layer_labels=meta["layer_labels"], tokens=meta["tokens"],
                   vocab={int(k): v for k, v in meta["vocab"].items()})


def _decode(resid: torch.Tensor, bridge: Any) -> tuple[torch.Tensor, list[str]]:
    """Float32 log-probabilities on the model's device: ``[R, pos, d_model] -> [R, pos, d_vocab]``.

    ``R`` rows as ``hooks.resid_stack`` names them (with or without the mid-block rows).
    """
    param = next(bridge.unembed.parameters())
    n_layers = bridge.cfg.n_layers
    mid = hooks.has_mid(resid.shape[0], n_layers)
    names = hooks.resid_stack(n_layers, mid)
    cache = ActivationCache(dict(zip(names, resid.to(param.device, param.dtype))), bridge, has_batch_dim=False)
    with torch.inference_mode():
        normed, labels = cache.accumulated_resid(apply_ln=True, incl_mid=mid, return_labels=True)
        logits = torch.stack([bridge.unembed(layer[None])[0] for layer in normed])
    return logits.float().log_softmax(-1), labels


def decode_resid(resid: torch.Tensor, bridge: Any) -> tuple[torch.Tensor, list[str]]:
    """Log-probabilities of every layer's residual: ``resid [L, pos, d_model] -> [L, pos, d_vocab]`` (CPU).

    ``ln_final`` via ``ActivationCache.accumulated_resid(apply_ln=True)``, then ``bridge.unembed``.
    """
    logp, labels = _decode(resid, bridge)
    return logp.cpu(), labels


def resid_topk(resid: torch.Tensor, bridge: Any, k: int, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k logit-lens tokens of ``resid [L, pos, d_model]``: ids and probabilities ``[L, pos, k]`` (CPU).

    Decodes ``chunk`` positions at a time (memory ``L * chunk * d_vocab`` floats) and takes the
    top-k on the model's device, so only ``[L, pos, k]`` ever reaches the host.
    """
    ids, probs = [], []
    for sl in _chunks(resid.shape[1], chunk):
        top = _decode(resid[:, sl], bridge)[0].topk(min(k, bridge.cfg.d_vocab), dim=-1)
        ids.append(top.indices.cpu())
        probs.append(top.values.exp().cpu())
    return torch.cat(ids, 1), torch.cat(probs, 1)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _lens_steps(trace: Trace, bridge: Any, k: int, chunk: int):
    resid = torch.stack([s.resid for s in trace.steps], dim=1)  # [L, S, d]
    target = torch.tensor(trace.token_ids, dtype=torch.long)
    top_ids, top_probs, t_probs, t_ranks, labels = [], [], [], [], []
    for sl in _chunks(resid.shape[1], chunk):
        logp, labels = decode_resid(resid[:, sl], bridge)
        top = logp.topk(k, dim=-1)
        top_ids.append(top.indices)
        top_probs.append(top.values.exp())
        tgt = logp.gather(-1, target[sl].expand(logp.shape[0], -1)[..., None])  # [L, s, 1]
        t_probs.append(tgt[..., 0].exp())
        t_ranks.append((logp > tgt).sum(-1))
    return (torch.cat(top_ids, 1), torch.cat(top_probs, 1), target, torch.cat(t_probs, 1),
            torch.cat(t_ranks, 1), labels)


def _prompt_resid(trace: Trace, n_layers: int) -> Optional[torch.Tensor]:
    """``[n_layers + 1, prompt_len, d_model]`` from a raw prefill cache, or None when absent."""
    names = hooks.resid_stack(n_layers)
    if not all(n in trace.prefill for n in names):
        return None
    return torch.stack([trace.prefill[n] for n in names])


def _lens_prompt(trace: Trace, bridge: Any, n_layers: int, k: int, chunk: int):
    """Prompt positions' top-k: decoded from a raw prefill cache, else read from the summary."""
    resid = _prompt_resid(trace, n_layers)
    if resid is not None:
        return resid_topk(resid, bridge, k, chunk)
    summary = trace.summary
    if summary is not None and summary.lens_top_ids is not None:
        return summary.lens_top_ids[..., :k], summary.lens_top_probs[..., :k].float()
    empty = torch.zeros(n_layers + 1, 0, k)
    return empty.long(), empty


def logit_lens(trace: Trace, lens: Any, k: int = 5, prompt: bool = True, chunk: int = 8) -> LogitLens:
    """Decode every layer's residual stream at every generated step (and prompt position).

    Args:
        trace: a trace recorded with the default capture (``Step.resid``); prompt positions
            (image patches included) need ``prefill_cache=True`` (the summary keeps their top-5;
            a raw residual cache is decoded with ``k``), else they are skipped.
        lens: the :class:`llava_lens.LlavaLens` the trace came from (for ``ln_final``/``W_U``).
        k: top-k tokens kept per cell.
        prompt: also decode the prompt positions from ``trace.prefill``.
        chunk: positions decoded at once (memory: ``(n_layers + 1) * chunk * d_vocab`` floats).

    Returns:
        a :class:`LogitLens`; shapes in its docstring.
    """
    if not trace.steps or trace.steps[0].resid is None:
        raise ValueError("logit_lens needs a trace with residuals (trace with default_capture=True)")
    bridge, n_layers = lens.bridge, trace.info.n_layers
    k = min(k, trace.info.d_vocab)
    top_ids, top_probs, target, t_probs, t_ranks, labels = _lens_steps(trace, bridge, k, chunk)
    if prompt:
        p_ids, p_probs = _lens_prompt(trace, bridge, n_layers, k, chunk)
    else:
        p_ids, p_probs = torch.zeros(n_layers + 1, 0, k, dtype=torch.long), torch.zeros(n_layers + 1, 0, k)
    ids = torch.cat([top_ids.flatten(), p_ids.flatten(), target]).unique().tolist()
    vocab = dict(zip(ids, token_strings(lens.tokenizer, ids)))
    return LogitLens(top_ids, top_probs, target, t_probs, t_ranks, p_ids, p_probs,
                     layer_labels=labels, tokens=trace.tokens, vocab=vocab)


def patch_words(result: LogitLens, trace: Trace, layer: int = -1) -> list[str]:
    """Top-1 word each image-feature position decodes to at ``layer`` (Neo et al. 2024).

    Returns one string per ``trace.vision_span`` position (needs prompt decodings).
    """
    if result.prompt_top_ids.shape[1] == 0:
        raise ValueError("the logit lens was computed without prompt positions (prefill_cache)")
    ids = result.prompt_top_ids[layer, trace.vision_span.positions, 0]
    return [result.vocab.get(int(i), str(int(i))) for i in ids]
