"""One run owns a sweep folder at a time: OS file locks (``fcntl.flock``), released when the process dies.

Files in the folder: ``.sweep.lock`` (held briefly while a process joins), ``.sweep-rank-<r>.lock``
(held by rank ``r`` for the whole run) and ``.sweep-owner.json`` (the owning run: id, world size,
host and pid per rank). A process may join when no rank lock of the recorded run is held (the run
is over) or when it belongs to the same launch (same :func:`~llava_lens.sweep.launch.run_id`).
Locks are advisory and local: on a network file system, give each run its own ``--out``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional

from llava_lens.errors import SweepError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; one run per folder is then on the user
    fcntl = None  # type: ignore[assignment]

OWNER = ".sweep-owner.json"


@contextlib.contextmanager
def joining(out: Path) -> Iterator[None]:
    """Hold ``.sweep.lock`` exclusively (blocking): one process at a time checks and updates the owner."""
    with _open(out / ".sweep.lock") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def _open(path: Path) -> IO[Any]:
    try:
        return open(path, "a+")
    except OSError as err:
        raise SweepError(f"cannot write to the sweep folder {path.parent}: {err.strerror or err}") from None


def _held(path: Path) -> bool:
    """Whether some process holds the flock on ``path``."""
    if fcntl is None or not path.exists():
        return False
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _read_owner(out: Path) -> Optional[dict]:
    try:
        owner = json.loads((out / OWNER).read_text())
        return owner if isinstance(owner, dict) else None
    except (OSError, ValueError):
        return None


def _live(out: Path, owner: dict) -> bool:
    world = owner.get("world_size", 1)
    world = world if isinstance(world, int) and 0 < world < 1_000_000 else 1
    return any(_held(out / f".sweep-rank-{r}.lock") for r in range(world))


def _describe(owner: dict) -> str:
    pids = owner.get("pids", {})
    where = ", ".join(f"rank {r} pid {p}" for r, p in sorted(pids.items())) or "unknown pid"
    return f"run {owner.get('run_id')!r} on {owner.get('host')} ({where}, started {owner.get('started')})"


@dataclass
class Claim:
    """A process's hold on a sweep folder; ``fresh`` when no process of any run can be writing there."""

    handle: IO[Any]
    fresh: bool

    def release(self) -> None:
        """Let another run have the folder (also happens when the process dies)."""
        if fcntl is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def claim(out: Path, rank: int, world_size: int, run: str) -> Claim:
    """Take rank ``rank``'s lock on ``out`` for run ``run``; call inside :func:`joining`.

    Raises :class:`SweepError` naming the owner when another live run holds the folder.
    """
    owner = previous = _read_owner(out)
    live = owner is not None and _live(out, owner)
    if live and owner is not None and owner.get("run_id") != run:
        raise SweepError(f"{out} is in use by another sweep ({_describe(owner)}); wait for it to "
                         "finish or use another --out")
    handle = _open(out / f".sweep-rank-{rank}.lock")
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SweepError(f"{out}: rank {rank} is already running in this launch "
                             f"({_describe(owner or {})}); two processes have the same RANK") from None
    if not live or owner is None:
        owner = {"run_id": run, "world_size": world_size, "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "pids": {}}
    owner["pids"] = {**owner.get("pids", {}), str(rank): os.getpid()}
    tmp = out / f".{OWNER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(owner))
    os.replace(tmp, out / OWNER)
    # fresh: no process of this or any run can be writing here (a rank of this launch that already
    # finished, or one on a node whose lock we cannot see, keeps it not fresh)
    return Claim(handle, fresh=not live and (previous is None or previous.get("run_id") != run))
