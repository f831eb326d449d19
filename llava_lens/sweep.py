"""Logit-lens sweeps over a dataset: one Parquet row per example, resumable after any interruption.

Data sources (:func:`iter_examples`): an image folder (id = path relative to the folder), a
``datasets`` dataset saved with ``save_to_disk`` (id = its ``id`` column, else the row index), or
a Parquet/CSV manifest with an ``image`` column of paths relative to the manifest (id = its
``id`` column, else ``<image path>#<row>``). Ids are stable across runs, so resuming works by id.

Rows are buffered and written every ``shard_size`` examples as ``part-<rank>-<n>.parquet`` via a
temporary file and ``os.replace``: a shard is either complete or absent, whatever moment the
process is killed. A re-run reads the ids already in the shards and skips them, so rows are
neither lost (unwritten rows are simply recomputed) nor duplicated.

Data parallelism (``torchrun``, ``accelerate launch``, one process per GPU or node): each process
reads its rank from the environment (:func:`launch_context`), takes the examples :func:`is_mine`
gives it and writes its own ``part-<rank>-*`` shards. Ranks never communicate, so no process group
is needed; resuming, even with another number of processes, skips every id already in any shard.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from llava_lens.errors import LlavaLensError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ID_COLUMNS = ("id", "example_id")
IMAGE_COLUMNS = ("image", "image_path", "path", "file")
TARGET_COLUMNS = ("answer", "target", "label")

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


@dataclass
class Example:
    """One sweep input: a stable id, an image, a question, an optional target answer.

    ``image`` is a path, bytes, a PIL image, or a zero-argument callable returning one of those
    (read only when the example is analysed, so a sweep never holds a dataset's images in memory).
    """

    id: str
    image: Any
    question: str
    target: Optional[str] = None


class SweepError(LlavaLensError, ValueError):
    """Bad sweep input (unknown data layout, missing column...)."""


def is_mine(example_id: str, rank: int = 0, world_size: int = 1) -> bool:
    """Whether ``example_id`` belongs to ``rank`` of ``world_size``, by a stable hash of the id.

    The one place that splits work across processes (e.g. torchrun ranks): sha1, not ``hash``,
    because Python's string hash changes between processes.
    """
    if world_size <= 1:
        return True
    digest = hashlib.sha1(example_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % world_size == rank


@dataclass(frozen=True)
class LaunchContext:
    """Where this process sits in a (possibly) multi-process launch."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def tag(self) -> str:
        """``"rank 1/8"`` in a multi-process launch, else ``""`` (for logs and progress bars)."""
        return f"rank {self.rank}/{self.world_size}" if self.world_size > 1 else ""


def _env_int(env: Any, name: str, default: int) -> int:
    value = str(env.get(name, "")).strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SweepError(f"environment variable {name}={value!r} is not an integer") from None


def launch_context(env: Optional[Any] = None) -> LaunchContext:
    """Rank, world size and local rank from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (``os.environ``).

    ``torchrun`` and ``accelerate launch`` set all three; a plain ``python`` run has none of them
    and is rank 0 of 1. ``LOCAL_RANK`` (the GPU index on this node) defaults to ``RANK``.
    """
    env = os.environ if env is None else env
    world_size = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise SweepError(f"bad launch environment: RANK={rank} WORLD_SIZE={world_size} "
                         f"LOCAL_RANK={local_rank}")
    return LaunchContext(rank, world_size, local_rank)


def _question(row: dict, question: Optional[str], column: Optional[str]) -> str:
    if column is None:
        return question or ""
    if column not in row:
        raise SweepError(f"question column {column!r} not in the data (columns: {', '.join(row)})")
    return str(row[column])


def _pick(row: dict, names: tuple[str, ...]) -> Optional[str]:
    return next((n for n in names if n in row), None)


def _folder(data: Path, question: Optional[str]) -> Iterator[Example]:
    files = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise SweepError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {data}")
    for path in files:
        yield Example(path.relative_to(data).as_posix(), path, question or "")


def _rows(rows: Iterator[dict], base: Optional[Path], question: Optional[str],
          column: Optional[str]) -> Iterator[Example]:
    """Examples from dict rows of a dataset or manifest (``base``: folder of relative image paths)."""
    for i, row in enumerate(rows):
        image_col, id_col, target_col = (_pick(row, IMAGE_COLUMNS), _pick(row, ID_COLUMNS),
                                         _pick(row, TARGET_COLUMNS))
        if image_col is None:
            raise SweepError(f"no image column ({'/'.join(IMAGE_COLUMNS)}) in the data: {', '.join(row)}")
        image = row[image_col]
        if base is not None and isinstance(image, str):
            image = base / image
        if id_col is not None:
            ex_id = str(row[id_col])
        else:
            ex_id = f"{row[image_col]}#{i}" if base is not None else str(i)
        target = None if target_col is None or row[target_col] in (None, "") else str(row[target_col])
        yield Example(ex_id, image, _question(row, question, column), target)


def _dataset_image(ds: Any, index: int, column: str) -> Any:
    """Bytes (or path) of one undecoded ``datasets`` Image cell, read when needed."""
    cell = ds[index][column]
    return (cell.get("bytes") or cell.get("path")) if isinstance(cell, dict) else cell


def _dataset_rows(ds: Any) -> Iterator[dict]:
    """Rows of a dataset with the image column replaced by a lazy loader (ids need no pixels)."""
    image_col = next((n for n in IMAGE_COLUMNS if n in ds.column_names), None)
    if image_col is None:
        yield from ds
        return
    for i, row in enumerate(ds.remove_columns([image_col])):
        yield {**row, image_col: functools.partial(_dataset_image, ds, i, image_col)}


def iter_examples(data: str | Path, question: Optional[str] = None,
                  question_column: Optional[str] = None) -> Iterator[Example]:
    """Yield the examples of ``data`` (image folder, saved ``datasets`` dataset, .parquet/.csv manifest).

    Exactly one of ``question`` (the same for all) and ``question_column`` should be given.
    """
    path = Path(data)
    if not path.exists():
        raise SweepError(f"data not found: {path}")
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            rows = pq.read_table(path).to_pylist()
        elif path.suffix.lower() == ".csv":
            import csv
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            raise SweepError(f"{path}: expected an image folder, a saved dataset or a .parquet/.csv manifest")
        return _rows(iter(rows), path.parent, question, question_column)
    if (path / "dataset_dict.json").is_file():  # several splits: ask for one rather than guess
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise SweepError(f"{path} holds several splits ({', '.join(splits)}); pass {path}/<split>")
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        from datasets import Image as ImageFeature
        from datasets import load_from_disk
        ds = load_from_disk(str(path))
        for name, feature in ds.features.items():
            if isinstance(feature, ImageFeature):  # decode per example, so a bad image is one error row
                ds = ds.cast_column(name, ImageFeature(decode=False))
        return _rows(_dataset_rows(ds), None, question, question_column)
    return _folder(path, question)


def emergence_layers(ranks: Any) -> list[int]:
    """Per token, the first layer from which its rank stays 0 (top-1) up to the last; -1 if never.

    ``ranks [L, S]`` as in :attr:`llava_lens.LogitLens.target_ranks`.
    """
    top = (ranks == 0).flip(0).int().cumprod(0).sum(0)  # length of the trailing run of top-1 layers
    n_layers = ranks.shape[0]
    return [n_layers - int(k) if k > 0 else -1 for k in top]


def _empty_row(example: Example) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name in SCHEMA.names}
    row.update(id=example.id, question=example.question, target=example.target)
    return row


def _error(err: Exception) -> str:
    message = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {message}"[:500]


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


def analyse(lens: Any, example: Example, max_new_tokens: int = 16) -> dict:
    """Generate an answer for ``example`` and return its sweep row (see ``SCHEMA``).

    Any :class:`Exception` (corrupt image, unreadable file...) becomes an error row with a
    one-line message, so one bad example never stops a sweep.
    """
    start = time.perf_counter()
    row = _empty_row(example)
    try:
        image = example.image() if callable(example.image) else example.image
        trace = lens.trace(image, example.question, max_new_tokens=max_new_tokens, keep_logits=False)
        _fill(lens, row, trace)
    except Exception as err:  # noqa: BLE001 - every failure becomes a row; the sweep goes on
        row["error"] = _error(err)
    row["seconds"] = time.perf_counter() - start
    return row


def analyse_batch(lens: Any, examples: list[Example], max_new_tokens: int = 16) -> list[dict]:
    """Rows of several examples, generated together in one batch (:mod:`llava_lens.engine`).

    Same rows as :func:`analyse` on each (up to float rounding). An example that fails to load
    or prepare becomes its own error row and the others go on; if the batched generation itself
    fails, each example is retried alone so the failure lands on the row that causes it.
    ``seconds`` is the batch's generation time shared equally, plus the example's own work.
    """
    from llava_lens.engine import Prepared
    from llava_lens.options import GenerateOptions

    start = time.perf_counter()
    rows = [_empty_row(ex) for ex in examples]
    ready: list[tuple[int, Prepared]] = []
    for i, example in enumerate(examples):
        try:
            image = example.image() if callable(example.image) else example.image
            ready.append((i, Prepared(*lens.prepare(image, example.question), example.question)))
        except Exception as err:  # noqa: BLE001 - a bad example is an error row, not a stopped batch
            rows[i]["error"] = _error(err)
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
            rows[i]["error"] = _error(err)
        rows[i]["seconds"] = shared + time.perf_counter() - own
    return rows


def shard_files(out_dir: str | Path) -> list[Path]:
    """List the finished shards of a sweep (temporary files of an interrupted write excluded)."""
    return sorted(Path(out_dir).glob("part-*.parquet"))


def done_ids(out_dir: str | Path) -> set[str]:
    """Ids of the examples already written to ``out_dir``'s shards."""
    ids: set[str] = set()
    for path in shard_files(out_dir):
        ids.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return ids


def read_rows(out_dir: str | Path) -> pa.Table:
    """All rows of a sweep as one Arrow table (empty table with ``SCHEMA`` when none)."""
    files = shard_files(out_dir)
    if not files:
        return SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=SCHEMA) for p in files])


class ShardWriter:
    """Buffers rows and writes them as atomic Parquet shards ``part-<rank>-<n>.parquet``."""

    def __init__(self, out_dir: str | Path, rank: int = 0, shard_size: int = 4):
        self.out = Path(out_dir)
        self.rank, self.shard_size = rank, max(1, shard_size)
        self.rows: list[dict] = []
        for stale in self.out.glob(f".part-{rank}-*.tmp"):  # left by a kill during a write
            stale.unlink()
        taken = [int(p.stem.split("-")[-1]) for p in self.out.glob(f"part-{rank}-*.parquet")]
        self.next_index = max(taken, default=-1) + 1

    def add(self, row: dict) -> None:
        """Buffer ``row``; write a shard once ``shard_size`` rows are waiting."""
        self.rows.append(row)
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows (if any) to a new shard: temp file, then ``os.replace``."""
        if not self.rows:
            return
        name = f"part-{self.rank}-{self.next_index:05d}"
        tmp, final = self.out / f".{name}.tmp", self.out / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(self.rows, schema=SCHEMA), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, final)
        self.rows, self.next_index = [], self.next_index + 1


def run_sweep(lens: Any, examples: Iterator[Example], out_dir: str | Path, *, limit: Optional[int] = None,
              max_new_tokens: int = 16, shard_size: int = 4, rank: int = 0, world_size: int = 1,
              progress: bool = True, batch_size: int = 1) -> dict[str, int]:
    """Analyse every example of this rank not yet in ``out_dir``; write rows as shards; resumable.

    ``rank``/``world_size`` (see :func:`launch_context`) select this process's share of the
    examples (:func:`is_mine`); ids already in any rank's shards are skipped. ``limit`` keeps the
    first ``limit`` examples of the data (all ranks together, done or not), so N processes with a
    limit do the same set as one, and re-running with the same limit finishes it. Only rank 0
    shows a progress bar. ``batch_size`` examples are generated together per forward pass
    (:func:`analyse_batch`); rows are the same as one at a time. Returns counts for this rank:
    ``done`` (this run), ``skipped`` (already there), ``errors`` (this run).
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise SweepError(f"batch size must be >= 1, got {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen = done_ids(out)
    todo, skipped = [], 0
    for index, example in enumerate(examples):
        if limit is not None and index >= limit:
            break
        if not is_mine(example.id, rank, world_size):
            continue
        if example.id in seen:
            skipped += 1
        else:
            seen.add(example.id)  # a duplicated id in the data is analysed once
            todo.append(example)
    writer, errors = ShardWriter(out, rank, shard_size), 0
    tag = LaunchContext(rank, max(world_size, 1)).tag()
    bar = tqdm(total=len(todo), desc=f"sweep [{tag}]" if tag else "sweep", unit="ex", dynamic_ncols=True,
               disable=not progress or rank != 0)
    try:
        for first in range(0, len(todo), batch_size):
            chunk = todo[first:first + batch_size]
            rows = [analyse(lens, chunk[0], max_new_tokens)] if batch_size == 1 else \
                analyse_batch(lens, chunk, max_new_tokens)
            for row in rows:
                errors += row["error"] is not None
                writer.add(row)
            bar.update(len(chunk))
    finally:
        bar.close()
        writer.flush()  # Ctrl-C keeps what was computed; SIGKILL loses only the unwritten buffer
    return {"done": len(todo), "skipped": skipped, "errors": errors}


def normalize_answer(text: Optional[str]) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse spaces (for accuracy)."""
    import re

    words = re.findall(r"[a-z0-9]+", (text or "").lower())
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def summarize(out_dir: str | Path) -> dict[str, Any]:
    """Aggregate a sweep: counts, mean/median emergence layer, vision share per layer, accuracy.

    Accuracy (normalised string match, :func:`normalize_answer`) is present only when rows
    carry a target answer.
    """
    import numpy as np

    table = read_rows(out_dir)
    if table.num_rows == 0:
        raise SweepError(f"no sweep rows (part-*.parquet) in {out_dir}")
    rows = table.to_pylist()
    ok = [r for r in rows if r["error"] is None]
    first = [e for e in (r["emergence_first"] for r in ok) if e is not None and e >= 0]
    every = [e for r in ok for e in (r["emergence"] or []) if e >= 0]
    shares = [r["vision_share"] for r in ok if r["vision_share"]]
    summary: dict[str, Any] = {
        "examples": len(rows), "errors": len(rows) - len(ok),
        "mean_emergence_first": float(np.mean(first)) if first else None,
        "median_emergence_first": float(np.median(first)) if first else None,
        "mean_emergence_all_tokens": float(np.mean(every)) if every else None,
        "median_emergence_all_tokens": float(np.median(every)) if every else None,
        "vision_share_by_layer": np.mean(shares, axis=0).tolist() if shares else [],
        "mean_seconds": float(np.mean([r["seconds"] for r in rows])),
    }
    targets = [r for r in ok if r["target"] is not None]
    if targets:
        right = sum(normalize_answer(r["answer"]) == normalize_answer(r["target"]) for r in targets)
        summary["accuracy"] = right / len(targets)
        summary["accuracy_n"] = len(targets)
    summary["emergence_first_values"] = first
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Format :func:`summarize`'s result as a plain-text table."""
    def fmt(value: Any) -> str:
        return "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))

    keys = ["examples", "errors", "mean_emergence_first", "median_emergence_first",
            "mean_emergence_all_tokens", "median_emergence_all_tokens", "mean_seconds"]
    keys += [k for k in ("accuracy", "accuracy_n") if k in summary]
    lines = [f"{k:<30} {fmt(summary[k])}" for k in keys]
    lines.append("vision share by layer (image keys, mean over tokens/heads/examples):")
    lines += [f"  layer {i:>3}  {v:.3f}" for i, v in enumerate(summary["vision_share_by_layer"])]
    return "\n".join(lines)


def plot_summary(summary: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``summary_emergence.png`` (histogram) and ``summary_vision_share.png`` into ``out_dir``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out, written = Path(out_dir), []
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = summary["emergence_first_values"]
    n_layers = len(summary["vision_share_by_layer"]) + 1
    ax.hist(values, bins=range(0, max(n_layers, max(values, default=0) + 1) + 1), align="left", rwidth=0.85)
    ax.set(xlabel="emergence layer of the first answer token", ylabel="examples",
           title="When does the answer become top-1?")
    fig.savefig(out / "summary_emergence.png", dpi=110, bbox_inches="tight")
    written.append(out / "summary_emergence.png")
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    share = summary["vision_share_by_layer"]
    ax.plot(range(len(share)), share, marker="o")
    ax.set(xlabel="layer", ylabel="attention share on image tokens", ylim=(0, 1),
           title="Vision-attention share by layer")
    ax.grid(alpha=0.3)
    fig.savefig(out / "summary_vision_share.png", dpi=110, bbox_inches="tight")
    written.append(out / "summary_vision_share.png")
    return written
