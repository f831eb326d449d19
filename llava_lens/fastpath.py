"""Fast forward passes: HF's own modules and sdpa, computing only the attention rows a trace keeps.

Booting the bridge replaces every submodule of the HF model by a TransformerLens component that
re-implements attention eagerly and routes each intermediate through a hook point. That makes
every hook available and costs most of a generation step (``benchmarks/bench_trace.py``). When a
trace asks only for the default capture and nobody has hooks on the bridge, this module instead

* puts the original HF modules back in place for the duration of one forward pass (under the
  lens's lock, so two threads never see half-swapped modules),
* runs attention with sdpa through registered HF attention functions that also compute, from the
  keys they were given, the last query's softmax row (``[B, H, K]`` per layer instead of an eager
  ``[B, H, T, T]``), the summary's text-query rows, and the vision encoder's head-mean attention,
* reads the residual stream with plain forward pre-hooks on the decoder layers.

What the attention functions record goes to a :class:`Sink` held in a context variable for the
duration of one forward, so concurrent traces (threads, nested calls) never share it. The tests
check this path against the bridge path and a no-cache ``run_with_cache`` recompute.
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.utils.hooks import RemovableHandle
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from llava_lens.forward import ForwardOut, Request, attention_rows

_FWD_HOOKS = operator.attrgetter("fwd_hooks")

LM_ATTENTION = "llava_lens_sdpa_rows"
VIT_ATTENTION = "llava_lens_sdpa_vit"
# Text towers whose attention goes through HF's attention interface with standard q/k layout.
SUPPORTED_TEXT_MODELS = ("llama", "mistral", "qwen2")


@dataclass
class Sink:
    """Where the attention functions of one forward leave what they computed."""

    request: Request
    vit_index: dict[int, int]
    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    text_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    vit_mean: dict[int, torch.Tensor] = field(default_factory=dict)
    resid: list[Optional[torch.Tensor]] = field(default_factory=list)
    """Last position's residual per ``hook_resid_pre`` and the last ``hook_resid_post`` (when default)."""
    full: Optional[list[Optional[torch.Tensor]]] = None
    """Every position's residuals, only when the summary asks (holding them costs L x T x d)."""


_SINK: contextvars.ContextVar[Optional[Sink]] = contextvars.ContextVar("llava_lens_sink", default=None)


def _lm_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, **kwargs: Any):
    """Sdpa attention that also records the rows the current :class:`Sink` asks for."""
    sink = _SINK.get()
    if sink is not None and sink.request.default and _row_is_the_attention(query, kwargs):
        row = attention_rows(query, key, attention_mask, scaling)  # [B, H, 1, K]
        sink.rows[module.layer_idx] = row[:, :, 0]
        return _apply_row(row, value), None
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if sink is not None:
        layer = module.layer_idx
        if sink.request.default:
            sink.rows[layer] = attention_rows(query, key, attention_mask, scaling)[:, :, 0]
        spec = sink.request.summary
        if spec is not None and layer in spec.layers:
            sink.text_rows[layer] = attention_rows(query, key, attention_mask, scaling, spec.queries)
    return out, None


def _row_is_the_attention(query: torch.Tensor, kwargs: dict[str, Any]) -> bool:
    """A float32 decode step (one query, no dropout): the row recorded is all its attention needs.

    Then ``row @ V`` replaces the sdpa call (the same float32 math; on a decode step sdpa does not
    tile), saving one pass over the keys per layer and step. Lower precisions keep HF's sdpa, whose
    rounding differs from a float32 product.
    """
    return query.shape[2] == 1 and query.dtype == torch.float32 and not kwargs.get("dropout") \
        and kwargs.get("position_bias") is None


def _apply_row(row: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``row [B, H, 1, K] @ value [B, Hkv, K, D]`` in sdpa_attention_forward's output layout ``[B, 1, H, D]``."""
    heads = row.shape[1]
    if value.shape[1] != heads:  # grouped-query attention: each kv head serves several query heads
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    return (row @ value).transpose(1, 2)


def _vit_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, **kwargs: Any):
    """Sdpa attention of the vision encoder that also records its head-mean pattern when asked."""
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    sink = _SINK.get()
    if sink is not None and sink.request.summary is not None:
        layer = sink.vit_index.get(id(module))
        spec = sink.request.summary
        if layer in spec.vit_layers:
            images = spec.vit_images if spec.vit_images is not None else torch.arange(query.shape[0])
            q, k = query[images].float(), key[images].float()  # base tiles only
            scores = (q @ k.transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5)
            if attention_mask is not None:
                scores = scores + attention_mask[images]
            sink.vit_mean[layer] = scores.softmax(-1).mean(1)  # [B, P, P]
    return out, None


AttentionInterface.register(LM_ATTENTION, _lm_attention)
AttentionInterface.register(VIT_ATTENTION, _vit_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(LM_ATTENTION, sdpa_mask)
ALL_MASK_ATTENTION_FUNCTIONS.register(VIT_ATTENTION, sdpa_mask)


def supported(lens: Any) -> bool:
    """Whether this model's text tower can run on the fast path."""
    return getattr(lens.config.text_config, "model_type", "") in SUPPORTED_TEXT_MODELS


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


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.original_component if isinstance(module, GeneralizedComponent) else module


def _vit_attention_modules(model: torch.nn.Module) -> dict[int, int]:
    """``id(attention module) -> layer`` for the vision encoder (its attention knows no layer index)."""
    encoder = _unwrap(model.model.vision_tower)
    layers = getattr(getattr(encoder, "vision_model", encoder), "encoder", None)
    layers = getattr(layers, "layers", [])
    return {id(_unwrap(_unwrap(layer).self_attn)): i for i, layer in enumerate(layers)}


def _swap_plan(swaps: list[tuple[torch.nn.Module, str, GeneralizedComponent]], to_hf: bool) -> list[tuple[dict, dict]]:
    """``(parent._modules, {name: module})`` per parent: what one direction of the swap writes.

    Resolved once: ``original_component`` is a property, and one ``dict.update`` per parent
    is the cheapest way to put a few hundred modules in place on every forward.
    """
    plan: dict[int, tuple[dict, dict]] = {}
    for parent, name, comp in swaps:
        children, writes = plan.setdefault(id(parent), (parent._modules, {}))
        writes[name] = comp.original_component if to_hf else comp
    return list(plan.values())


def _swap(plan: list[tuple[dict, dict]]) -> None:
    for children, writes in plan:
        children.update(writes)


class _AttnImplementation:
    """``config._attn_implementation``, read and written without the config's attribute machinery.

    Configs route every attribute access through ``__getattribute__`` overrides, and the setter
    walks ``sub_configs``; text and vision configs have none, so reading and writing the field the
    property stores into is the same, and ~20x cheaper (it happens four times per forward).
    """

    FIELD = "_attn_implementation_internal"

    def __init__(self, config: Any):
        self.config = config
        direct = not config.sub_configs and self.FIELD in vars(config)
        self.fields = vars(config) if direct else None

    def get(self) -> Any:
        """The current implementation name."""
        return self.fields[self.FIELD] if self.fields is not None else self.config._attn_implementation

    def set(self, name: Any) -> None:
        """Switch to ``name`` (a registered attention function)."""
        if self.fields is not None:
            self.fields[self.FIELD] = name
        else:
            self.config._attn_implementation = name


class FastForward:
    """Runs the wrapped HF model un-bridged, one forward at a time, recording what a Request asks."""

    def __init__(self, lens: Any):
        self.model = lens.hf_model
        self.lock = lens.forward_lock
        # unique hook points, gathered once: `bridge.hook_dict` rebuilds a dict of ~20 entries per
        # layer on every access, too slow to consult on every step
        self.hook_points = list({id(hp): hp for hp in lens.bridge.hook_dict.values()}.values())
        self.swaps = _swaps(self.model)
        self._to_hf, self._to_bridge = _swap_plan(self.swaps, True), _swap_plan(self.swaps, False)
        self.layers = [_unwrap(layer) for layer in self.model.model.language_model.layers]
        # the HF modules, not the bridge components that stand in them while bridged
        self.mid_norms = [_unwrap(layer.post_attention_layernorm) for layer in self.layers]
        self.configs = (self.model.config.text_config, self.model.config.vision_config)
        self._impls = [(_AttnImplementation(config), name)
                       for config, name in zip(self.configs, (LM_ATTENTION, VIT_ATTENTION))]
        self.vit_index = _vit_attention_modules(self.model)
        self._depth = 0
        self._hook_scan = (-1, True)  # (handle counter at the last scan, whether it found hooks)
        self._mid_hooked = False
        self._add_resid_hooks()

    def bridge_has_hooks(self) -> bool:
        """True when any TransformerLens forward hook is attached: then every hook point must fire.

        (Backward hooks cannot fire under the engine's ``inference_mode``.)
        """
        # Scanning every hook point costs ~0.05 us each (hundreds per model) on every forward.
        # Registering any torch hook anywhere (TransformerLens' add_hook does) takes a new handle
        # id, so while the id counter stands still and the last scan found nothing, nothing can
        # have been attached since; removals only matter after a scan that found hooks.
        # (The counter is read before the scan, and stamp and answer are stored as one tuple, so
        # a thread racing a hook's registration leaves a stale stamp: the next call scans again.)
        stamp = RemovableHandle.next_id
        seen, hooked = self._hook_scan
        if stamp != seen or hooked:
            hooked = any(map(_FWD_HOOKS, self.hook_points))
            self._hook_scan = (stamp, hooked)
        return hooked

    @contextlib.contextmanager
    def _unbridged(self) -> Iterator[None]:
        with self.lock:
            self._depth += 1
            if self._depth > 1:  # a nested forward (e.g. from a hook) runs inside the outer swap
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            saved = [impl.get() for impl, _ in self._impls]
            _swap(self._to_hf)
            for impl, name in self._impls:
                impl.set(name)
            try:
                yield
            finally:
                for (impl, _), name in zip(self._impls, saved):
                    impl.set(name)
                _swap(self._to_bridge)
                self._depth -= 1

    def _add_resid_hooks(self) -> None:
        """Forward (pre-)hooks on the decoder layers that fill the current sink's residuals.

        The sink's ``resid`` gets the rows of ``hooks.resid_stack`` (mid rows too when asked),
        its ``full`` only the ``hook_resid_pre`` rows and the last ``hook_resid_post``.
        Registered once, for the life of the model: they do nothing unless a fast forward of this
        thread has set a sink (the bridge path runs the same modules and finds none), so nothing
        is attached or removed per forward and an abandoned generator leaves nothing behind.
        """
        def keep(layer: int, hidden: torch.Tensor, mid: bool = False) -> None:
            sink = _SINK.get()
            if sink is None or not sink.resid or (mid and not sink.request.mid):
                return
            sink.resid[layer * (2 if sink.request.mid else 1) + mid] = hidden[:, -1]
            if sink.full is not None and not mid:  # only when asked: every layer's states cost L x T x d
                sink.full[layer] = hidden

        def pre_hook(layer: int, mid: bool = False):
            def hook(module, args, kwargs):
                keep(layer, args[0] if args else kwargs["hidden_states"], mid)
            return hook

        def last_hook(module, args, kwargs, output):
            keep(len(self.layers), output[0] if isinstance(output, tuple) else output)

        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
        self.layers[-1].register_forward_hook(last_hook, with_kwargs=True)
        self._mid_hooks = [pre_hook(i, True) for i in range(len(self.layers))]

    def _add_mid_hooks(self) -> None:
        """The ``hook_resid_mid`` hooks, added the first time a forward asks for them (then kept)."""
        # the residual between attention and MLP is what enters the post-attention norm
        for norm, hook in zip(self.mid_norms, self._mid_hooks):
            norm.register_forward_pre_hook(hook, with_kwargs=True)
        self._mid_hooked = True

    def __call__(self, request: Request) -> ForwardOut:
        """One HF forward of a (left-padded) batch; see :class:`~llava_lens.forward.ForwardOut`."""
        if request.names is not None or request.prefill_names is not None:
            raise ValueError("the fast path records the default capture only; use the bridge path")
        n = len(self.layers) + 1
        wants_full = request.summary is not None and request.summary.resid
        rows = 2 * n - 1 if request.mid else n
        # an empty `resid` list tells the hooks to record nothing
        sink = Sink(request, self.vit_index, resid=[None] * rows if request.default or wants_full else [],
                    full=[None] * n if wants_full else None)
        token = _SINK.set(sink)
        try:
            with self._unbridged():
                if request.mid and not self._mid_hooked:
                    self._add_mid_hooks()
                out = self.model(**request.kwargs, use_cache=True, logits_to_keep=1)
        finally:
            _SINK.reset(token)
        result = ForwardOut(out.logits[:, -1], out.past_key_values, text_rows=sink.text_rows,
                            vit_mean=sink.vit_mean)
        if request.default:
            result.attention = torch.stack([sink.rows[i] for i in range(n - 1)], dim=1)
            result.resid = torch.stack(sink.resid, dim=1)
        if sink.full is not None:
            result.full_resid = torch.stack(sink.full, dim=1)
        return result
