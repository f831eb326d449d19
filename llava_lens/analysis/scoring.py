"""Score image-grounding maps against ground-truth object masks.

Metrics for one ``[rows, cols]`` map of grid 0, painted onto the image with
:func:`llava_lens.grounding.paint_grid`:

- :func:`pointing_hit`: the map's maximum lies inside the mask (pointing game);
- :func:`energy_in_mask`: share of the (non-negative) map's mass inside the mask;
- :func:`deletion_insertion`: mask out / put back the top-k% patches by the map, re-run the model
  teacher-forced on the answer (one batched forward), and read the answer token's probability.

:func:`evaluate_grounding` runs all of them over held-out embedded-model scenes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from llava_lens.families import VisionSpan
from llava_lens.grounding import paint_grid

FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def pointing_hit(heat: torch.Tensor, mask: Any) -> bool:
    """True when a maximal pixel of ``heat [H, W]`` lies inside boolean ``mask [H, W]``.

    Several pixels share the maximum when the map was painted from patches: the hit counts when
    any of them is in the mask (so the right chance level is the share of patches touching the
    mask, see :func:`patch_chance`). A constant map carries no information and never hits.
    """
    heat, mask = _as_tensor(heat).float(), _as_tensor(mask).bool()
    if heat.max() <= heat.min():
        return False
    return bool((mask & (heat == heat.max())).any())


def energy_in_mask(heat: torch.Tensor, mask: Any) -> float:
    """Share of ``heat``'s mass (negative values clamped to 0) inside ``mask``; 0 for an empty map."""
    heat, mask = _as_tensor(heat).float().clamp_min(0), _as_tensor(mask).bool()
    total = float(heat.sum())
    return float(heat[mask].sum()) / total if total > 0 else 0.0


def patch_chance(span: VisionSpan, mask: Any) -> float:
    """Share of grid-0 patches whose box touches ``mask``: the pointing chance of a random patch."""
    rows, cols = span.grids[0]
    cells = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    painted = paint_grid(cells, span, size=tuple(_as_tensor(mask).shape))
    touched = painted[_as_tensor(mask).bool()].long().unique()
    return len(touched) / (rows * cols)


def patch_order(grid: torch.Tensor) -> torch.Tensor:
    """Grid cells (flat indices) from the highest map value to the lowest (stable on ties)."""
    return torch.sort(grid.flatten().float(), descending=True, stable=True).indices


def masked_images(image: np.ndarray, span: VisionSpan, order: torch.Tensor,
                  fractions: Sequence[float] = FRACTIONS) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Deletion and insertion images for each fraction of the patches in ``order``.

    Deletion replaces the top ``f`` patches by the image's median colour (the background);
    insertion starts from a canvas of that colour (over the patches' region; pixels outside every
    patch box, e.g. centre-cropped margins, stay as they are) and puts the top ``f`` patches back.
    """
    rows, cols = span.grids[0]
    h, w = image.shape[:2]
    fill = np.median(image.reshape(-1, 3), axis=0).astype(image.dtype)
    covered = paint_grid(torch.ones(rows, cols), span, size=(h, w)).numpy() > 0  # pixels the model sees
    cells = torch.zeros(rows * cols)
    deletion, insertion = [], []
    for f in fractions:
        cells.zero_()
        cells[order[: int(round(f * rows * cols))]] = 1
        top = paint_grid(cells.reshape(rows, cols), span, size=(h, w)).numpy() > 0
        d, i = image.copy(), image.copy()
        d[top] = fill
        i[covered & ~top] = fill
        deletion.append(d)
        insertion.append(i)
    return deletion, insertion


@torch.no_grad()
def token_probs(lens: Any, images: Sequence[np.ndarray], question: str, token_ids: Sequence[int],
                batch_size: int = 64) -> torch.Tensor:
    """``[len(images), len(token_ids)]``: probability of each ``token_ids[s]`` given prompt + ``token_ids[:s]``.

    Teacher-forced: one forward of ``lens.hf_model`` per batch of images, no generation.
    """
    probs = []
    tokens = torch.tensor([list(token_ids)], dtype=torch.long)
    for start in range(0, len(images), batch_size):
        enc = [lens.prepare(im, question)[0] for im in images[start:start + batch_size]]
        n_prompt = enc[0].input_ids.shape[1]
        ids = torch.cat([torch.cat([e.input_ids, tokens[:, :-1]], 1) for e in enc]).to(lens.device)
        pix = torch.cat([e.pixel_values for e in enc]).to(lens.device, lens.dtype)
        logits = lens.hf_model(input_ids=ids, pixel_values=pix).logits[:, n_prompt - 1:].float()
        index = tokens.expand(len(enc), -1)[..., None].to(lens.device)
        probs.append(logits.softmax(-1).gather(-1, index)[..., 0].cpu())
    return torch.cat(probs)


def answer_probs(lens: Any, images: Sequence[np.ndarray], question: str, prefix_ids: Sequence[int],
                 target_id: int, batch_size: int = 64) -> torch.Tensor:
    """``[len(images)]``: probability of ``target_id`` after the prompt and ``prefix_ids`` (teacher-forced)."""
    return token_probs(lens, images, question, [*prefix_ids, target_id], batch_size)[:, -1]


def occlusion_map(lens: Any, trace: Any, image: Optional[np.ndarray] = None) -> torch.Tensor:
    """``[S, rows, cols]``: drop of each generated token's probability when one patch is occluded.

    A causal reference map (Zeiler & Fergus 2014): every grid-0 patch in turn is replaced by the
    image's median colour and the generated tokens are re-scored, teacher-forced (``rows x cols``
    images in one batched forward).
    """
    image = np.asarray(trace.image) if image is None else image
    span = trace.vision_span
    rows, cols = span.grids[0]
    fill = np.median(image.reshape(-1, 3), axis=0).astype(image.dtype)
    occluded = []
    for cell in range(rows * cols):
        one = torch.zeros(rows * cols)
        one[cell] = 1
        hit = paint_grid(one.reshape(rows, cols), span, size=image.shape[:2]).numpy() > 0
        im = image.copy()
        im[hit] = fill
        occluded.append(im)
    probs = token_probs(lens, [image] + occluded, trace.question, trace.token_ids)  # [1 + P, S]
    return (probs[:1] - probs[1:]).T.reshape(-1, rows, cols)


def auc(values: Sequence[float], fractions: Sequence[float] = FRACTIONS) -> float:
    """Area under a curve sampled at ``fractions`` (trapezoids; x in [0, 1])."""
    return float(np.trapezoid(np.asarray(values, dtype=float), np.asarray(fractions, dtype=float)))


@dataclass
class DeletionInsertion:
    """Answer probability as the top patches are deleted / inserted, and the areas under the curves."""

    fractions: tuple[float, ...]
    deletion: torch.Tensor
    insertion: torch.Tensor

    @property
    def deletion_auc(self) -> float:
        """Lower is better: the answer should collapse once the top patches are gone."""
        return auc(self.deletion.tolist(), self.fractions)

    @property
    def insertion_auc(self) -> float:
        """Higher is better: the answer should come back with the top patches alone."""
        return auc(self.insertion.tolist(), self.fractions)


def deletion_insertion(lens: Any, image: np.ndarray, question: str, span: VisionSpan, grid: torch.Tensor,
                       prefix_ids: Sequence[int], target_id: int,
                       fractions: Sequence[float] = FRACTIONS) -> DeletionInsertion:
    """Deletion and insertion curves of one map (``grid [rows, cols]``) for one answer token."""
    deletion, insertion = masked_images(image, span, patch_order(grid), fractions)
    probs = answer_probs(lens, deletion + insertion, question, prefix_ids, target_id)
    n = len(fractions)
    return DeletionInsertion(tuple(fractions), probs[:n], probs[n:])


# ---------------------------------------------------------------- evaluation over held-out scenes

LAYER_RANGES = {"all": None, "early": "early", "late": "late"}
"""Named layer ranges; ``"early"``/``"late"`` are the first/second half of the LM layers."""


def resolve_layers(spec: Any, n_layers: int) -> Optional[list[int]]:
    """``None`` (all layers), ``"early"``, ``"late"``, or an explicit list of layer indices."""
    if spec == "early":
        return list(range(n_layers // 2))
    if spec == "late":
        return list(range(n_layers // 2, n_layers))
    return None if spec is None else list(spec)


def answer_step(trace: Any, word: str) -> Optional[int]:
    """Index of the first generated step whose token is ``word`` (tokenizer prefixes ignored)."""
    for i, tok in enumerate(trace.tokens):
        if tok.lstrip("▁Ġ ").lower() == word.lower():
            return i
    return None


def random_map(trace: Any, layers: Any = None, seed: int = 0) -> torch.Tensor:
    """A random ``[S, rows, cols]`` map (the chance row of every table)."""
    rows, cols = trace.vision_span.grids[0]
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(len(trace.steps), rows, cols, generator=gen)


@dataclass
class GroundingResult:
    """Per-example scores (``rows``: dicts) of every map method and layer range."""

    rows: list[dict]
    n_examples: int
    n_skipped: int
    traces: list = None

    def table(self) -> str:
        """A markdown table: mean scores per method and layer range, with chance levels."""
        import pandas as pd

        if not self.rows:  # every example answered wrongly: there is no grounded answer to score
            return "no example was answered correctly; nothing to score"
        df = pd.DataFrame(self.rows)
        agg = df.groupby(["method", "layers"], sort=False).agg(
            n=("pointing", "size"), pointing=("pointing", "mean"), energy=("energy", "mean"),
            area_chance=("area", "mean"), patch_chance=("patch_chance", "mean"),
            deletion_auc=("deletion_auc", "mean"), insertion_auc=("insertion_auc", "mean")).reset_index()
        lines = ["| method | layers | n | pointing | energy in mask | chance (mask area) | chance (patches"
                 " touching mask) | deletion AUC (lower better) | insertion AUC (higher better) |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in agg.itertuples():
            dl = "-" if np.isnan(r.deletion_auc) else f"{r.deletion_auc:.3f}"
            ins = "-" if np.isnan(r.insertion_auc) else f"{r.insertion_auc:.3f}"
            lines.append(f"| {r.method} | {r.layers} | {r.n} | {r.pointing:.1%} | {r.energy:.1%} | "
                         f"{r.area_chance:.1%} | {r.patch_chance:.1%} | {dl} | {ins} |")
        return "\n".join(lines)


def _examples(n_scenes: int, seed: int, qtypes: Sequence[str]):
    from llava_lens.toy.scenes import make_scene

    for k in range(n_scenes):
        scene = make_scene(seed + k)
        qas = [qa for qa in scene.qas if qa.qtype == qtypes[k % len(qtypes)]]
        if qas:
            qa = qas[0]
            yield scene, qa, qa.answer.split()[-2]  # "the star is green ." -> "green"


def score_example(lens: Any, trace: Any, image: np.ndarray, qa: Any, step: int, maps: dict, layer_ranges: dict,
                  deletion_for: Sequence[str] = ("all",)) -> list[dict]:
    """Score every map of ``maps`` (name -> f(trace, layers)) for one traced example at ``step``."""
    span, mask = trace.vision_span, torch.as_tensor(qa.mask)
    base = {"area": float(mask.float().mean()), "patch_chance": patch_chance(span, mask),
            "question": qa.question, "qtype": qa.qtype}
    rows = []
    for name, fn in maps.items():
        for label, spec in layer_ranges.items():
            grid = fn(trace, resolve_layers(spec, trace.info.n_layers))[step]
            heat = paint_grid(grid, span, size=tuple(mask.shape))
            row = dict(base, method=name, layers=label, pointing=pointing_hit(heat, mask),
                       energy=energy_in_mask(heat, mask), deletion_auc=np.nan, insertion_auc=np.nan)
            if label in deletion_for:
                di = deletion_insertion(lens, image, trace.question, span, grid, trace.token_ids[:step],
                                        trace.token_ids[step])
                row.update(deletion_auc=di.deletion_auc, insertion_auc=di.insertion_auc)
            rows.append(row)
    return rows


def evaluate_grounding(lens: Any, n_scenes: int = 100, seed: int = 7 * 2**50 + 10_000,
                       layer_ranges: Optional[dict] = None, maps: Optional[dict] = None,
                       qtypes: Sequence[str] = ("color",), deletion_for: Sequence[str] = ("all",),
                       keep_traces: bool = False) -> GroundingResult:
    """Score grounding maps on held-out embedded-model scenes against the asked object's mask.

    Scene ``seed + k`` gets a question of type ``qtypes[k % len(qtypes)]``; the map is read at the
    step that generates the answer word (colour or shape). Examples the model answers wrongly are
    skipped (counted in ``n_skipped``). Colour questions only by default: the embedded checkpoint
    answers shape questions at chance, so they carry no grounding signal. ``maps`` defaults to
    :data:`grounding.MAPS` plus a random map; deletion/insertion curves are computed for the layer
    ranges named in ``deletion_for``.
    """
    from llava_lens.grounding import MAPS

    layer_ranges = layer_ranges or LAYER_RANGES
    rows, traces, skipped, n = [], [], 0, 0
    for k, (scene, qa, word) in enumerate(_examples(n_scenes, seed, qtypes)):
        trace = lens.trace(scene.image, qa.question, max_new_tokens=len(qa.answer.split()),
                           prefill_cache=True)
        step = answer_step(trace, word)
        if step is None:
            skipped += 1
            continue
        all_maps = dict(maps or MAPS, random=lambda t, layers=None, s=k: random_map(t, layers, seed=s))
        rows += [dict(r, example=k) for r in score_example(lens, trace, scene.image, qa, step, all_maps,
                                                            layer_ranges, deletion_for)]
        n += 1
        if keep_traces:
            traces.append((trace, qa, step))
    return GroundingResult(rows, n, skipped, traces if keep_traces else None)
