"""The ``llava-lens`` command line: demo, trace, sweep, summary, report, eval-grounding, heads.

Every command writes only under its output folder and exits with a one-line message and a
non-zero status on bad input (status 2) or interruption (130).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from llava_lens.errors import LlavaLensError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEMO_QUESTION = "How many objects are there?"  # words the embedded model knows
EVAL_SEED = 7 * 2**50 + 10_000  # = analysis.evaluation.EvalOptions.seed (this module imports no torch at the top)
CALIBRATION_SEED = 7 * 2**50 + 20_000


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``llava-lens: error: ...``) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print a one-line usage error and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _device(args: argparse.Namespace) -> Optional[str]:
    """``--device``; else, on CUDA, ``cuda:<LOCAL_RANK>`` (0 outside torchrun/accelerate); else CPU."""
    import torch

    from llava_lens.sweep import launch_context

    if args.device or getattr(args, "device_map", None) or getattr(args, "n_devices", None):
        return args.device
    if torch.cuda.is_available():
        local_rank = launch_context().local_rank
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    return None


def _load(args: argparse.Namespace) -> Any:
    """Load ``--model`` with ``--dtype`` on ``--device`` or sharded (``--device-map``/``--n-devices``).

    Without ``--device``, a process of a ``torchrun``/``accelerate`` launch uses ``cuda:<LOCAL_RANK>``.
    """
    import torch

    import llava_lens as ll

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    shard = {k: v for k, v in (("device_map", getattr(args, "device_map", None)),
                               ("n_devices", getattr(args, "n_devices", None))) if v is not None}
    if shard and int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) > 1:
        print("llava-lens: warning: --device-map/--n-devices with several processes per node: each "
              "process spreads over the same GPUs (use --nproc-per-node 1, or CUDA_VISIBLE_DEVICES "
              "per process)", file=sys.stderr)
    try:
        return ll.load(args.model, device=_device(args), dtype=dtype, **shard)
    except ValueError as err:
        if not shard or isinstance(err, LlavaLensError):
            raise
        raise LlavaLensError(f"cannot load the model with {shard}: {str(err).splitlines()[0]}") from None


def analyse_to_dir(lens: Any, image: Any, question: str, out: Path, layers: Optional[Sequence[int]] = None,
                   max_new_tokens: int = 16) -> Any:
    """Trace one example, export every view and the HTML report into ``out``; return the trace."""
    import llava_lens as ll
    from llava_lens.views.report import write_report

    # prefill_cache: the ViT attention maps and prompt-position logit lens need the prefill
    trace = lens.trace(image, question, max_new_tokens=max_new_tokens, prefill_cache=True)
    result = ll.logit_lens(trace, lens, k=5)
    ll.views.export(trace, out, result, layers=layers)
    write_report(out, layers=layers)
    return trace


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "run"


def _cmd_trace(args: argparse.Namespace) -> int:
    from llava_lens.inputs import load_image

    image = load_image(args.image)  # fail on a bad image before the (slow) model load
    default = Path("analysis_results") / f"{_slug(Path(args.image).stem)}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out) if args.out else default
    lens = _load(args)
    trace = analyse_to_dir(lens, image, args.question, out, args.layers, args.max_new_tokens)
    print(trace.text)
    print(f"views and report written to {out} (open {out / 'report.html'})", file=sys.stderr)
    return 0


def demo_examples(n_scenes: int = 3) -> list[tuple[str, Any, str]]:
    """``(name, image, question)`` of the demo: built-in shape scenes plus matplotlib's sample photo."""
    from matplotlib import cbook

    from llava_lens.toy.scenes import make_scene

    examples = []
    for seed in range(n_scenes):
        scene = make_scene(seed)
        qa = scene.qas[seed % len(scene.qas)]  # vary the question type across scenes
        examples.append((f"scene_{seed}_{qa.qtype}", scene.pil(), qa.question))
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        examples.append(("grace_hopper", f.read(), DEMO_QUESTION))
    return examples


def _demo_index(out: Path, rows: list[tuple[str, str, str]]) -> Path:
    """Write a small offline index page linking each example's report."""
    items = "".join(f'<li><a href="{html.escape(name)}/report.html">{html.escape(name)}</a>: '
                    f"{html.escape(q)} → <b>{html.escape(a)}</b></li>" for name, q, a in rows)
    path = out / "index.html"
    text = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>llava-lens demo</title>'
            f"</head><body><h2>llava-lens demo</h2><ul>{items}</ul></body></html>\n")
    path.write_text(text, encoding="utf-8")
    return path


def _cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    lens = _load(args)
    rows = []
    for name, image, question in demo_examples(args.scenes):
        trace = analyse_to_dir(lens, image, question, out / name, args.layers, args.max_new_tokens)
        rows.append((name, question, trace.text))
        print(f"{name}: {question} -> {trace.text!r}")
    index = _demo_index(out, rows)
    print(f"demo written to {out} (open {index})")
    return 0


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM (torchrun stopping the other ranks when one fails, Slurm's time limit) as Ctrl-C."""
    raise KeyboardInterrupt


def _write_config(args: argparse.Namespace, out: Path, world_size: int) -> None:
    """Write ``sweep.json`` (the command's options) atomically; called by rank 0 only."""
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config["world_size"] = world_size
    tmp = out / ".sweep.json.tmp"
    tmp.write_text(json.dumps(config, indent=1, default=str))
    os.replace(tmp, out / "sweep.json")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from llava_lens import sweep

    ctx = sweep.launch_context()
    examples = sweep.iter_examples(args.data, args.question, args.question_column)
    out = Path(args.out)
    lens = _load(args)
    out.mkdir(parents=True, exist_ok=True)
    if ctx.rank == 0:
        _write_config(args, out, ctx.world_size)
    previous = signal.signal(signal.SIGTERM, _terminate)  # flush the buffered rows on SIGTERM
    try:
        counts = sweep.run_sweep(lens, examples, out, limit=args.limit, max_new_tokens=args.max_new_tokens,
                                 shard_size=args.shard_size, rank=ctx.rank, world_size=ctx.world_size,
                                 progress=not args.no_progress, batch_size=args.batch_size)
    finally:
        signal.signal(signal.SIGTERM, previous)
    tag = f" [{ctx.tag()}]" if ctx.tag() else ""
    print(f"sweep{tag}: {counts['done']} analysed ({counts['errors']} errors), {counts['skipped']} already "
          f"done; rows in {out}", flush=True)
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from llava_lens import sweep

    summary = sweep.summarize(args.dir)
    print(sweep.format_summary(summary))
    plots = sweep.plot_summary(summary, args.dir)
    (Path(args.dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"plots: {', '.join(str(p) for p in plots)}", file=sys.stderr)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from llava_lens.views.report import write_report

    print(write_report(args.run_dir, layers=args.layers))
    return 0


def _cmd_eval_grounding(args: argparse.Namespace) -> int:
    from llava_lens.analysis.details import details_report
    from llava_lens.analysis.evaluation import EvalOptions, evaluate_grounding
    from llava_lens.analysis.localization import LocalizationHeads

    heads = LocalizationHeads.load(args.heads) if args.heads else None
    options = EvalOptions(scenes=args.scenes, calibration=args.calibration, seed=args.seed,
                          calibration_seed=args.calibration_seed, qtypes=args.qtypes, methods=args.methods,
                          deletion=not args.no_deletion, progress=not args.no_progress,
                          keep_traces=args.details, heads=heads)
    lens = _load(args)
    result = evaluate_grounding(lens, options)
    text = result.table()
    if args.details:
        text += "\n\n" + details_report(lens, result.traces or [])
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "grounding.md").write_text(text + "\n")
        print(f"table written to {out / 'grounding.md'}", file=sys.stderr)
    return 0


def _cmd_heads(args: argparse.Namespace) -> int:
    from llava_lens.analysis.evaluation import calibration_heads
    from llava_lens.analysis.localization import HeadSelection

    selection = HeadSelection(skip_layers=args.skip_layers, votes_per_sample=args.votes, top_k=args.top_k,
                              sigma=args.sigma, step=args.step)
    lens = _load(args)
    heads = calibration_heads(lens, args.calibration, args.calibration_seed, args.qtypes, selection,
                              progress=not args.no_progress)
    print(heads.describe())
    print(f"heads written to {heads.save(args.out)}", file=sys.stderr)
    return 0


def _csv(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _step(text: str) -> Optional[int]:
    """``--step``: a step index >= 0, or ``answer`` (the step generating the answer word)."""
    if text == "answer":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a step index >= 0 or 'answer', got {text!r}")
    return int(text)


def _calibration_options(p: argparse.ArgumentParser, minimum_help: str) -> None:
    p.add_argument("--calibration", type=int, default=50, metavar="N",
                   help=f"calibration scenes for the localization heads{minimum_help} (default: 50)")
    p.add_argument("--calibration-seed", type=int, default=CALIBRATION_SEED,
                   help="first calibration scene's seed (default: %(default)s)")
    p.add_argument("--qtypes", type=_csv, default=("color",), help="question types, comma-separated (color,shape)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _grounding_commands(sub: Any, model: argparse.ArgumentParser) -> None:
    p = sub.add_parser("eval-grounding", parents=[model], help="score every grounding map method on ground-truth masks",
                       description="Pointing game, energy in mask, Obj-IoU/Func-IoU/F1 and deletion/insertion AUC of "
                                   "every map method (attention, VLM-Visualizer, contrastive, occlusion, localization "
                                   "heads, TAM...) on held-out embedded-model scenes; localization heads are selected "
                                   "on separate calibration scenes (docs/grounding.md).")
    p.add_argument("--scenes", type=int, default=100, help="held-out scenes to score (default: 100)")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="first scored scene's seed (default: %(default)s)")
    _calibration_options(p, ", disjoint from the scored ones; 0: none")
    p.add_argument("--methods", type=_csv, default=None, help="only these map methods, comma-separated (default: all)")
    p.add_argument("--heads", default=None, metavar="JSON",
                   help="localization heads saved by `llava-lens heads`, used for the localization_heads row")
    p.add_argument("--no-deletion", action="store_true", help="skip the deletion/insertion AUCs (faster)")
    p.add_argument("--details", action="store_true",
                   help="also single-head pointing, vision share by word, emergence, knockout, entropy")
    p.add_argument("--out", default=None, help="also write the output to OUT/grounding.md")
    p.set_defaults(func=_cmd_eval_grounding)
    p = sub.add_parser("heads", parents=[model], help="select localization heads (Kang et al. 2025), save as JSON",
                       description="Trace calibration scenes, keep the heads above the elbow of the image-attention "
                                   "curve, vote for the lowest spatial entropy, save the top-k (reuse them with "
                                   "`eval-grounding --heads`).")
    _calibration_options(p, "")
    p.add_argument("--step", type=_step, default=0,
                   help="generated step whose attention is read: 0 = the last prompt token (the paper), or "
                        "'answer' = the step generating the answer word (default: 0)")
    p.add_argument("--top-k", type=int, default=3, help="heads kept (default: 3)")
    p.add_argument("--votes", type=int, default=10, help="lowest-entropy heads voted for per sample (default: 10)")
    p.add_argument("--skip-layers", type=int, default=2, help="first layers never selected (default: 2)")
    p.add_argument("--sigma", type=float, default=1.0, help="Gaussian smoothing of each map, in patches (default: 1)")
    p.add_argument("--out", default="localization_heads.json", help="JSON file to write (default: %(default)s)")
    p.set_defaults(func=_cmd_heads)


def _model_options() -> argparse.ArgumentParser:
    """Options shared by every command that runs a model."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", default=None, help="model folder or hub id (default: embedded shapes-tiny)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device", default=None,
                       help="torch device, e.g. cpu or cuda:1 (default: cuda if any; cuda:<LOCAL_RANK> "
                            "under torchrun/accelerate)")
    where.add_argument("--device-map", default=None,
                       help="shard the model over GPUs: a HF device map such as auto or balanced")
    where.add_argument("--n-devices", type=int, default=None,
                       help="shard the model over the first K GPUs")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--max-new-tokens", type=int, default=16, help="stop each answer after N tokens")
    return p


def _layers_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="LM layers for the attention pages and heatmaps (negative counts from the end)")


def _add_commands(sub: Any, model: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[model], help="run the model on built-in examples and write reports",
                       description="Trace a few built-in shape scenes and a sample photo; one report each.")
    p.add_argument("--out", default="analysis_results/demo", help="output folder")
    p.add_argument("--scenes", type=int, default=3, help="number of built-in shape scenes")
    _layers_option(p)
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("trace", parents=[model], help="answer a question about an image; views + report",
                       description="Generate an answer, then write the views and report.html.")
    p.add_argument("image", help="image file")
    p.add_argument("question", help="question about the image")
    p.add_argument("--out", default=None, help="output folder (default: analysis_results/<image>-<time>)")
    _layers_option(p)
    p.set_defaults(func=_cmd_trace)
    p = sub.add_parser("sweep", parents=[model], help="logit-lens sweep over a dataset (resumable Parquet)",
                       description="One Parquet row per example; re-run the same command to resume.")
    p.add_argument("data", help="image folder, saved `datasets` dataset, or .parquet/.csv manifest")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--question", help="the question asked about every image")
    q.add_argument("--question-column", help="column of the data holding each example's question")
    p.add_argument("--out", required=True, help="output folder for the Parquet shards")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N examples of the data (all ranks together)")
    p.add_argument("--shard-size", type=int, default=8, help="rows per Parquet shard (written atomically)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="examples generated together per forward pass (same rows, faster on a GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sweep)
    p = sub.add_parser("summary", help="aggregate a sweep: emergence, vision share, accuracy; plots",
                       description="Print a summary of a sweep; write plots + summary.json into DIR.")
    p.add_argument("dir", help="the sweep's --out folder")
    p.set_defaults(func=_cmd_summary)
    p = sub.add_parser("report", help="write RUN_DIR/report.html, one self-contained offline file",
                       description="Build report.html from the views written by demo/trace.")
    p.add_argument("run_dir", help="a folder written by `llava-lens trace` or views.export")
    _layers_option(p)
    p.set_defaults(func=_cmd_report)
    _grounding_commands(sub, model)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``llava-lens``."""
    parser = _Parser(prog="llava-lens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_commands(sub, _model_options())
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``llava-lens`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LlavaLensError as err:
        print(f"llava-lens: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # unwritable output folder, unreadable data file...
        print(f"llava-lens: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llava-lens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
