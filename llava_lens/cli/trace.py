"""``llava-lens trace``, ``demo`` and ``report``: one example (or a few) into a run folder with a report."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from llava_lens.cli.common import (
    GenerateOptions,
    Options,
    add_layers,
    at_least,
    check_device,
    check_layers,
    common_parent,
    load_lens,
    model_parent,
)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "run"


@dataclass(frozen=True, kw_only=True)
class TraceOptions(GenerateOptions):
    """``llava-lens trace IMAGE QUESTION``: answer, then write the views and report.html into ``out``."""

    image: str
    question: str
    out: Optional[str] = None
    layers: Optional[list[int]] = None

    def execute(self) -> int:
        """Trace the example into ``out`` (default ``analysis_results/<image>-<time>``); print the answer."""
        from llava_lens.inputs import load_image
        from llava_lens.run import analyse_to_dir

        check_device(self.device)
        image = load_image(self.image)  # fail on a bad image before the (slow) model load
        default = Path("analysis_results") / f"{_slug(Path(self.image).stem)}-{time.strftime('%Y%m%d-%H%M%S')}"
        out = Path(self.out) if self.out else default
        lens = load_lens(self)
        check_layers(self.layers, lens.n_layers)
        trace = analyse_to_dir(lens, image, self.question, out, self.layers, self.max_new_tokens)
        print(trace.text)
        print(f"views and report written to {out} (open {out / 'report.html'})", file=sys.stderr)
        return 0


@dataclass(frozen=True, kw_only=True)
class DemoOptions(GenerateOptions):
    """``llava-lens demo``: built-in shape scenes and a sample photo, one report each, plus index.html."""

    out: str = "analysis_results/demo"
    scenes: int = 3
    layers: Optional[list[int]] = None

    def execute(self) -> int:
        """Run the demo into ``out``."""
        from llava_lens.run import run_demo

        lens = load_lens(self)
        check_layers(self.layers, lens.n_layers)
        index = run_demo(lens, self.out, self.scenes, self.layers, self.max_new_tokens, echo=print)
        print(f"demo written to {self.out} (open {index})")
        return 0


@dataclass(frozen=True, kw_only=True)
class ReportOptions(Options):
    """``llava-lens report RUN_DIR``: rebuild report.html from the saved views (no model)."""

    run_dir: str
    layers: Optional[list[int]] = None

    def execute(self) -> int:
        """Write ``run_dir/report.html``; print its path."""
        from llava_lens.views.report import write_report

        n_layers = _saved_n_layers(self.run_dir)
        if n_layers is not None:
            check_layers(self.layers, n_layers)
        print(write_report(self.run_dir, layers=self.layers))
        return 0


def _saved_n_layers(run_dir: str) -> Optional[int]:
    """The LM layer count in a run folder's ``trace.json`` (``None`` if unreadable: write_report says why)."""
    try:
        return int(json.loads((Path(run_dir) / "trace.json").read_text())["info"]["n_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _question(p: argparse.ArgumentParser) -> None:
    """QUESTION positionally (``trace IMAGE QUESTION``) or as ``--question``, like ``sweep``."""
    p.add_argument("question", nargs="?", default=None, help="question about the image (or --question)")
    p.add_argument("--question", dest="question_flag", default=None, metavar="QUESTION",
                   help="the question, as a flag")


def trace_options(args: argparse.Namespace) -> TraceOptions:
    """:class:`TraceOptions` from ``trace``'s namespace: exactly one of QUESTION and --question."""
    if (args.question is None) == (args.question_flag is None):
        args.parser.error("give the question once: `trace IMAGE QUESTION` or `trace IMAGE --question QUESTION`")
    question = args.question_flag if args.question is None else args.question
    return TraceOptions.from_args(argparse.Namespace(**{**vars(args), "question": question}))


def add_commands(sub: Any) -> None:
    """Register ``demo``, ``trace`` and ``report``."""
    p = sub.add_parser("demo", parents=[model_parent()], help="run the model on built-in examples and write reports",
                       description="Trace a few built-in shape scenes and a sample photo; one report each, "
                                   "linked from OUT/index.html.")
    p.add_argument("--out", default=DemoOptions.out, help=f"output folder (default: {DemoOptions.out})")
    p.add_argument("--scenes", type=at_least(0), default=DemoOptions.scenes,
                   help=f"number of built-in shape scenes (default: {DemoOptions.scenes})")
    add_layers(p)
    p.set_defaults(options=DemoOptions.from_args)
    p = sub.add_parser("trace", parents=[model_parent()], help="answer a question about an image; views + report",
                       description="Generate an answer, then write the views and report.html.")
    p.add_argument("image", help="image file")
    _question(p)
    p.add_argument("--out", default=None, help="output folder (default: analysis_results/<image>-<time>)")
    add_layers(p)
    p.set_defaults(options=trace_options, parser=p)
    p = sub.add_parser("report", parents=[common_parent()],
                       help="write RUN_DIR/report.html, one self-contained offline file",
                       description="Build report.html from the views written by demo/trace.")
    p.add_argument("run_dir", help="a folder written by `llava-lens trace` or views.export")
    add_layers(p)
    p.set_defaults(options=ReportOptions.from_args)
