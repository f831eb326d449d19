"""One sweep row per example: generate, then logit lens + vision share; any failure is an error row."""

from __future__ import annotations

import time
from typing import Any, Optional

import pyarrow as pa

from llava_lens.analysis.emergence import emergence_layers
from llava_lens.defaults import DEFAULT_MAX_NEW_TOKENS
from llava_lens.errors import PromptError
from llava_lens.sweep.sources import Example

# One row per example. "answer" is the generated text, "target" the data's answer (if any).
# Layer lists have n_layers + 1 entries, as in LogitLens: entry l is the residual stream entering
# block l, the last one the final residual (which the model's output decodes), so the emergence
# layer n_layers means "only at the output". vision_share has n_layers entries (one per block).
SCHEMA = pa.schema([
    ("id", pa.string()), ("question", pa.string()), ("answer", pa.string()),
    ("target", pa.string()), ("tokens", pa.list_(pa.string())),
    ("token_probs", pa.list_(pa.list_(pa.float32()))),  # [token][layer]
    ("token_ranks", pa.list_(pa.list_(pa.int64()))),  # [token][layer], 0 = top-1
    ("emergence", pa.list_(pa.int64())),  # per token; -1 when the final token never settles
    ("emergence_first", pa.int64()), ("vision_share", pa.list_(pa.float32())),  # per layer
    ("n_tokens", pa.int64()), ("seconds", pa.float64()), ("error", pa.string()),
])


def storable(text: Optional[str]) -> Optional[str]:
    r"""``text`` as valid UTF-8 for Parquet: a lone surrogate (undecodable file name or argument) becomes ``\udcff``."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def empty_row(example: Example) -> dict[str, Any]:
    """A row with only the example's id, question and target filled in."""
    row: dict[str, Any] = {name: None for name in SCHEMA.names}
    row.update(id=storable(example.id), question=storable(example.question), target=storable(example.target))
    return row


def error_text(err: BaseException) -> str:
    """``"<ErrorType>: <first line>"``, at most 500 characters (the row's ``error``)."""
    message = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {message}"[:500]


def error_row(example: Example, message: str) -> dict[str, Any]:
    """An error row for ``example`` with ``message`` (``seconds`` 0)."""
    row = empty_row(example)
    row.update(error=message[:500], seconds=0.0)
    return row


def _question(example: Example) -> str:
    if example.question is None:
        raise PromptError("no question for this example (missing in the data)")
    return example.question


def _fill(lens: Any, row: dict[str, Any], trace: Any) -> None:
    """Put the logit-lens and vision-share results of ``trace`` into ``row``."""
    from llava_lens.grounding import vision_share
    from llava_lens.lens import logit_lens

    result = logit_lens(trace, lens, k=1, prompt=False)
    emergence = emergence_layers(result.target_ranks)
    row.update(
        answer=trace.text, tokens=trace.tokens, n_tokens=len(trace),
        token_probs=result.target_probs.T.tolist(), token_ranks=result.target_ranks.T.tolist(),
        emergence=emergence, emergence_first=emergence[0] if emergence else None,
        vision_share=vision_share(trace).per_layer[..., 0].mean(0).tolist(),
    )


def analyse(lens: Any, example: Example, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict:
    """Generate an answer for ``example`` and return its sweep row (see ``SCHEMA``).

    Any :class:`Exception` (corrupt image, unreadable file, missing question...) becomes an
    error row with a one-line message, so one bad example never stops a sweep.
    """
    start = time.perf_counter()
    row = empty_row(example)
    try:
        image = example.image() if callable(example.image) else example.image
        trace = lens.trace(image, _question(example), max_new_tokens=max_new_tokens, keep_logits=False)
        _fill(lens, row, trace)
    except Exception as err:  # noqa: BLE001 - every failure becomes a row; the sweep goes on
        row["error"] = error_text(err)
    row["seconds"] = time.perf_counter() - start
    return row


def analyse_batch(lens: Any, examples: list[Example], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[dict]:
    """Rows of several examples, generated together in one batch (:mod:`llava_lens.engine`).

    Same rows as :func:`analyse` on each (up to float rounding). An example that fails to load
    or prepare becomes its own error row and the others go on; if the batched generation itself
    fails, each example is retried alone so the failure lands on the row that causes it.
    ``seconds`` is the batch's generation time shared equally, plus the example's own work.
    """
    from llava_lens.engine import Prepared
    from llava_lens.options import GenerateOptions

    start = time.perf_counter()
    rows = [empty_row(ex) for ex in examples]
    ready: list[tuple[int, Prepared]] = []
    for i, example in enumerate(examples):
        try:
            image = example.image() if callable(example.image) else example.image
            question = _question(example)
            ready.append((i, Prepared(*lens.prepare(image, question), question)))
        except Exception as err:  # noqa: BLE001 - a bad example is an error row, not a stopped batch
            rows[i]["error"] = error_text(err)
            rows[i]["seconds"] = time.perf_counter() - start
    if not ready:
        return rows
    try:
        options = GenerateOptions.build(max_new_tokens=max_new_tokens, keep_logits=False)
        traces = lens.trace_prepared([p for _, p in ready], options)
    except Exception:  # noqa: BLE001 - find which example fails by running each alone
        for i, _ in ready:
            rows[i] = analyse(lens, examples[i], max_new_tokens)
        return rows
    shared = (time.perf_counter() - start) / len(ready)
    for (i, _), trace in zip(ready, traces):
        own = time.perf_counter()
        try:
            _fill(lens, rows[i], trace)
        except Exception as err:  # noqa: BLE001 - as in analyse
            rows[i]["error"] = error_text(err)
        rows[i]["seconds"] = shared + time.perf_counter() - own
    return rows
