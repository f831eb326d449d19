"""Where a process sits in a multi-process launch, and which examples are its share."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from llava_lens.errors import SweepError


def is_mine(example_id: str, rank: int = 0, world_size: int = 1) -> bool:
    """Whether ``example_id`` belongs to ``rank`` of ``world_size``, by a stable hash of the id.

    The one place that splits work across processes (e.g. torchrun ranks): sha1, not ``hash``,
    because Python's string hash changes between processes.
    """
    if world_size <= 1:
        return True
    digest = hashlib.sha1(example_id.encode("utf-8", "surrogatepass")).digest()
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


def _env_int(env: Mapping[str, Any], name: str, default: int) -> int:
    value = str(env.get(name, "")).strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SweepError(f"environment variable {name}={value!r} is not an integer") from None


def launch_context(env: Optional[Mapping[str, Any]] = None) -> LaunchContext:
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


def run_id(world_size: int, env: Optional[Mapping[str, Any]] = None) -> str:
    """An id shared by the ranks of one launch and by no other run (who may share an output folder).

    ``LLAVA_LENS_RUN_ID`` wins; then torchrun/accelerate's ``TORCHELASTIC_RUN_ID``, Slurm's job
    and step ids, ``MASTER_ADDR:MASTER_PORT``. A single process is its own run (host + pid).
    """
    env = os.environ if env is None else env
    own = f"{socket.gethostname()}:{os.getpid()}"
    if env.get("LLAVA_LENS_RUN_ID"):
        return str(env["LLAVA_LENS_RUN_ID"])
    if world_size <= 1:
        return own
    if env.get("TORCHELASTIC_RUN_ID"):
        return f"torchelastic:{env['TORCHELASTIC_RUN_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}"
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return f"master:{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    return own
