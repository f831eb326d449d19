"""Run a sweep: claim the output folder, check it, skip what is done, analyse the rest into shards."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from llava_lens.defaults import DEFAULT_MAX_NEW_TOKENS
from llava_lens.errors import SweepError
from llava_lens.sweep import lock, state
from llava_lens.sweep.launch import LaunchContext, is_mine, run_id
from llava_lens.sweep.rows import analyse, analyse_batch, error_row
from llava_lens.sweep.shards import ShardWriter, quarantine, scan
from llava_lens.sweep.sources import Example


def _warn(message: str) -> None:
    print(f"llava-lens: warning: {message}", file=sys.stderr, flush=True)


def _open_folder(out: Path, rank: int, world_size: int, options: dict[str, Any],
                 force: bool) -> tuple[lock.Claim, dict[str, Optional[str]], int]:
    """Claim ``out``, check its options, quarantine unreadable shards; return (claim, done id -> question, n moved)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SweepError(f"cannot create the sweep folder {out}: {err.strerror or err}") from None
    with lock.joining(out):
        held = lock.claim(out, rank, world_size, run_id(world_size))
        try:
            # temp files left by a kill: every rank's when nobody can be writing, else only this rank's
            for stale in out.glob(".part-*.tmp" if held.fresh else f".part-{rank}-*.tmp"):
                stale.unlink(missing_ok=True)
            state.check_options(out, options, force)
            found = scan(out)
            moved = quarantine(out, found.bad)
        except BaseException:
            held.release()
            raise
    for (path, reason), target in zip(found.bad, moved):
        _warn(f"unreadable shard {path.name} ({reason}) moved to {target}; its examples will be redone")
    done = {i: q for t in found.tables for i, q in zip(t.column("id").to_pylist(),
                                                        t.column("question").to_pylist())}
    return held, done, len(moved)


def _select(examples: Iterator[Example], done: dict[str, Optional[str]], limit: Optional[int], rank: int,
            world_size: int) -> tuple[list[Example], list[Example]]:
    """The rank's (todo, already done) examples among the first ``limit``; a repeated id counts once."""
    todo, skipped, seen = [], [], set()
    for index, example in enumerate(examples):
        if limit is not None and index >= limit:
            break
        if example.id in seen or not is_mine(example.id, rank, world_size):
            continue
        seen.add(example.id)
        (skipped if example.id in done else todo).append(example)
    return todo, skipped


def _chunks(todo: list[Example], crashes: Any, batch_size: int) -> Iterator[list[Example]]:
    """Batches of ``batch_size``; an example that crashed a process before runs alone."""
    batch: list[Example] = []
    for example in todo:
        if crashes[example.id] > 0:
            yield [example]
            continue
        batch.append(example)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _process(lens: Any, todo: list[Example], writer: ShardWriter, journal: state.Journal, bar: Any,
             max_new_tokens: int, batch_size: int) -> int:
    """Analyse ``todo`` into ``writer``; return the number of error rows."""
    crashes, errors = journal.crashes({e.id for e in todo}), 0
    for example in [e for e in todo if crashes[e.id] >= state.MAX_CRASHES]:
        writer.add(error_row(example, f"ProcessCrash: the process died {crashes[example.id]} times while "
                                      "analysing this example (out of memory? native crash?); not retried"))
        errors += 1
        bar.update(1)
    for chunk in _chunks([e for e in todo if crashes[e.id] < state.MAX_CRASHES], crashes, batch_size):
        ids = [e.id for e in chunk]
        journal.record(ids, "s")
        try:
            rows = [analyse(lens, chunk[0], max_new_tokens)] if len(chunk) == 1 else \
                analyse_batch(lens, chunk, max_new_tokens)
        except BaseException:  # Ctrl-C, SIGTERM: an interruption, not a crash of this example
            journal.record(ids, "a")
            raise
        journal.record(ids, "e")
        for row in rows:
            errors += row["error"] is not None
            writer.add(row)
        bar.update(len(chunk))
    return errors


@dataclass(frozen=True)
class SweepSettings:
    """How :func:`run_sweep` runs (checked when made: impossible values are one-line :class:`SweepError` s)."""

    limit: Optional[int] = None
    """Keep the first ``limit`` examples of the data (all ranks together, done or not)."""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    shard_size: int = 4
    """Rows per Parquet shard, each written atomically."""
    rank: int = 0
    world_size: int = 1
    progress: bool = True
    batch_size: int = 1
    """Examples generated together per forward pass (same rows as one at a time)."""
    force: bool = False
    """Resume even when the stored options or questions differ."""
    options: Optional[dict[str, Any]] = None
    """What to record in ``sweep.json`` besides the model and ``max_new_tokens`` (e.g. the CLI's options)."""

    def __post_init__(self) -> None:
        lowest = {"limit": 0, "max_new_tokens": 1, "shard_size": 1, "batch_size": 1, "rank": 0, "world_size": 1}
        for name, low in lowest.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise SweepError(f"{name} must be an integer, got {value!r}")
            if value < low:
                raise SweepError(f"{name.replace('_', ' ')} must be >= {low}, got {value}")
        if self.rank >= self.world_size:
            raise SweepError(f"rank {self.rank} is outside a world of {self.world_size} processes")


def run_sweep(lens: Any, examples: Iterator[Example], out_dir: str | Path,
              settings: Optional[SweepSettings] = None, **kwargs: Any) -> dict[str, int]:
    """Analyse every example of this rank not yet in ``out_dir``; write rows as shards; resumable.

    ``settings`` (or its fields as keyword arguments, e.g. ``limit=10, batch_size=4``) is a
    :class:`SweepSettings`. ``rank``/``world_size`` (see :func:`launch_context`) select this
    process's share of the examples (:func:`is_mine`); ids already in any rank's shards are
    skipped. ``limit`` keeps the first ``limit`` examples of the data (all ranks together, done or
    not), so N processes with a limit do the same set as one, and re-running with the same limit
    finishes it. Only rank 0 shows a progress bar. ``batch_size`` examples are generated together
    per forward pass (:func:`analyse_batch`); rows are the same as one at a time.

    The folder is owned by one run at a time (:mod:`llava_lens.sweep.lock`; another run gets a
    :class:`SweepError` naming the owner). ``options`` are stored in ``sweep.json`` with the
    model name and ``max_new_tokens``; a resume whose options or questions differ is refused
    unless ``force``. Unreadable shards are moved to ``quarantine/`` and their examples redone.
    Returns counts for this rank: ``done`` (this run), ``skipped`` (already there), ``errors``
    (this run), ``quarantined`` (shards moved).
    """
    from tqdm import tqdm

    try:
        run = dataclasses.replace(settings or SweepSettings(), **kwargs)
    except TypeError as err:
        raise SweepError(f"run_sweep: {err}") from None
    out = Path(out_dir)
    recorded = {"model": getattr(lens, "name", None), "max_new_tokens": run.max_new_tokens, **(run.options or {})}
    held, done, moved = _open_folder(out, run.rank, run.world_size, recorded, run.force)
    try:
        todo, skipped = _select(examples, done, run.limit, run.rank, run.world_size)
        if not run.force:
            state.check_questions(done, skipped, out)
        writer = ShardWriter(out, run.rank, run.shard_size)
        tag = LaunchContext(run.rank, max(run.world_size, 1)).tag()
        bar = tqdm(total=len(todo), desc=f"sweep [{tag}]" if tag else "sweep", unit="ex", dynamic_ncols=True,
                   disable=not run.progress or run.rank != 0)
        try:
            errors = _process(lens, todo, writer, state.Journal(out), bar, run.max_new_tokens, run.batch_size)
        finally:
            bar.close()
            writer.flush()  # Ctrl-C keeps what was computed; SIGKILL loses only the unwritten buffer
    finally:
        held.release()
    return {"done": len(todo), "skipped": len(skipped), "errors": errors, "quarantined": moved}
