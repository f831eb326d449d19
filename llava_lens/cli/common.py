"""What every ``llava-lens`` command shares: the one-line-error parser, options, checks, model loading.

Nothing here imports torch at module level: ``--help`` and argument errors must stay instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Optional

from llava_lens.defaults import DEFAULT_MAX_NEW_TOKENS
from llava_lens.errors import LlavaLensError

DTYPES = ("auto", "float32", "bfloat16", "float16")


class UsageError(LlavaLensError, ValueError):
    """A command-line option that can only be checked once torch or the model is at hand."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``llava-lens: error: ...``) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print a one-line usage error and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= minimum`` (argparse names the flag in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


@dataclass(frozen=True, kw_only=True)
class Options:
    """Options of every command; subclasses add theirs and implement :meth:`execute`."""

    debug: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        """The options of this command from a parsed namespace (extra namespace entries ignored)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def execute(self) -> int:
        """Run the command; return the exit status."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class ModelOptions(Options):
    """Which model to load, where and how."""

    model: Optional[str] = None
    device: Optional[str] = None
    device_map: Optional[str] = None
    n_devices: Optional[int] = None
    dtype: str = "auto"


@dataclass(frozen=True, kw_only=True)
class GenerateOptions(ModelOptions):
    """A model that generates answers of at most ``max_new_tokens`` tokens."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS


def common_parent() -> argparse.ArgumentParser:
    """``--debug``, on every command."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def model_parent(generate: bool = True) -> argparse.ArgumentParser:
    """``--model --device|--device-map|--n-devices --dtype`` (and ``--max-new-tokens`` if ``generate``)."""
    p = argparse.ArgumentParser(add_help=False, parents=[common_parent()])
    p.add_argument("--model", default=None, help="model folder or hub id (default: embedded shapes-tiny)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device", default=None,
                       help="torch device, e.g. cpu or cuda:1 (default: cuda if any; cuda:<LOCAL_RANK> "
                            "under torchrun/accelerate)")
    where.add_argument("--device-map", default=None,
                       help="shard the model over GPUs: a HF device map such as auto or balanced")
    where.add_argument("--n-devices", type=at_least(1), default=None, metavar="K",
                       help="shard the model over the first K GPUs")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bf16 on CUDA, else fp32 (default: auto)")
    if generate:
        p.add_argument("--max-new-tokens", type=at_least(1), default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                       help=f"stop each answer after N tokens (default: {DEFAULT_MAX_NEW_TOKENS})")
    return p


def add_layers(p: argparse.ArgumentParser) -> None:
    """``--layers L [L ...]``: LM layers of the attention pages and heatmaps."""
    p.add_argument("--layers", type=int, nargs="+", default=None, metavar="L",
                   help="LM layers for the attention pages and heatmaps (negative counts from the end; "
                        "default: all)")


def check_device(device: Optional[str]) -> None:
    """Refuse a ``--device`` torch cannot parse or this machine does not have, before any model load."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {device}: no CUDA GPU is available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available on this machine")


def check_layers(layers: Optional[Sequence[int]], n_layers: int) -> None:
    """Refuse ``--layers`` outside ``-n_layers .. n_layers - 1``, naming the valid range."""
    bad = [layer for layer in layers or () if not -n_layers <= layer < n_layers]
    if bad:
        raise UsageError(f"--layers {' '.join(map(str, bad))}: the model has {n_layers} layers "
                         f"(valid: 0..{n_layers - 1}, or -{n_layers}..-1 from the end)")


def _default_device(opts: ModelOptions) -> Optional[str]:
    """``--device``; else, on CUDA, ``cuda:<LOCAL_RANK>`` (0 outside torchrun/accelerate); else CPU."""
    import torch

    from llava_lens.sweep import launch_context

    if opts.device or opts.device_map or opts.n_devices:
        return opts.device
    if torch.cuda.is_available():
        local_rank = launch_context().local_rank
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    return None


def load_lens(opts: ModelOptions) -> Any:
    """Load ``--model`` with ``--dtype`` on ``--device`` or sharded (``--device-map``/``--n-devices``).

    Without ``--device``, a process of a ``torchrun``/``accelerate`` launch uses ``cuda:<LOCAL_RANK>``.
    """
    import torch

    import llava_lens as ll  # at call time, so tests can monkeypatch ``llava_lens.load``

    check_device(opts.device)
    dtype = None if opts.dtype == "auto" else getattr(torch, opts.dtype)
    shard = {k: v for k, v in (("device_map", opts.device_map), ("n_devices", opts.n_devices)) if v is not None}
    if shard and int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) > 1:
        print("llava-lens: warning: --device-map/--n-devices with several processes per node: each "
              "process spreads over the same GPUs (use --nproc-per-node 1, or CUDA_VISIBLE_DEVICES "
              "per process)", file=sys.stderr)
    try:
        return ll.load(opts.model, device=_default_device(opts), dtype=dtype, **shard)
    except ValueError as err:
        if not shard or isinstance(err, LlavaLensError):
            raise
        raise LlavaLensError(f"cannot load the model with {shard}: {str(err).splitlines()[0]}") from None
