"""The generation engine: one batched, KV-cached step loop; a single trace is a batch of one.

Each example is prepared on its own (its ``prompt_ids`` and :class:`VisionSpan` are exactly those
of a single trace), then the prompts are left-padded to one length and stepped together:

* the prefill gets the padding ``attention_mask`` and ``position_ids = cumsum(mask) - 1``: HF's
  LLaVA forward does not derive position ids from the mask, and without them a padded row's
  rotary positions would be shifted by its pad length;
* every decode step feeds one token per row with the extended mask and each row's own next
  position; a finished row keeps stepping on a pad token (the batch shares one KV cache) but its
  steps are no longer recorded;
* attention rows are recorded over all keys of the batch and the left-pad columns stripped, so a
  Step's attention is ``[n_layers, n_heads, prompt_len + index]`` over that example's own keys.

Every forward runs on the fast path (:mod:`llava_lens.fastpath`) when only the default capture
is asked and no TransformerLens hook is attached at that moment, else through the bridge
(:mod:`llava_lens.bridgepath`); both return the same captures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from llava_lens import hooks
from llava_lens.errors import PromptError
from llava_lens.families import VisionSpan
from llava_lens.forward import ForwardOut, Request, SummarySpec
from llava_lens.hooks import as_predicate
from llava_lens.inputs import ModelInputs
from llava_lens.options import GenerateOptions, Sampling, view_layers
from llava_lens.summary import base_tiles, split_prefill, summarize
from llava_lens.tokens import token_strings
from llava_lens.trace import PrefillSummary, Step

Chooser = Callable[[torch.Tensor], int]


@dataclass
class Prepared:
    """One example ready for the engine: processor inputs, its vision span and question."""

    inputs: ModelInputs
    span: VisionSpan
    question: str

    @property
    def prompt_len(self) -> int:
        """Tokens in the prompt (image features expanded)."""
        return self.inputs.input_ids.shape[1]


@dataclass
class Row:
    """Generation state of one example of the batch."""

    prepared: Prepared
    choose: Chooser
    limit: int
    """Tokens this row may generate: ``max_new_tokens``, bounded by the model's context."""
    steps: list[Step] = field(default_factory=list)
    stop: str = ""
    prefill: dict[str, torch.Tensor] = field(default_factory=dict)
    summary: Optional[PrefillSummary] = None


def chooser(sampling: Sampling, device: torch.device) -> Chooser:
    """A function from ``[d_vocab]`` logits to the chosen token id (HF's own warpers when sampling)."""
    if not sampling.sampling:
        return lambda logits: int(logits.argmax())
    warpers = LogitsProcessorList()
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    gen = torch.Generator(device=device)
    gen.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())

    def choose(logits: torch.Tensor) -> int:
        scores = warpers(None, logits[None].float())
        return int(torch.multinomial(scores.softmax(-1), 1, generator=gen))

    return choose


def context_limit(prompt_len: int, max_new_tokens: int, n_ctx: int) -> int:
    """``max_new_tokens`` bounded by the model's context; a prompt that does not fit is an error."""
    if n_ctx and prompt_len >= n_ctx:
        raise PromptError(f"the prompt has {prompt_len} tokens but the model's context is {n_ctx} positions; "
                          "shorten the question or use a smaller image")
    return min(max_new_tokens, n_ctx - prompt_len) if n_ctx else max_new_tokens


def _pad_pixels(pixels: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-example pixel values, zero-padding LLaVA-NeXT's tile dimension.

    HF's LLaVA-NeXT reads only the first ``n_tiles`` (from ``image_sizes``) of each example.
    """
    if pixels[0].dim() == 5:
        most = max(p.shape[1] for p in pixels)
        pixels = [F.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
    return torch.cat(pixels)


def _left_pad(rows: list[Row], get: Callable[[Prepared], torch.Tensor], longest: int, value: int) -> torch.Tensor:
    """``[B, longest]``: each row's ``[1, len]`` per-token tensor, left-padded with ``value``."""
    first = get(rows[0].prepared)
    out = torch.full((len(rows), longest), value, dtype=first.dtype)
    for b, row in enumerate(rows):
        out[b, longest - row.prepared.prompt_len:] = get(row.prepared)[0]
    return out


def _prefill_kwargs(lens: Any, rows: list[Row]) -> tuple[dict[str, torch.Tensor], Any]:
    """Left-padded prefill kwargs (ids, mask, position ids, pixel values, extras) and rotary state.

    The state is the family's, for the decode steps' position ids (None: 1-d positions).
    """
    longest = max(r.prepared.prompt_len for r in rows)
    ids = _left_pad(rows, lambda p: p.inputs.input_ids, longest,
                    lens.tokenizer.pad_token_id or 0)
    mask = _left_pad(rows, lambda p: torch.ones_like(p.inputs.input_ids), longest, 0)
    kwargs: dict[str, torch.Tensor] = {"input_ids": ids}
    if len(rows) > 1:  # a single example needs no mask: HF then takes its causal fast path
        # pad positions get a harmless position (1, as HF's generate does); they are masked anyway
        kwargs["attention_mask"] = mask
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    kwargs["pixel_values"] = _pad_pixels([r.prepared.inputs.pixel_values for r in rows]).to(lens.dtype)
    for name in rows[0].prepared.inputs.extra:
        if name in lens.family.sequence_inputs:
            kwargs[name] = _left_pad(rows, lambda p, n=name: p.inputs.extra[n], longest, 0)
        else:
            kwargs[name] = torch.cat([r.prepared.inputs.extra[name] for r in rows])
    # families with their own rotary positions (Qwen2.5-VL's M-RoPE) get them for every batch
    # size: HF would otherwise keep them as state on the model, shared by concurrent traces
    rope = lens.family.position_ids(lens.hf_model, kwargs)
    if rope is not None:
        kwargs["position_ids"] = rope[0]
    return {k: v.to(lens.device) for k, v in kwargs.items()}, (rope[1] if rope is not None else None)


def _summary_spec(lens: Any, rows: list[Row], options: GenerateOptions) -> SummarySpec:
    """Text-query positions (padded coordinates; short rows repeat their last query) and layers."""
    longest = max(r.prepared.prompt_len for r in rows)
    queries = []
    for row in rows:
        is_text = torch.ones(row.prepared.prompt_len, dtype=torch.bool)
        is_text[row.prepared.span.positions] = False
        queries.append(is_text.nonzero().flatten() + longest - row.prepared.prompt_len)
    most = max(len(q) for q in queries)
    padded = torch.stack([torch.cat([q, q[-1:].expand(most - len(q))]) for q in queries])
    vit_layers = [] if lens.family.vit_views else lens.info().vit_layers_used
    return SummarySpec(padded.to(lens.device), view_layers(lens.n_layers, options.capture.layers),
                       vit_layers, vit_images=base_tiles(rows).to(lens.device), resid=True)


def check_names(bridge: Any, names: Any, what: str) -> None:
    """Refuse a names filter that names unknown hooks (or, as a predicate, matches none)."""
    if names is None:
        return
    known = bridge.hook_dict
    if callable(names):
        if not any(names(name) for name in known):
            raise ValueError(f"{what} matches no hook of this model (e.g. {hooks.attn_pattern(0)})")
        return
    unknown = [n for n in ([names] if isinstance(names, str) else names) if n not in known]
    if unknown:
        close = [n for n in known if n.endswith(unknown[0].rsplit(".", 1)[-1])][:2]
        hint = f"; did you mean {' or '.join(close)}?" if close else f" (e.g. {hooks.attn_pattern(0)})"
        raise ValueError(f"unknown hook name {unknown[0]!r} in {what}{hint}")


class Engine:
    """Steps a batch of prepared examples; yields after every step. See the module docstring."""

    def __init__(self, lens: Any, prepared: Sequence[Prepared], options: GenerateOptions):
        self.lens, self.options = lens, options
        capture = options.capture
        check_names(lens.bridge, capture.names, "capture")
        check_names(lens.bridge, capture.raw_prefill, "prefill_cache")
        view_layers(lens.n_layers, capture.layers)  # a layer that does not exist is an error even unused
        self.names = as_predicate(capture.names) if capture.names is not None else None
        raw = capture.raw_prefill
        self.prefill_names = as_predicate(raw) if raw is not None else None
        n_ctx = lens.info().n_ctx
        self.rows = [Row(p, chooser(options.sampling, lens.device),
                         context_limit(p.prompt_len, options.max_new_tokens, n_ctx)) for p in prepared]
        self.fast = options.fast and capture.only_default and lens.fast_forward is not None

    def _forward(self, request: Request) -> ForwardOut:
        fast = self.lens.fast_forward
        if self.fast and not fast.bridge_has_hooks():
            return fast(request)
        return self.lens.bridge_forward(request)

    def _record(self, out: ForwardOut, index: int, n_keys: int) -> list[int]:
        """Choose each live row's token and record its Step; returns the tokens to feed next."""
        tokens = []
        for b, row in enumerate(self.rows):
            if row.stop:  # finished: feed pad, record nothing
                tokens.append(self.lens.tokenizer.pad_token_id or 0)
                continue
            token_id = row.choose(out.logits[b])
            tokens.append(token_id)
            row.steps.append(self._step(row, out, b, index, token_id, n_keys))
            row.stop = self._stop_reason(row, index)
        return tokens

    def _step(self, row: Row, out: ForwardOut, b: int, index: int, token_id: int, n_keys: int) -> Step:
        capture, prompt_len = self.options.capture, row.prepared.prompt_len
        logits = out.logits[b]
        top = logits.topk(min(capture.top_k, logits.shape[-1]))
        own = n_keys - (prompt_len + index)  # left-pad columns in front of this row's keys
        attention = out.attention[b, :, :, own:].to("cpu", capture.attention_dtype) \
            if out.attention is not None else None
        resid = out.resid[b].to("cpu", capture.dtype) if out.resid is not None else None
        cache = {k: _to_cpu(v[b], capture.dtype) for k, v in out.extra.items()}
        return Step(index=index, token_id=token_id, token=token_strings(self.lens.tokenizer, [token_id])[0],
                    position=prompt_len - 1 + index,
                    logits=_to_cpu(logits, capture.dtype) if capture.keep_logits else None,
                    top_ids=top.indices.cpu(), top_logits=_to_cpu(top.values, capture.dtype),
                    attention=attention, resid=resid, cache=cache)

    def _stop_reason(self, row: Row, index: int) -> str:
        if row.steps[-1].token_id in self.lens.eos_token_ids:
            return "eos"
        if self.options.stop_strings:
            text = self.lens.tokenizer.decode([s.token_id for s in row.steps], skip_special_tokens=True)
            if any(s in text for s in self.options.stop_strings):
                return "stop_string"
        if index + 1 >= row.limit:
            return "max_new_tokens" if row.limit == self.options.max_new_tokens else "context"
        return ""

    def _prefill(self) -> ForwardOut:
        kwargs, self.rope_state = _prefill_kwargs(self.lens, self.rows)
        capture = self.options.capture
        spec = _summary_spec(self.lens, self.rows, self.options) if capture.summary else None
        request = Request(kwargs, default=capture.default, mid=capture.mid, summary=spec, names=self.names,
                          prefill_names=self.prefill_names)
        out = self._forward(request)
        self.mask = kwargs.get("attention_mask", torch.ones_like(kwargs["input_ids"]))
        longest = kwargs["input_ids"].shape[1]
        if self.prefill_names is not None:
            split_prefill(self.lens, out.prefill, self.rows, longest, capture.dtype)
        if spec is not None:
            summarize(self.lens, out, spec, self.rows, capture)
        return out

    def steps(self) -> Iterator[list[Row]]:
        """Run the generation; yields the rows after each recorded step."""
        with torch.inference_mode():
            out = self._prefill()
        batched, n_keys = len(self.rows) > 1, self.mask.shape[1]
        for index in range(max(r.limit for r in self.rows)):
            tokens = self._record(out, index, n_keys)
            yield self.rows
            if all(row.stop for row in self.rows):
                return
            kwargs = {"input_ids": torch.tensor(tokens, device=self.lens.device)[:, None],
                      "past_key_values": out.past}
            if batched:
                # the new token's position is one past the row's last (mask.sum() - 1 is the last)
                positions = self.mask.sum(-1, keepdim=True).to(self.lens.device)
                self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
                kwargs.update(attention_mask=self.mask.to(self.lens.device), position_ids=positions)
            if self.rope_state is not None:  # M-RoPE: the family's 3-d positions, for every batch size
                text = positions if batched else torch.full((1, 1), n_keys, device=self.lens.device)
                kwargs["position_ids"] = self.lens.family.decode_position_ids(text, self.rope_state)
            n_keys += 1  # a batch of one needs no mask or positions (HF's causal fast path)
            with torch.inference_mode():
                out = self._forward(Request(kwargs, default=self.options.capture.default,
                                            mid=self.options.capture.mid, names=self.names))


def _to_cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to("cpu", dtype if t.is_floating_point() else t.dtype)
