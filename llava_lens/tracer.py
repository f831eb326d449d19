"""KV-cached stepping generation through the TransformerLens bridge, one :class:`Step` per token.

The prompt (image + question) is run once (the prefill); every later token is one forward of a
single position that reuses the KV cache. Hooks capture only the position that produces the next
token, so memory per step grows with layers x heads x sequence (attention rows), never with
layers x sequence x d_model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from transformer_lens.utilities.slice import Slice
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from llava_lens import fastpath
from llava_lens.trace import Step

NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]

# What the grounding, attention and logit-lens views need from the prefill (LM and vision encoder).
PREFILL_DEFAULT_SUFFIXES = ("attn.hook_pattern", "hook_resid_pre", "hook_resid_post")


@dataclass
class Sampling:
    """How the next token is chosen. Greedy unless ``do_sample`` (or a temperature/top-p is set)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def chooser(self, device: torch.device) -> Callable[[torch.Tensor], int]:
        """A function from ``[d_vocab]`` logits to the chosen token id."""
        if not self.do_sample:
            return lambda logits: int(logits.argmax())
        warpers = LogitsProcessorList()  # HF's own warpers: same semantics as `generate`
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())

        def choose(logits: torch.Tensor) -> int:
            scores = warpers(None, logits[None].float())
            return int(torch.multinomial(scores.softmax(-1), 1, generator=gen))

        return choose


def as_predicate(names: NamesFilter) -> Callable[[str], bool]:
    """TransformerLens-style names filter (None, a name, a list of names, a predicate)."""
    if names is None:
        return lambda name: False
    if isinstance(names, str):
        return lambda name: name == names
    if callable(names):
        return names
    wanted = set(names)
    return lambda name: name in wanted


def default_names(n_layers: int) -> list[str]:
    """Hooks every step captures by default: attention patterns and the residual stream."""
    return ([f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
            + [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
            + [f"blocks.{n_layers - 1}.hook_resid_post"])


class Capture:
    """Caching hooks resolved once, attached around each forward pass.

    Attaching per forward (rather than for a whole generator's life) means a half-consumed
    ``lens.step(...)`` generator in a notebook leaves no hooks behind on the model.
    """

    def __init__(self, bridge: Any, names: Callable[[str], bool], last_position_only: bool):
        self.store: dict[str, torch.Tensor] = {}
        _, fwd, _ = bridge.get_caching_hooks(
            names, remove_batch_dim=True, cache=self.store,
            pos_slice=Slice(-1) if last_position_only else None,
        )
        self._points = [(bridge.get_hook_point(name), fn) for name, fn in fwd]

    @contextlib.contextmanager
    def attached(self) -> Iterator[dict[str, torch.Tensor]]:
        """Hooks on for the duration of the block; yields the (cleared) store they fill."""
        self.store.clear()
        handles = [(point, point.add_hook(fn, dir="fwd")) for point, fn in self._points]
        try:
            yield self.store
        finally:
            for point, handle in handles:
                handle.hook.remove()
                point.fwd_hooks[:] = [h for h in point.fwd_hooks if h is not handle]


class BridgeForward:
    """Forward passes through the TransformerLens bridge: every hook point fires."""

    def __init__(self, lens: Any, capture: Callable[[str], bool], default_capture: bool):
        self.bridge, self.n_layers = lens.bridge, lens.n_layers
        self.defaults = default_names(self.n_layers) if default_capture else []
        self.capture = Capture(self.bridge, lambda n: n in self.defaults or capture(n), last_position_only=True)
        # A hook point caches under its canonical name and the alias asked for; keep what was asked.
        self.keep = lambda name: name not in self.defaults and capture(name)  # noqa: E731

    def __call__(self, prefill_names: Optional[Callable[[str], bool]] = None, **kwargs: Any):
        """One forward; returns (last logits, KV cache, captures, prefill captures)."""
        with contextlib.ExitStack() as stack:
            store = stack.enter_context(self.capture.attached())
            prefill = stack.enter_context(Capture(self.bridge, prefill_names, False).attached()) \
                if prefill_names else {}
            input_ids = kwargs.pop("input_ids")
            logits, past = self.bridge(input_ids, return_type="logits_and_cache", **kwargs)
        captured = {k: v for k, v in store.items() if self.keep(k)}
        if self.defaults:
            # One stack (and later one device->host copy) per step, not one per hook.
            n = self.n_layers
            captured["attention"] = torch.stack([store[f"blocks.{i}.attn.hook_pattern"] for i in range(n)])
            captured["resid"] = torch.stack([store[f"blocks.{i}.hook_resid_pre"] for i in range(n)]
                                            + [store[f"blocks.{n - 1}.hook_resid_post"]])
        prefill = {k: v for k, v in prefill.items() if prefill_names(k)} if prefill_names else {}
        return logits[0, -1], past, captured, prefill


def generate_steps(
    lens: Any,
    inputs: Any,
    *,
    max_new_tokens: int,
    sampling: Sampling,
    stop_strings: Sequence[str] = (),
    capture: NamesFilter = None,
    default_capture: bool = True,
    prefill_cache: Union[bool, NamesFilter] = False,
    dtype: torch.dtype = torch.float32,
    top_k: int = 20,
    keep_logits: bool = True,
    fast: bool = True,
    on_prefill: Optional[Callable[[dict[str, torch.Tensor]], None]] = None,
    on_stop: Optional[Callable[[str], None]] = None,
) -> Iterator[Step]:
    """Generate from prepared ``inputs``, yielding one :class:`Step` per new token.

    See :meth:`llava_lens.LlavaLens.trace` for the arguments. ``on_prefill`` receives the
    prefill cache (when ``prefill_cache``) and ``on_stop`` the stop reason.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    bridged = BridgeForward(lens, as_predicate(capture), default_capture)
    # The fast path captures exactly the default set; anything else needs the bridge's hooks.
    fast = fast and default_capture and capture is None and fastpath.supported(lens)
    unbridged = fastpath.for_lens(lens) if fast else None

    def forward(**kwargs: Any):
        if unbridged is not None and "prefill_names" not in kwargs and not unbridged.bridge_has_hooks():
            return (*unbridged(**kwargs), {})
        return bridged(**kwargs)

    choose = sampling.chooser(lens.device)
    to_cpu = _cpu_mover(dtype)
    prompt_len = inputs.input_ids.shape[1]
    first = {k: v.to(lens.device) for k, v in inputs.extra.items()}
    first["pixel_values"] = inputs.pixel_values.to(lens.device, lens.dtype)
    if prefill_cache:
        first["prefill_names"] = _prefill_names(prefill_cache)
    token_ids: list[int] = []
    with torch.inference_mode():
        last, past, captured, prefill = forward(input_ids=inputs.input_ids.to(lens.device), **first)
    if on_prefill is not None and prefill:
        on_prefill({k: to_cpu(v) for k, v in prefill.items()})
    for index in range(max_new_tokens):
        token_id = choose(last)
        token_ids.append(token_id)
        yield _make_step(index, token_id, prompt_len, last, captured, lens, to_cpu, top_k, keep_logits)
        reason = _stop_reason(token_ids, lens.eos_token_ids, stop_strings, lens,
                              index + 1 == max_new_tokens)
        if reason:
            if on_stop is not None:
                on_stop(reason)
            return
        with torch.inference_mode():
            token = torch.tensor([[token_id]], device=lens.device)
            last, past, captured, _ = forward(input_ids=token, past_key_values=past)


def _prefill_names(prefill_cache: Union[bool, NamesFilter]) -> Callable[[str], bool]:
    if prefill_cache is True:
        return lambda n: n.startswith(("vision_encoder.encoder_layers.", "blocks.")) and n.endswith(
            PREFILL_DEFAULT_SUFFIXES)
    return as_predicate(prefill_cache)


def _cpu_mover(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    def to_cpu(t: torch.Tensor) -> torch.Tensor:
        return t.to("cpu", dtype if t.is_floating_point() else t.dtype)
    return to_cpu


def _make_step(index, token_id, prompt_len, last_logits, captured, lens, to_cpu, top_k,
               keep_logits) -> Step:
    captured = {k: to_cpu(v) for k, v in captured.items()}
    top = last_logits.topk(min(top_k, last_logits.shape[-1]))
    return Step(
        index=index, token_id=token_id, token=lens.tokenizer.convert_ids_to_tokens(token_id),
        position=prompt_len - 1 + index, logits=to_cpu(last_logits) if keep_logits else None,
        top_ids=top.indices.cpu(), top_logits=to_cpu(top.values),
        attention=captured.pop("attention", None), resid=captured.pop("resid", None), cache=captured,
    )


def _stop_reason(token_ids: list[int], eos: set[int], stop_strings: Sequence[str], lens: Any,
                 at_max: bool) -> str:
    if token_ids[-1] in eos:
        return "eos"
    if stop_strings:
        text = lens.tokenizer.decode(token_ids, skip_special_tokens=True)
        if any(s in text for s in stop_strings):
            return "stop_string"
    return "max_new_tokens" if at_max else ""
