"""Grounding benchmark on held-out embedded-model scenes: every map method against the object mask.

Scene ``seed + k`` gets a question of type ``qtypes[k % len(qtypes)]``; maps are read at the step
that generates the answer word (the colour or shape word), and scored with :mod:`.metrics`
(pointing, energy in mask, Obj-IoU; Func-IoU from the function words' steps) and :mod:`.rescoring`
(deletion / insertion AUC). Localization heads are selected on a *calibration* split of other
scenes (``calibration_seed + k``; the two ranges must not overlap). Examples the model answers
wrongly are skipped: they have no grounded answer to explain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np
import torch

from llava_lens import hooks
from llava_lens.analysis.localization import HeadSelection, LocalizationHeads, select_localization_heads
from llava_lens.analysis.methods import HEAD_METHODS, METHODS, HeadSets, Method, build_methods
from llava_lens.analysis.metrics import energy_in_mask, func_iou, iou_f1, obj_iou, patch_chance, pointing_hit
from llava_lens.analysis.progress import progress_bar
from llava_lens.analysis.rescoring import deletion_insertion
from llava_lens.errors import LlavaLensError
from llava_lens.grounding import paint_grid
from llava_lens.toy.evaluate import HELD_OUT_BASE

LAYER_RANGES = {"all": None, "early": "early", "late": "late"}
"""Named layer ranges; ``"early"``/``"late"`` are the first/second half of the LM layers."""
FUNCTION_WORDS = ("the", "a", "an", "there")
"""Answer words TAM's POS rule calls function words (determiners, existential "there")."""


class EvaluationError(LlavaLensError):
    """Inconsistent evaluation options (overlapping splits, nothing to score)."""


@dataclass
class EvalOptions:
    """What :func:`evaluate_grounding` scores and on which scenes."""

    scenes: int = 100
    """Held-out evaluation scenes (one question each)."""
    calibration: int = 50
    """Calibration scenes for the localization heads (0: no head methods unless ``heads`` is given)."""
    seed: int = HELD_OUT_BASE + 10_000
    calibration_seed: int = HELD_OUT_BASE + 20_000
    qtypes: tuple[str, ...] = ("color",)
    methods: Optional[tuple[str, ...]] = None
    """Names from :data:`~llava_lens.analysis.methods.METHODS` (default: all)."""
    layer_ranges: Mapping[str, Any] = field(default_factory=lambda: dict(LAYER_RANGES))
    """Ranges scored for layered (LLM attention) methods; the others get one ``all`` row."""
    deletion: bool = True
    """Deletion / insertion AUC (one batched forward per method and example) for ``all`` rows."""
    progress: bool = False
    keep_traces: bool = False
    heads: Optional[LocalizationHeads] = None
    """A saved selection used for ``localization_heads`` instead of calibrating it."""
    selection: HeadSelection = field(default_factory=HeadSelection)


@dataclass
class Example:
    """One scene, its question and the answer word whose map is scored."""

    index: int
    scene: Any
    qa: Any
    word: str

    @property
    def qtype(self) -> str:
        """The question type (``color``, ``shape``...)."""
        return self.qa.qtype


def examples(n_scenes: int, seed: int, qtypes: Sequence[str]) -> list[Example]:
    """Scene ``seed + k`` with its first question of type ``qtypes[k % len(qtypes)]`` (if it has one)."""
    from llava_lens.toy.scenes import make_scene

    out = []
    for k in range(n_scenes):
        scene = make_scene(seed + k)
        qas = [qa for qa in scene.qas if qa.qtype == qtypes[k % len(qtypes)]]
        if qas:
            out.append(Example(k, scene, qas[0], qas[0].answer.split()[-2]))  # "the star is green ." -> green
    return out


def resolve_layers(spec: Any, n_layers: int) -> Optional[list[int]]:
    """``None`` (all layers), ``"early"``, ``"late"``, or an explicit list of layer indices."""
    if spec == "early":
        return list(range(n_layers // 2))
    if spec == "late":
        return list(range(n_layers // 2, n_layers))
    return None if spec is None else list(spec)


def _word(token: str) -> str:
    return token.lstrip("▁Ġ ").lower()


def answer_step(trace: Any, word: str) -> Optional[int]:
    """Index of the first generated step whose token is ``word`` (tokenizer prefixes ignored)."""
    return next((i for i, tok in enumerate(trace.tokens) if _word(tok) == word.lower()), None)


def prefill_hooks(info: Any) -> list[str]:
    """Raw prefill activations the scored maps read (``info``: a :class:`~llava_lens.trace.ModelInfo`).

    The ViT patterns feeding the projector (VLM-Visualizer, rollout), every block's
    ``hook_resid_pre`` (sinks) and the last ``hook_resid_post`` (TAM).
    """
    n = info.n_layers
    return ([hooks.vit_pattern(layer) for layer in info.vit_layers_used]
            + [hooks.resid_pre(layer) for layer in range(n)] + [hooks.resid_post(n - 1)])


def _trace(lens: Any, ex: Example, prefill: bool) -> tuple[Any, Optional[int]]:
    """Trace one example (float32 attention rows: fp16 rounding would make ties in the pointing game)."""
    names = prefill_hooks(lens.info()) if prefill else False
    trace = lens.trace(ex.scene.image, ex.qa.question, max_new_tokens=len(ex.qa.answer.split()),
                       prefill_cache=names, attention_dtype=torch.float32)
    return trace, answer_step(trace, ex.word)


def _calibration_traces(lens: Any, n: int, seed: int, qtypes: Sequence[str], progress: bool) -> list[tuple]:
    cal = examples(n, seed, qtypes)
    return [(ex, *_trace(lens, ex, False)) for ex in progress_bar(cal, "calibration", progress)]


def _select(traced: Sequence[tuple], selection: HeadSelection) -> LocalizationHeads:
    """Heads from ``(example, trace, answer step)`` triples; ``selection.step=None``: at the answer step."""
    if selection.step is not None:
        return select_localization_heads([t for _, t, _ in traced], selection)
    answered = [(t, s) for _, t, s in traced if s is not None]
    if not answered:
        raise EvaluationError("no calibration scene was answered correctly: no answer step to read")
    return select_localization_heads([t for t, _ in answered], selection, steps=[s for _, s in answered])


def calibration_heads(lens: Any, n: int = 50, seed: int = HELD_OUT_BASE + 20_000, qtypes: Sequence[str] = ("color",),
                      selection: Optional[HeadSelection] = None, progress: bool = False) -> LocalizationHeads:
    """Localization heads selected on ``n`` embedded-model calibration scenes (``seed + k``).

    ``selection.step = None`` reads each scene at the step generating its answer word (scenes the
    model answers wrongly are left out); otherwise at that step (0: the last prompt token).
    """
    return _select(_calibration_traces(lens, n, seed, qtypes, progress), selection or HeadSelection())


def select_heads(lens: Any, options: EvalOptions) -> dict[str, HeadSets]:
    """Localization heads of every :data:`HEAD_METHODS` variant, from the calibration split."""
    if options.calibration <= 0:
        return {"localization_heads": options.heads} if options.heads else {}
    traced = _calibration_traces(lens, options.calibration, options.calibration_seed, options.qtypes,
                                 options.progress)
    at_answer = replace(options.selection, step=None)
    per_type = {qt: _select(mine, at_answer) for qt in options.qtypes
                if (mine := [x for x in traced if x[0].qtype == qt and x[2] is not None])}
    return {"localization_heads": options.heads or _select(traced, options.selection),
            "localization_heads_answer": _select(traced, at_answer),
            "localization_heads_per_type": per_type}


def _score_map(maps: torch.Tensor, trace: Any, ex: Example, step: int) -> dict:
    mask = torch.as_tensor(ex.qa.mask)
    size = tuple(mask.shape)
    heat = paint_grid(maps[step], trace.vision_span, size=size)
    func_steps = [i for i, tok in enumerate(trace.tokens) if _word(tok) in FUNCTION_WORDS and i != step]
    func = func_iou([paint_grid(maps[i], trace.vision_span, size=size) for i in func_steps], [heat])
    return dict(pointing=pointing_hit(heat, mask), energy=energy_in_mask(heat, mask), obj_iou=obj_iou(heat, mask),
                func_iou=func)


def score_example(lens: Any, trace: Any, ex: Example, step: int, methods: Mapping[str, Method],
                  options: EvalOptions) -> list[dict]:
    """One row per method and layer range for one traced example, read at ``step``."""
    mask = torch.as_tensor(ex.qa.mask)
    base = {"example": ex.index, "question": ex.qa.question, "qtype": ex.qtype, "area": float(mask.float().mean()),
            "patch_chance": patch_chance(trace.vision_span, mask)}
    rows = []
    for name, method in methods.items():
        ranges = options.layer_ranges if method.layered else {"all": None}
        for label, spec in ranges.items():
            maps = method.fn(trace, resolve_layers(spec, trace.info.n_layers), ex)
            row = dict(base, method=name, layers=label, **_score_map(maps, trace, ex, step),
                       deletion_auc=np.nan, insertion_auc=np.nan)
            if options.deletion and label == "all":
                di = deletion_insertion(lens, np.asarray(trace.image), trace.question, trace.vision_span,
                                        maps[step], trace.token_ids[:step], trace.token_ids[step])
                row.update(deletion_auc=di.deletion_auc, insertion_auc=di.insertion_auc)
            rows.append(row)
    return rows


def _check(options: EvalOptions) -> None:
    if options.scenes <= 0:
        raise EvaluationError(f"--scenes must be positive (got {options.scenes})")
    if options.calibration < 0:
        raise EvaluationError(f"--calibration must be >= 0 (got {options.calibration})")
    eval_range = range(options.seed, options.seed + options.scenes)
    cal_range = range(options.calibration_seed, options.calibration_seed + options.calibration)
    if options.calibration and max(eval_range.start, cal_range.start) < min(eval_range.stop, cal_range.stop):
        raise EvaluationError(f"calibration scenes {cal_range.start}..{cal_range.stop - 1} overlap the evaluation "
                              f"scenes {eval_range.start}..{eval_range.stop - 1}")
    unknown = [m for m in options.methods or () if m not in METHODS]
    if unknown:
        raise EvaluationError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")


def evaluate_grounding(lens: Any, options: Optional[EvalOptions] = None, **overrides: Any) -> GroundingResult:
    """Score every map method on held-out embedded-model scenes (see the module docstring).

    ``overrides`` replace fields of ``options`` (e.g. ``scenes=50, qtypes=("color", "shape")``;
    ``n_scenes`` is the old name of ``scenes``).
    """
    if "n_scenes" in overrides:
        overrides["scenes"] = overrides.pop("n_scenes")
    options = replace(options or EvalOptions(), **overrides)
    _check(options)
    heads = select_heads(lens, options)
    methods = build_methods(lens, options.methods, heads)
    rows, traces, skipped = [], [], 0
    for ex in progress_bar(examples(options.scenes, options.seed, options.qtypes), "scenes", options.progress):
        trace, step = _trace(lens, ex, True)
        if step is None:
            skipped += 1
            continue
        rows += score_example(lens, trace, ex, step, methods, options)
        if options.keep_traces:
            traces.append((trace, ex.qa, step))
    n = len({r["example"] for r in rows})
    return GroundingResult(rows, n, skipped, heads=heads, options=options, traces=traces or None)


def _pct(v: float) -> str:
    return "-" if v is None or np.isnan(v) else f"{v:.1%}"


def _num(v: float) -> str:
    return "-" if v is None or np.isnan(v) else f"{v:.3f}"


def _heads_text(sel: LocalizationHeads) -> str:
    return ", ".join(f"L{la}H{h}" for la, h in sel.heads)


@dataclass
class GroundingResult:
    """Per-example scores (``rows``: dicts) of every map method and layer range."""

    rows: list[dict]
    n_examples: int
    n_skipped: int
    heads: dict = field(default_factory=dict)
    """The localization heads used, per head method (a selection, or one per question type)."""
    options: Optional[EvalOptions] = None
    traces: Optional[list] = None

    def summary(self) -> Any:
        """A pandas DataFrame of mean scores per method and layer range (F1 from the mean IoUs)."""
        import pandas as pd

        df = pd.DataFrame(self.rows)
        agg = df.groupby(["method", "layers"], sort=False).agg(
            n=("pointing", "size"), pointing=("pointing", "mean"), energy=("energy", "mean"),
            obj_iou=("obj_iou", "mean"), func_iou=("func_iou", "mean"),
            deletion_auc=("deletion_auc", "mean"), insertion_auc=("insertion_auc", "mean")).reset_index()
        agg["f1"] = [iou_f1(o, f) if not np.isnan(f) else np.nan for o, f in zip(agg.obj_iou, agg.func_iou)]
        for qt in df.qtype.unique() if df.qtype.nunique() > 1 else ():
            per = df[df.qtype == qt].groupby(["method", "layers"], sort=False).pointing.mean()
            agg[f"pointing_{qt}"] = [per.get((m, la), np.nan) for m, la in zip(agg.method, agg.layers)]
        return agg

    def table(self) -> str:
        """Markdown: the chance levels, the heads used, and one row per method and layer range."""
        if not self.rows:  # every example answered wrongly: there is no grounded answer to score
            return "no example was answered correctly; nothing to score"
        agg = self.summary()
        qts = [c for c in agg.columns if c.startswith("pointing_")]
        area = float(np.mean([r["area"] for r in self.rows]))
        chance = float(np.mean([r["patch_chance"] for r in self.rows]))
        lines = [f"{self.n_examples} examples scored ({self.n_skipped} wrong answers skipped). Chance: pointing "
                 f"{chance:.1%} (share of patches touching the mask; mask area {area:.1%}), energy in mask "
                 f"{area:.1%} (mask area); the `random` row is chance for the IoUs and AUCs.", ""]
        for name, sel in self.heads.items():
            text = (_heads_text(sel) if isinstance(sel, LocalizationHeads)
                    else "; ".join(f"{qt}: {_heads_text(s)}" for qt, s in sel.items()))
            lines.append(f"- {name} = {text} ({HEAD_METHODS.get(name, 'loaded')})")
        lines += ["", "| method | layers | n | pointing | " + "".join(f"pointing {c[9:]} | " for c in qts)
                  + "energy in mask | Obj-IoU | Func-IoU | F1 | deletion AUC ↓ | insertion AUC ↑ |",
                  "|---|---|---:|---:|" + "---:|" * (len(qts) + 6)]
        for r in agg.to_dict("records"):
            lines.append(f"| {r['method']} | {r['layers']} | {r['n']} | {_pct(r['pointing'])} | "
                         + "".join(f"{_pct(r[c])} | " for c in qts)
                         + f"{_pct(r['energy'])} | {_num(r['obj_iou'])} | {_num(r['func_iou'])} | {_num(r['f1'])} | "
                         f"{_num(r['deletion_auc'])} | {_num(r['insertion_auc'])} |")
        return "\n".join(lines)
