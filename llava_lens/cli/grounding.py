"""``llava-lens eval-grounding`` and ``heads``: score grounding maps on object masks; select localization heads."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from llava_lens.cli.common import ModelOptions, at_least, load_lens, model_parent

EVAL_SEED = 7 * 2**50 + 10_000  # = analysis.evaluation.EvalOptions.seed (this module imports no torch at the top)
CALIBRATION_SEED = 7 * 2**50 + 20_000
# question types whose answer word names one object with a mask (the toy scenes' colour/shape questions)
GROUNDING_QTYPES = ("color", "shape")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _qtypes(text: str) -> tuple[str, ...]:
    """An argparse ``type``: comma-separated question types, each one of :data:`GROUNDING_QTYPES`."""
    qtypes = _csv(text)
    bad = [q for q in qtypes if q not in GROUNDING_QTYPES]
    if bad or not qtypes:
        raise argparse.ArgumentTypeError(f"unknown question type(s) {','.join(bad) or repr(text)}; "
                                         f"choose from {','.join(GROUNDING_QTYPES)}")
    return qtypes


def _step(text: str) -> Optional[int]:
    """``--step``: a step index >= 0, or ``answer`` (the step generating the answer word)."""
    if text == "answer":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a step index >= 0 or 'answer', got {text!r}")
    return int(text)


@dataclass(frozen=True, kw_only=True)
class CalibrationOptions(ModelOptions):
    """Calibration scenes (localization heads) and question types, shared by both commands."""

    calibration: int = 50
    calibration_seed: int = CALIBRATION_SEED
    qtypes: tuple[str, ...] = ("color",)
    no_progress: bool = False


@dataclass(frozen=True, kw_only=True)
class GroundingOptions(CalibrationOptions):
    """``llava-lens eval-grounding``: every map method scored on held-out scenes' object masks."""

    scenes: int = 100
    seed: int = EVAL_SEED
    methods: Optional[tuple[str, ...]] = None
    heads: Optional[str] = None
    no_deletion: bool = False
    details: bool = False
    out: Optional[str] = None

    def execute(self) -> int:
        """Score the maps, print the table (and details), and write it to ``out/grounding.md`` if asked."""
        from llava_lens.analysis.details import details_report
        from llava_lens.analysis.evaluation import EvalOptions, evaluate_grounding
        from llava_lens.analysis.localization import LocalizationHeads

        heads = LocalizationHeads.load(self.heads) if self.heads else None
        options = EvalOptions(scenes=self.scenes, calibration=self.calibration, seed=self.seed,
                              calibration_seed=self.calibration_seed, qtypes=self.qtypes, methods=self.methods,
                              deletion=not self.no_deletion, progress=not self.no_progress,
                              keep_traces=self.details, heads=heads)
        lens = load_lens(self)
        result = evaluate_grounding(lens, options)
        text = result.table()
        if self.details:
            text += "\n\n" + details_report(lens, result.traces or [])
        print(text)
        if self.out:
            out = Path(self.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "grounding.md").write_text(text + "\n")
            print(f"table written to {out / 'grounding.md'}", file=sys.stderr)
        return 0


@dataclass(frozen=True, kw_only=True)
class HeadsOptions(CalibrationOptions):
    """``llava-lens heads``: select localization heads (Kang et al. 2025) on calibration scenes; save JSON."""

    step: Optional[int] = 0
    top_k: int = 3
    votes: int = 10
    skip_layers: int = 2
    sigma: float = 1.0
    out: str = "localization_heads.json"

    def execute(self) -> int:
        """Select the heads, print them, save them to ``out``."""
        from llava_lens.analysis.evaluation import calibration_heads
        from llava_lens.analysis.localization import HeadSelection

        selection = HeadSelection(skip_layers=self.skip_layers, votes_per_sample=self.votes, top_k=self.top_k,
                                  sigma=self.sigma, step=self.step)
        lens = load_lens(self)
        heads = calibration_heads(lens, self.calibration, self.calibration_seed, self.qtypes, selection,
                                  progress=not self.no_progress)
        print(heads.describe())
        print(f"heads written to {heads.save(self.out)}", file=sys.stderr)
        return 0


def _calibration_options(p: argparse.ArgumentParser, minimum: int, minimum_help: str) -> None:
    p.add_argument("--calibration", type=at_least(minimum), default=50, metavar="N",
                   help=f"calibration scenes for the localization heads{minimum_help} (default: 50)")
    p.add_argument("--calibration-seed", type=int, default=CALIBRATION_SEED,
                   help="first calibration scene's seed (default: %(default)s)")
    p.add_argument("--qtypes", type=_qtypes, default=("color",),
                   help=f"question types, comma-separated, from {','.join(GROUNDING_QTYPES)} (default: color)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_commands(sub: Any) -> None:
    """Register ``eval-grounding`` and ``heads``."""
    p = sub.add_parser("eval-grounding", parents=[model_parent(generate=False)],
                       help="score every grounding map method on ground-truth masks",
                       description="Pointing game, energy in mask, Obj-IoU/Func-IoU/F1 and deletion/insertion AUC of "
                                   "every map method (attention, VLM-Visualizer, contrastive, occlusion, localization "
                                   "heads, TAM...) on held-out embedded-model scenes; localization heads are selected "
                                   "on separate calibration scenes (docs/grounding.md).")
    p.add_argument("--scenes", type=at_least(1), default=100, help="held-out scenes to score (default: 100)")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="first scored scene's seed (default: %(default)s)")
    _calibration_options(p, 0, ", disjoint from the scored ones; 0: none")
    p.add_argument("--methods", type=_csv, default=None, help="only these map methods, comma-separated (default: all)")
    p.add_argument("--heads", default=None, metavar="JSON",
                   help="localization heads saved by `llava-lens heads`, used for the localization_heads row")
    p.add_argument("--no-deletion", action="store_true", help="skip the deletion/insertion AUCs (faster)")
    p.add_argument("--details", action="store_true",
                   help="also single-head pointing, vision share by word, emergence, knockout, entropy")
    p.add_argument("--out", default=None, help="also write the output to OUT/grounding.md")
    p.set_defaults(options=GroundingOptions.from_args)
    p = sub.add_parser("heads", parents=[model_parent(generate=False)],
                       help="select localization heads (Kang et al. 2025), save as JSON",
                       description="Trace calibration scenes, keep the heads above the elbow of the image-attention "
                                   "curve, vote for the lowest spatial entropy, save the top-k (reuse them with "
                                   "`eval-grounding --heads`).")
    _calibration_options(p, 1, "")
    p.add_argument("--step", type=_step, default=0,
                   help="generated step whose attention is read: 0 = the last prompt token (the paper), or "
                        "'answer' = the step generating the answer word (default: 0)")
    p.add_argument("--top-k", type=at_least(1), default=3, help="heads kept (default: 3)")
    p.add_argument("--votes", type=at_least(1), default=10,
                   help="lowest-entropy heads voted for per sample (default: 10)")
    p.add_argument("--skip-layers", type=at_least(0), default=2, help="first layers never selected (default: 2)")
    p.add_argument("--sigma", type=float, default=1.0, help="Gaussian smoothing of each map, in patches (default: 1)")
    p.add_argument("--out", default="localization_heads.json", help="JSON file to write (default: %(default)s)")
    p.set_defaults(options=HeadsOptions.from_args)
