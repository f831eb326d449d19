"""Batched tracing: several (image, question) examples stepped together on the fast path.

Each example is prepared on its own (so its ``prompt_ids`` and :class:`VisionSpan` are exactly
those of :meth:`LlavaLens.trace`), then the prompts are left-padded to one length and run as one
batch through :class:`llava_lens.fastpath.FastForward`:

* the prefill gets the padding ``attention_mask`` and ``position_ids = cumsum(mask) - 1``: HF's
  LLaVA forward does not derive position ids from the mask, and without them a padded row's
  rotary positions would be shifted by its pad length;
* every decode step feeds one token per row with the extended mask and each row's own next
  position; a row that has finished keeps stepping on a pad token (the batch shares one KV
  cache) but its steps are no longer recorded;
* attention rows are recorded over all keys of the batch and the left-pad columns stripped, so a
  Step's attention is ``[n_layers, n_heads, prompt_len + index]`` over that example's own keys.

Every returned :class:`Trace` equals the single-example trace up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llava_lens import fastpath
from llava_lens.families import VisionSpan
from llava_lens.inputs import ModelInputs
from llava_lens.trace import Step, Trace
from llava_lens.tracer import Sampling, _cpu_mover, _make_step, _stop_reason


@dataclass
class Prepared:
    """One example ready for a batch: processor inputs, its vision span and question."""

    inputs: ModelInputs
    span: VisionSpan
    question: str


@dataclass
class _Row:
    """Generation state of one batch element."""

    prepared: Prepared
    choose: Callable[[torch.Tensor], int]
    steps: list[Step] = field(default_factory=list)
    stop: str = ""

    @property
    def prompt_len(self) -> int:
        return self.prepared.inputs.input_ids.shape[1]


def can_batch(lens: Any) -> bool:
    """Whether ``lens`` can trace a batch in one forward (fast path, no bridge hooks attached)."""
    return fastpath.supported(lens) and not fastpath.for_lens(lens).bridge_has_hooks()


def _pad_pixels(pixels: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-example pixel values, zero-padding LLaVA-NeXT's tile dimension.

    HF's LLaVA-NeXT reads only the first ``n_tiles`` (from ``image_sizes``) of each example, so
    the padded tiles are never looked at.
    """
    if pixels[0].dim() == 5:
        most = max(p.shape[1] for p in pixels)
        pixels = [F.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
    return torch.cat(pixels)


def _batch_inputs(lens: Any, rows: list[_Row]) -> dict[str, torch.Tensor]:
    """Left-padded prefill kwargs: ids, mask, position ids, pixel values and extras."""
    longest = max(r.prompt_len for r in rows)
    pad_id = lens.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else 0
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, longest - row.prompt_len:] = row.prepared.inputs.input_ids[0]
        mask[b, longest - row.prompt_len:] = 1
    # pad positions get a harmless position (1, as HF's generate does); they are masked anyway
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    kwargs["pixel_values"] = _pad_pixels([r.prepared.inputs.pixel_values for r in rows]).to(lens.dtype)
    for name in rows[0].prepared.inputs.extra:
        kwargs[name] = torch.cat([r.prepared.inputs.extra[name] for r in rows])
    return {k: v.to(lens.device) for k, v in kwargs.items()}


def _record(lens: Any, rows: list[_Row], index: int, logits: torch.Tensor, captured: dict[str, torch.Tensor],
            n_keys: int, options: dict[str, Any]) -> list[int]:
    """Choose each live row's token, record its Step and update its stop reason; returns the tokens."""
    tokens = []
    for b, row in enumerate(rows):
        if row.stop:  # finished: feed pad, record nothing
            tokens.append(lens.tokenizer.pad_token_id or 0)
            continue
        token_id = row.choose(logits[b])
        tokens.append(token_id)
        # this row's own keys: drop the left-pad columns in front of its prompt
        own = {"attention": captured["attention"][b, :, :, n_keys - (row.prompt_len + index):],
               "resid": captured["resid"][b]}
        row.steps.append(_make_step(index, token_id, row.prompt_len, logits[b], own, lens,
                                    options["to_cpu"], options["top_k"], options["keep_logits"]))
        row.stop = _stop_reason([s.token_id for s in row.steps], lens.eos_token_ids,
                                options["stop_strings"], lens, index + 1 == options["max_new_tokens"])
    return tokens


def generate_batch(lens: Any, prepared: Sequence[Prepared], *, max_new_tokens: int, sampling: Sampling,
                   stop_strings: Sequence[str] = (), dtype: torch.dtype = torch.float32, top_k: int = 20,
                   keep_logits: bool = True) -> list[tuple[list[Step], str]]:
    """Step ``prepared`` examples together; per example, its Steps and stop reason.

    Needs the fast path (:func:`can_batch`). Sampling uses one generator per example, seeded as
    a single trace would be, so a seeded batch reproduces seeded single traces.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prepared:
        return []
    forward = fastpath.for_lens(lens)
    rows = [_Row(p, sampling.chooser(lens.device)) for p in prepared]
    options = {"to_cpu": _cpu_mover(dtype), "top_k": top_k, "keep_logits": keep_logits,
               "stop_strings": stop_strings, "max_new_tokens": max_new_tokens}
    kwargs = _batch_inputs(lens, rows)
    mask = kwargs["attention_mask"]
    with torch.inference_mode():
        logits, past, captured = forward.batched(**kwargs)
    for index in range(max_new_tokens):
        tokens = _record(lens, rows, index, logits, captured, mask.shape[1], options)
        if all(row.stop for row in rows):
            break
        # the new token's position is one past the row's last (mask.sum() - 1 is the last)
        positions = mask.sum(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        with torch.inference_mode():
            logits, past, captured = forward.batched(
                input_ids=torch.tensor(tokens, device=lens.device)[:, None], past_key_values=past,
                attention_mask=mask, position_ids=positions)
    return [(row.steps, row.stop) for row in rows]


def build_trace(lens: Any, item: Prepared, steps: list[Step], stop: str,
                prefill: dict[str, torch.Tensor] | None = None) -> Trace:
    """The :class:`Trace` of one example from its Steps (and prefill cache, if recorded)."""
    inputs = item.inputs
    ids = inputs.input_ids[0]
    return Trace(
        steps=steps, vision_span=item.span, prompt_ids=ids.cpu(),
        prompt_tokens=lens.tokenizer.convert_ids_to_tokens(ids.tolist()), question=item.question,
        prompt=inputs.prompt, text=lens.tokenizer.decode([s.token_id for s in steps], skip_special_tokens=True),
        image=inputs.image, model_name=lens.name, info=lens.info(), stop_reason=stop,
        prefill=prefill or {},
    )


def trace_prepared(lens: Any, prepared: Sequence[Prepared], *, max_new_tokens: int = 32,
                   sampling: Sampling | None = None, **options: Any) -> list[Trace]:
    """Traces of already prepared examples, batched when the fast path allows, else one by one.

    ``options``: ``stop_strings``, ``dtype``, ``top_k``, ``keep_logits`` (as for ``trace``).
    """
    sampling = sampling or Sampling()
    if not can_batch(lens):  # hooks on the bridge, or a text tower the fast path does not know
        return [trace_one(lens, item, max_new_tokens=max_new_tokens, sampling=sampling, **options)
                for item in prepared]
    results = generate_batch(lens, prepared, max_new_tokens=max_new_tokens, sampling=sampling, **options)
    return [build_trace(lens, item, steps, stop) for item, (steps, stop) in zip(prepared, results)]


def trace_one(lens: Any, item: Prepared, *, max_new_tokens: int, sampling: Sampling, **options: Any) -> Trace:
    """One example through :func:`llava_lens.tracer.generate_steps` (``options`` as for it)."""
    from llava_lens.tracer import generate_steps

    prefill: dict[str, torch.Tensor] = {}
    stop = ["max_new_tokens"]
    steps = list(generate_steps(lens, item.inputs, max_new_tokens=max_new_tokens, sampling=sampling,
                                on_prefill=prefill.update, on_stop=lambda r: stop.__setitem__(0, r), **options))
    return build_trace(lens, item, steps, stop[0], prefill)
