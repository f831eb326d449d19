"""The ``llava-lens`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from llava_lens.errors import LlavaLensError


def _cmd_trace(args: argparse.Namespace) -> int:
    import llava_lens as ll

    lens = ll.load(args.model, device=args.device)
    trace = lens.trace(args.image, args.question, max_new_tokens=args.max_new_tokens)
    print(trace.text)
    if args.out:
        print(f"trace saved to {trace.save(args.out)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``llava-lens``."""
    parser = argparse.ArgumentParser(prog="llava-lens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("trace", help="answer a question about an image and save the trace")
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--model", default=None, help="model directory or hub id (default: embedded model)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="directory to save the trace in")
    p.set_defaults(func=_cmd_trace)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``llava-lens`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LlavaLensError as err:
        print(f"llava-lens: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
