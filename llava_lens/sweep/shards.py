"""Sweep rows on disk: atomic, uniquely named Parquet shards; unreadable shards are quarantined.

A shard is written to a temporary file, fsynced, then hard-linked to its final name
``part-<rank>-<writer>-<n>.parquet``: ``<writer>`` is random per process, and the link fails
rather than replace an existing file, so no process can overwrite another's rows. A shard is
either complete or absent, whatever moment the process is killed.
"""

from __future__ import annotations

import os
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from llava_lens.sweep.rows import SCHEMA

QUARANTINE = "quarantine"


class SweepWarning(UserWarning):
    """Something in a sweep folder was skipped (an unreadable shard) but the command went on."""


def shard_files(out_dir: str | Path) -> list[Path]:
    """List the finished shards of a sweep (temporary files of an interrupted write excluded)."""
    return sorted(Path(out_dir).glob("part-*.parquet"))


def read_shard(path: Path) -> pa.Table:
    """Read one shard, checked against ``SCHEMA``; raise ``ValueError`` naming why it is unusable."""
    try:
        schema = pq.read_schema(path)
        missing = [f.name for f in SCHEMA if f.name not in schema.names]
        if missing:
            raise ValueError(f"not a sweep shard (no column {', '.join(missing)})")
        return pq.read_table(path, schema=SCHEMA)
    except (OSError, pa.ArrowException) as err:  # truncated, empty, not Parquet, wrong types
        raise ValueError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None


@dataclass
class Scan:
    """What a sweep folder holds: the readable shards' tables, and the unreadable ones with reasons."""

    tables: list[pa.Table] = field(default_factory=list)
    bad: list[tuple[Path, str]] = field(default_factory=list)


def scan(out_dir: str | Path) -> Scan:
    """Read every shard of ``out_dir``; a shard that cannot be read is listed in ``bad``, not raised."""
    result = Scan()
    for path in shard_files(out_dir):
        try:
            result.tables.append(read_shard(path))
        except FileNotFoundError:  # quarantined by another rank meanwhile
            continue
        except ValueError as err:
            result.bad.append((path, str(err)))
    return result


def quarantine(out_dir: str | Path, bad: list[tuple[Path, str]]) -> list[Path]:
    """Move unreadable shards to ``<out>/quarantine/`` (their ids are then redone); return new paths."""
    folder = Path(out_dir) / QUARANTINE
    moved = []
    for path, _reason in bad:
        folder.mkdir(exist_ok=True)
        target = folder / path.name
        while target.exists():  # never overwrite an earlier quarantined file
            target = folder / f"{path.stem}-{secrets.token_hex(2)}{path.suffix}"
        try:
            os.replace(path, target)
        except FileNotFoundError:  # another rank moved it first
            continue
        moved.append(target)
    return moved


def _warn_bad(bad: list[tuple[Path, str]]) -> None:
    for path, reason in bad:
        warnings.warn(f"skipped unreadable shard {path.name}: {reason}", SweepWarning, stacklevel=3)


def done_ids(out_dir: str | Path) -> set[str]:
    """Ids of the examples already written to ``out_dir``'s readable shards."""
    found = scan(out_dir)
    _warn_bad(found.bad)
    return {i for t in found.tables for i in t.column("id").to_pylist()}


def read_rows(out_dir: str | Path) -> pa.Table:
    """All rows of a sweep's readable shards as one Arrow table (empty table with ``SCHEMA`` when none).

    Unreadable shards are skipped with a :class:`SweepWarning` (a resumed sweep quarantines them).
    """
    found = scan(out_dir)
    _warn_bad(found.bad)
    return pa.concat_tables(found.tables) if found.tables else SCHEMA.empty_table()


class ShardWriter:
    """Buffers rows and writes them as atomic, never-overwriting Parquet shards."""

    def __init__(self, out_dir: str | Path, rank: int = 0, shard_size: int = 4):
        self.out = Path(out_dir)
        self.rank, self.shard_size = rank, max(1, shard_size)
        self.writer = secrets.token_hex(4)  # unique per process: names never collide across runs
        self.rows: list[dict] = []
        self.next_index = 0

    def add(self, row: dict) -> None:
        """Buffer ``row``; write a shard once ``shard_size`` rows are waiting."""
        self.rows.append(row)
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows (if any) to a new shard: temp file, fsync, then a no-clobber link."""
        if not self.rows:
            return
        while True:
            name = f"part-{self.rank}-{self.writer}-{self.next_index:05d}"
            tmp, final = self.out / f".{name}.tmp", self.out / f"{name}.parquet"
            self.next_index += 1
            if not final.exists():
                break
        pq.write_table(pa.Table.from_pylist(self.rows, schema=SCHEMA), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # data on disk before the link makes it visible
        try:
            os.link(tmp, final)  # unlike os.replace, fails if the name exists
        except FileExistsError:
            tmp.unlink()
            raise
        except OSError:  # a file system without hard links: the random writer id keeps names unique
            os.replace(tmp, final)
        else:
            tmp.unlink()
        self.rows = []
