"""``llava-lens``: build the parser from the command modules, run a command, turn errors into one line."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence
from typing import Optional

from llava_lens.cli import grounding, sweep, trace
from llava_lens.cli.common import Parser
from llava_lens.errors import LlavaLensError

DESCRIPTION = """See what a LLaVA model looked at, and when it decided: demo, trace, sweep, summary, report,
eval-grounding, heads. Every command writes only under its output folder and exits with a one-line message and
a non-zero status on bad input (status 2; --debug shows the traceback) or interruption (130)."""


def build_parser() -> Parser:
    """Return the argument parser of ``llava-lens``."""
    from llava_lens import __version__

    parser = Parser(prog="llava-lens", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"llava-lens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for module in (trace, sweep, grounding):
        module.add_commands(sub)
    return parser


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def fix_mmap_threshold(size: int = 128 * 1024) -> bool:
    """Keep glibc's mmap threshold at ``size`` bytes instead of letting it rise; True if set.

    By default glibc raises the threshold to the size of each freed mmapped block (up to 32 MB), so
    the multi-MB tensors a trace allocates and frees (growing KV caches, per-step rows) then come
    from the heap, which fragments and is not given back: +0.3 GB of RSS for a 32-step LLaVA-NeXT
    trace (BENCHMARKS.md). A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, size))
    except (OSError, AttributeError):
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``llava-lens`` console script; return the exit status."""
    args = build_parser().parse_args(argv)
    options = args.options(args)  # usage errors exit 2 here, before anything is loaded
    fix_mmap_threshold()
    try:
        return options.execute()
    except KeyboardInterrupt:
        if options.debug:
            raise
        print("llava-lens: interrupted", file=sys.stderr)
        return 130
    # LlavaLensError: bad input named by llava-lens; ValueError: bad input found by a library;
    # OSError: unwritable output folder, unreadable data file...
    except (LlavaLensError, ValueError, OSError) as err:
        if options.debug:
            raise
        print(f"llava-lens: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
