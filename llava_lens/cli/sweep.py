"""``llava-lens sweep`` and ``summary``: many examples into resumable Parquet rows, and their aggregate."""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from llava_lens.cli.common import (
    GenerateOptions,
    Options,
    at_least,
    check_device,
    common_parent,
    load_lens,
    model_parent,
)


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM (torchrun stopping the other ranks when one fails, Slurm's time limit) as Ctrl-C."""
    raise KeyboardInterrupt


@dataclass(frozen=True, kw_only=True)
class SweepOptions(GenerateOptions):
    """``llava-lens sweep DATA --out OUT``: one Parquet row per example; re-run to resume."""

    data: str
    out: str
    question: Optional[str] = None
    question_column: Optional[str] = None
    limit: Optional[int] = None
    shard_size: int = 8
    batch_size: int = 1
    no_progress: bool = False
    force: bool = False

    def recorded(self, world_size: int) -> dict[str, Any]:
        """The options run_sweep stores in ``sweep.json`` (and compares on resume); unset ones left out."""
        skip = ("debug", "force", "no_progress")
        return {k: v for k, v in asdict(self).items() if v is not None and k not in skip} | {"world_size": world_size}

    def execute(self) -> int:
        """Run (or resume) this process's share of the sweep; print the counts."""
        from llava_lens import sweep

        check_device(self.device)
        ctx = sweep.launch_context()
        examples = sweep.iter_examples(self.data, self.question, self.question_column)
        out = Path(self.out)
        lens = load_lens(self)
        previous = signal.signal(signal.SIGTERM, _terminate)  # flush the buffered rows on SIGTERM
        try:
            counts = sweep.run_sweep(lens, examples, out, limit=self.limit, max_new_tokens=self.max_new_tokens,
                                     shard_size=self.shard_size, rank=ctx.rank, world_size=ctx.world_size,
                                     progress=not self.no_progress, batch_size=self.batch_size, force=self.force,
                                     options=self.recorded(ctx.world_size))
        finally:
            signal.signal(signal.SIGTERM, previous)
        tag = f" [{ctx.tag()}]" if ctx.tag() else ""
        print(f"sweep{tag}: {counts['done']} analysed ({counts['errors']} errors), {counts['skipped']} already "
              f"done; rows in {out}", flush=True)
        return 0


@dataclass(frozen=True, kw_only=True)
class SummaryOptions(Options):
    """``llava-lens summary DIR``: print the aggregate of a sweep; write plots and summary.json into DIR."""

    dir: str
    answer_word: str = "target"

    def execute(self) -> int:
        """Summarise the sweep in ``dir``."""
        from llava_lens import sweep
        from llava_lens.views.summary_plot import plot_summary

        summary = sweep.summarize(self.dir, answer_word=self.answer_word)
        print(sweep.format_summary(summary))
        plots = plot_summary(summary, self.dir)
        (Path(self.dir) / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"plots: {', '.join(str(p) for p in plots)}", file=sys.stderr)
        return 0


def add_commands(sub: Any) -> None:
    """Register ``sweep`` and ``summary``."""
    p = sub.add_parser("sweep", parents=[model_parent()], help="logit-lens sweep over a dataset (resumable Parquet)",
                       description="One Parquet row per example; re-run the same command to resume.")
    p.add_argument("data", help="image folder, saved `datasets` dataset, or .parquet/.csv manifest")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--question", help="the question asked about every image")
    q.add_argument("--question-column", help="column of the data holding each example's question")
    p.add_argument("--out", required=True, help="output folder for the Parquet shards")
    p.add_argument("--limit", type=at_least(0), default=None,
                   help="only the first N examples of the data (all ranks together; default: all)")
    p.add_argument("--shard-size", type=at_least(1), default=SweepOptions.shard_size,
                   help=f"rows per Parquet shard, written atomically (default: {SweepOptions.shard_size})")
    p.add_argument("--batch-size", type=at_least(1), default=SweepOptions.batch_size,
                   help="examples generated together per forward pass (same rows, faster on a GPU; default: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true",
                   help="run even if OUT holds rows of a sweep with other options (see sweep.json)")
    p.set_defaults(options=SweepOptions.from_args)
    p = sub.add_parser("summary", parents=[common_parent()],
                       help="aggregate a sweep: emergence, vision share, accuracy; plots",
                       description="Print a summary of a sweep; write plots + summary.json into DIR.")
    p.add_argument("dir", help="the sweep's --out folder")
    p.add_argument("--answer-word", choices=("target", "first-content", "last-content"), default="target",
                   help="which generated token is the answer whose emergence layer is reported: the first word "
                        "found in the target answer (else the first content word; default), the first or the "
                        "last content word")
    p.set_defaults(options=SummaryOptions.from_args)
