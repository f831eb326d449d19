"""Forward passes through the TransformerLens bridge: every hook point fires.

Returns the same :class:`~llava_lens.forward.ForwardOut` as the fast path for the same
:class:`~llava_lens.forward.Request`, read from TransformerLens hooks
(``blocks.{L}.attn.hook_pattern``, ``blocks.{L}.hook_resid_pre``...) instead of attention
functions. Hooks are attached for one forward at a time, so a half-consumed ``lens.step(...)``
generator in a notebook leaves no hooks behind on the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from transformer_lens.utilities.slice import Slice

from llava_lens import hooks
from llava_lens.forward import ForwardOut, Request, SummarySpec

HookFn = Callable[[torch.Tensor, Any], None]


@contextlib.contextmanager
def attached(bridge: Any, fns: list[tuple[str, HookFn]]) -> Iterator[None]:
    """Forward hooks ``(hook name, fn(tensor, hook))`` on for the duration of the block."""
    handles = []
    try:
        for name, fn in fns:
            point = bridge.get_hook_point(name)
            handles.append((point, point.add_hook(fn, dir="fwd")))
        yield
    finally:
        for point, handle in handles:
            handle.hook.remove()
            point.fwd_hooks[:] = [h for h in point.fwd_hooks if h is not handle]


def caching_hooks(bridge: Any, names: Callable[[str], bool], store: dict, last_only: bool) -> list[tuple[str, HookFn]]:
    """TransformerLens' own caching hooks (batch kept), for every hook point ``names`` matches."""
    _, fwd, _ = bridge.get_caching_hooks(names, cache=store, pos_slice=Slice(-1) if last_only else None)
    return [(fn_name, fn) for fn_name, fn in fwd]


def _summary_hooks(spec: SummarySpec, n_layers: int, out: ForwardOut, full: list) -> list[tuple[str, HookFn]]:
    """Hooks filling the summary's text-query rows, ViT head means and full residual streams."""
    def rows(layer: int) -> HookFn:
        def fn(pattern: torch.Tensor, hook: Any) -> None:  # [B, H, T, K]
            index = spec.queries[:, None, :, None].expand(-1, pattern.shape[1], -1, pattern.shape[-1])
            out.text_rows[layer] = pattern.float().gather(2, index)
        return fn

    def vit(layer: int) -> HookFn:
        def fn(pattern: torch.Tensor, hook: Any) -> None:  # [images, H, P, P]
            images = spec.vit_images if spec.vit_images is not None else slice(None)
            out.vit_mean[layer] = pattern[images].float().mean(1)
        return fn

    def resid(index: int) -> HookFn:
        def fn(hidden: torch.Tensor, hook: Any) -> None:
            full[index] = hidden
        return fn

    fns = [(hooks.attn_pattern(layer), rows(layer)) for layer in spec.layers]
    fns += [(hooks.vit_pattern(layer), vit(layer)) for layer in spec.vit_layers]
    if spec.resid:
        fns += [(name, resid(i)) for i, name in enumerate(hooks.resid_stack(n_layers))]
    return fns


class BridgeForward:
    """Forward passes through the bridge, recording what a :class:`Request` asks from its hooks."""

    def __init__(self, lens: Any):
        self.bridge, self.n_layers = lens.bridge, lens.n_layers
        self.lock = lens.forward_lock
        self.patterns = {hooks.attn_pattern(i) for i in range(self.n_layers)}

    def _hooks(self, request: Request, out: ForwardOut, stores: dict[str, dict], full: list):
        fns: list[tuple[str, HookFn]] = []
        if request.default:
            defaults = self.patterns | set(hooks.resid_stack(self.n_layers, request.mid))
            fns += caching_hooks(self.bridge, defaults.__contains__, stores["default"], last_only=True)
        if request.names is not None:
            fns += caching_hooks(self.bridge, request.names, stores["extra"], last_only=True)
        if request.prefill_names is not None:
            fns += caching_hooks(self.bridge, request.prefill_names, stores["prefill"], last_only=False)
        if request.summary is not None:
            fns += _summary_hooks(request.summary, self.n_layers, out, full)
        return fns

    def __call__(self, request: Request) -> ForwardOut:
        """One forward of a (left-padded) batch through the bridge."""
        kwargs = dict(request.kwargs)
        input_ids = kwargs.pop("input_ids")
        out = ForwardOut(logits=torch.empty(0), past=None)
        stores: dict[str, dict] = {"default": {}, "extra": {}, "prefill": {}}
        full: list[Optional[torch.Tensor]] = [None] * (self.n_layers + 1)
        with self.lock, attached(self.bridge, self._hooks(request, out, stores, full)):
            logits, out.past = self.bridge(input_ids, return_type="logits_and_cache", **kwargs)
        out.logits = logits[:, -1]
        if request.default:
            store = stores["default"]
            out.attention = torch.stack([store[hooks.attn_pattern(i)] for i in range(self.n_layers)], dim=1)
            names = hooks.resid_stack(self.n_layers, request.mid)
            out.resid = torch.stack([store[name] for name in names], dim=1)
        # a hook point caches under its canonical name and the alias asked for: keep what was asked
        out.extra = {k: v for k, v in stores["extra"].items() if request.names(k)} if request.names else {}
        if request.prefill_names is not None:
            out.prefill = {k: v for k, v in stores["prefill"].items() if request.prefill_names(k)}
        if request.summary is not None and request.summary.resid:
            out.full_resid = torch.stack(full, dim=1)
        return out
