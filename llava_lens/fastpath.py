"""Fast forward passes for tracing: HF's own modules and sdpa, capturing only what a Step needs.

What a step needs is the attention row of the last query and the residual stream at it (for
every element of a batch: :mod:`llava_lens.batch` steps several examples at once).

Booting the bridge replaces every submodule of the HF model by a TransformerLens component that
re-implements attention eagerly and routes each intermediate through a hook point. That is what
makes every hook available, and it costs (measured in ``benchmarks/bench_trace.py``) most of the
time of a generation step. When a trace asks only for the default capture (attention rows and
residual stream) and nobody has hooks on the bridge, this module instead

* puts the original HF modules back in place for the duration of one forward pass,
* runs attention with sdpa through a registered HF attention function that also computes
  ``softmax(q_last · Kᵀ · scale)`` for the last query from the keys it was given (the new key
  already appended to the KV cache), i.e. one row per layer instead of a full eager matrix,
* reads the residual stream with plain forward pre-hooks on the decoder layers.

The tests check it against the bridge path and against a no-cache ``run_with_cache`` recompute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional

import torch
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ROW_ATTENTION = "llava_lens_sdpa_row"
# Text towers whose attention goes through HF's attention interface with standard q/k layout.
SUPPORTED_TEXT_MODELS = ("llama", "mistral", "qwen2")

_sink: Optional[dict[int, torch.Tensor]] = None  # where the attention function leaves its rows


def _sdpa_with_last_row(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        scaling: Optional[float] = None, **kwargs: Any):
    """Sdpa attention that also records each batch element's last-query attention row in ``_sink``.

    Rows are ``[batch, heads, keys]``; each element's own mask row is applied, so left-pad keys of
    a padded batch get zero weight.
    """
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if _sink is not None:
        keys = repeat_kv(key, query.shape[1] // key.shape[1])  # [batch, heads, keys, d_head]
        q = query[:, :, -1:].float()                           # [batch, heads, 1, d_head]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = (q @ keys.float().transpose(-1, -2))[:, :, 0] * scale  # [batch, heads, keys]
        if attention_mask is not None:  # sliding windows, padding: apply the last query's mask row
            row = attention_mask[:, :, -1, : keys.shape[2]]  # [batch, 1 or heads, keys]
            scores = scores.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else scores + row
        _sink[module.layer_idx] = scores.softmax(-1)
    return out, None


AttentionInterface.register(ROW_ATTENTION, _sdpa_with_last_row)
ALL_MASK_ATTENTION_FUNCTIONS.register(ROW_ATTENTION, sdpa_mask)


def supported(lens: Any) -> bool:
    """Whether this model's text tower can run on the fast path."""
    return getattr(lens.config.text_config, "model_type", "") in SUPPORTED_TEXT_MODELS


def for_lens(lens: Any) -> FastForward:
    """The :class:`FastForward` of ``lens``, built once and kept on it.

    Building it walks every module of the model and every hook point of the bridge: too much to
    redo for each trace (and twice for a batched one).
    """
    forward = getattr(lens, "_fast_forward", None)
    if forward is None:
        forward = lens._fast_forward = FastForward(lens)
    return forward


def _swaps(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, GeneralizedComponent]]:
    """(parent, name, bridge component) for every HF submodule the bridge replaced."""
    found = []
    for parent in model.modules():
        if isinstance(parent, GeneralizedComponent):
            continue
        for name, child in parent._modules.items():
            if isinstance(child, GeneralizedComponent) and child.original_component is not None:
                found.append((parent, name, child))
    return found


class FastForward:
    """Runs the wrapped HF model un-bridged for one forward at a time, capturing what a Step needs."""

    def __init__(self, lens: Any):
        self.model = lens.hf_model
        # unique hook points, gathered once: `bridge.hook_dict` rebuilds a dict of ~20 entries
        # per layer on every access, too slow to consult on every step
        self.hook_points = list({id(hp): hp for hp in lens.bridge.hook_dict.values()}.values())
        self.swaps = _swaps(self.model)
        text_model = self.model.model.language_model
        self.layers = list(text_model.layers)
        # the text tower's layers, as HF modules (the bridge may have wrapped them)
        self.layers = [layer.original_component if isinstance(layer, GeneralizedComponent) else layer
                       for layer in self.layers]
        self.text_config = self.model.config.text_config
        self.vision_config = self.model.config.vision_config

    def bridge_has_hooks(self) -> bool:
        """True when any TransformerLens forward hook is attached: then every hook point must fire.

        (Backward hooks cannot fire under the tracer's ``inference_mode``.)
        """
        return any(hp.fwd_hooks for hp in self.hook_points)

    @contextlib.contextmanager
    def _unbridged(self) -> Iterator[None]:
        global _sink
        saved = (self.text_config._attn_implementation, self.vision_config._attn_implementation)
        for parent, name, comp in self.swaps:
            parent._modules[name] = comp.original_component
        self.text_config._attn_implementation = ROW_ATTENTION
        self.vision_config._attn_implementation = "sdpa"
        _sink = {}
        try:
            yield
        finally:
            _sink = None
            self.text_config._attn_implementation, self.vision_config._attn_implementation = saved
            for parent, name, comp in self.swaps:
                parent._modules[name] = comp

    def __call__(self, **model_kwargs: Any) -> tuple[torch.Tensor, Any, dict[str, torch.Tensor]]:
        """One HF forward of a single example; returns (last logits ``[d_vocab]``, KV cache, captures).

        Captured: ``attention [n_layers, n_heads, n_keys]`` and ``resid [n_layers + 1, d_model]``
        of the last position.
        """
        logits, past, captured = self.batched(**model_kwargs)
        return logits[0], past, {k: v[0] for k, v in captured.items()}

    def batched(self, **model_kwargs: Any) -> tuple[torch.Tensor, Any, dict[str, torch.Tensor]]:
        """One HF forward of a batch; returns (last logits ``[batch, d_vocab]``, KV cache, captures).

        Captured, per batch element: ``attention [batch, n_layers, n_heads, n_keys]`` (over all
        keys of the batch, pad columns included, with zero weight) and ``resid [batch, n_layers +
        1, d_model]`` of the last position. Pass ``attention_mask`` (and ``position_ids``) for a
        left-padded batch.
        """
        resid: list[Optional[torch.Tensor]] = [None] * (len(self.layers) + 1)

        def pre_hook(index: int):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                resid[index] = hidden[:, -1]
            return hook

        def last_hook(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            resid[-1] = hidden[:, -1]

        handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
                   for i, layer in enumerate(self.layers)]
        handles.append(self.layers[-1].register_forward_hook(last_hook, with_kwargs=True))
        try:
            with self._unbridged():
                out = self.model(**model_kwargs, use_cache=True, logits_to_keep=1)
                rows = _sink
        finally:
            for handle in handles:
                handle.remove()
        attention = torch.stack([rows[i] for i in range(len(self.layers))], dim=1)
        captured = {"attention": attention, "resid": torch.stack(resid, dim=1)}
        return out.logits[:, -1], out.past_key_values, captured
