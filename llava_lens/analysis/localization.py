"""Localization heads (Kang et al., CVPR 2025): the few LM heads whose attention finds the object.

"Your Large Vision-Language Model Only Needs A Few Attention Heads For Visual Grounding"
(arXiv 2503.06287). On a calibration set, from the attention row of one query (by default the
last prompt token, ``trace.steps[0]``):

1. every head's attention mass on the image, averaged over the calibration set; heads of the first
   ``skip_layers`` layers are left out, and only heads at or above the *elbow* of the sorted curve
   (the point farthest from the chord joining its ends) stay candidates;
2. per sample, the ``votes_per_sample`` candidates with the lowest *spatial entropy*
   (:func:`spatial_entropy`) get a vote;
3. the ``top_k`` most-voted heads (ties: lower mean spatial entropy first) are the localization
   heads; :func:`localization_heads_map` sums their Gaussian-smoothed attention maps.

Only torch is used (no scipy): connected components by iterated 3x3 max-pooling of labels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from llava_lens.errors import LlavaLensError
from llava_lens.grounding import image_attention
from llava_lens.trace import Trace


class HeadSelectionError(LlavaLensError):
    """Calibration data that cannot select heads (empty, no attention rows, too few candidates)."""


def connected_components(fg: torch.Tensor) -> torch.Tensor:
    """Labels ``[rows, cols]`` (long) of the 8-connected components of boolean ``fg``; 0 = background.

    Labels are consecutive from 1, in the order of each component's first cell (row-major).
    """
    rows, cols = fg.shape
    init = torch.arange(1, rows * cols + 1, dtype=torch.float32).reshape(rows, cols)
    labels = torch.where(fg, init, torch.zeros_like(init))
    while True:  # every cell takes the largest label of its 8-neighbourhood until nothing changes
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0]
        grown = torch.where(fg, grown, torch.zeros_like(grown))
        if torch.equal(grown, labels):
            break
        labels = grown
    relabel: dict[int, int] = {}
    out = torch.zeros(rows, cols, dtype=torch.long)
    for idx in fg.flatten().nonzero().flatten().tolist():
        key = int(labels.flatten()[idx])
        relabel.setdefault(key, len(relabel) + 1)
        out.view(-1)[idx] = relabel[key]
    return out


def spatial_entropy(grid: torch.Tensor) -> float:
    """Spatial entropy of one attention map ``[rows, cols]`` (Kang et al., eq. 2).

    The map minus its mean, clipped at 0, is split into 8-connected components; the entropy of the
    components' shares of that mass is returned (0 for one blob; ``inf`` for a flat map, which
    localises nothing).
    """
    excess = (grid.float() - grid.float().mean()).clamp_min(0)
    fg = excess > 0
    if not fg.any():
        return math.inf
    labels = connected_components(fg)
    mass = torch.zeros(int(labels.max()) + 1).index_add_(0, labels.flatten(), excess.flatten())[1:]
    p = mass / mass.sum()
    return float(-(p * p.clamp_min(1e-30).log()).sum())


def elbow_index(values: Sequence[float]) -> int:
    """Index of the elbow of a curve sorted in decreasing order: the point farthest from its chord."""
    v = torch.as_tensor(values, dtype=torch.float64)
    n = len(v)
    if n <= 2:
        return n - 1
    x = torch.arange(n, dtype=torch.float64)
    dx, dy = float(n - 1), float(v[-1] - v[0])
    dist = (dy * x - dx * (v - v[0])).abs() / math.hypot(dx, dy)
    return int(dist.argmax())


@dataclass
class HeadSelection:
    """Options of :func:`select_localization_heads` (defaults: Kang et al.'s)."""

    skip_layers: int = 2
    """The first layers' heads are never candidates (the paper skips two)."""
    votes_per_sample: int = 10
    """Per calibration sample, this many lowest-entropy candidates get a vote."""
    top_k: int = 3
    """Heads kept."""
    sigma: float = 1.0
    """Gaussian smoothing of each head's map, in patches (0: none)."""
    step: Optional[int] = 0
    """Generated step whose attention row is read (0: the last prompt token, as in the paper)."""
    tile: int = 0
    """Grid of the spatial entropy (0: the base grid)."""


@dataclass
class LocalizationHeads:
    """The selected heads and every head's scores, as saved to / loaded from JSON."""

    heads: list[tuple[int, int]]
    """``(layer, head)`` of the localization heads, most voted first."""
    image_attention: list[list[float]]
    """``[L][H]`` mean attention mass on the image over the calibration set."""
    votes: list[list[int]]
    """``[L][H]`` low-entropy votes (0 for non-candidates)."""
    entropy: list[list[float]]
    """``[L][H]`` mean spatial entropy of candidates (NaN elsewhere)."""
    candidates: list[tuple[int, int]]
    """Heads at or above the elbow (after skipping the first layers)."""
    elbow: float
    """Image-attention mass at the elbow (the candidates' threshold)."""
    n_calibration: int
    options: HeadSelection = field(default_factory=HeadSelection)
    model_name: str = ""

    def save(self, path: Union[str, Path]) -> Path:
        """Write the selection as JSON (``math.nan`` written as ``null``)."""
        d = asdict(self)
        d["entropy"] = [[None if math.isnan(v) or math.isinf(v) else v for v in row] for row in self.entropy]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(d, indent=1))
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> LocalizationHeads:
        """Inverse of :meth:`save`."""
        try:
            d = json.loads(Path(path).read_text())
            d["heads"] = [tuple(h) for h in d["heads"]]
            d["candidates"] = [tuple(h) for h in d["candidates"]]
            d["entropy"] = [[math.nan if v is None else v for v in row] for row in d["entropy"]]
            d["options"] = HeadSelection(**d["options"])
            return cls(**d)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise HeadSelectionError(f"cannot read localization heads from {path}: {err}") from None

    def describe(self) -> str:
        """One line per selected head: layer, head, votes, image attention, spatial entropy."""
        return "\n".join(f"L{la}H{h}: votes {self.votes[la][h]}/{self.n_calibration}, image attention "
                         f"{self.image_attention[la][h]:.3f}, spatial entropy {self.entropy[la][h]:.3f}"
                         for la, h in self.heads)


def _head_grids(trace: Trace, step: int, tile: int) -> torch.Tensor:
    """``[L, H, rows, cols]`` attention of every head on grid ``tile`` at ``step``."""
    if not -len(trace.steps) <= step < len(trace.steps):
        raise HeadSelectionError(f"step {step} not in a trace of {len(trace.steps)} steps")
    return trace.vision_span.to_grid(image_attention(trace, steps=[step])[0], tile)


def _candidates(mass: torch.Tensor, skip_layers: int) -> tuple[list[tuple[int, int]], float]:
    n_layers, n_heads = mass.shape
    pool = [(la, h) for la in range(skip_layers, n_layers) for h in range(n_heads)]
    if not pool:
        raise HeadSelectionError(f"no candidate heads: skip_layers={skip_layers} of {n_layers} layers")
    values = sorted((float(mass[la, h]) for la, h in pool), reverse=True)
    elbow = values[elbow_index(values)]
    return [(la, h) for la, h in pool if float(mass[la, h]) >= elbow], elbow


def select_localization_heads(traces: Iterable[Trace], options: Optional[HeadSelection] = None,
                              steps: Optional[Sequence[int]] = None) -> LocalizationHeads:
    """Select localization heads from calibration traces (with attention rows); see the module doc.

    ``steps`` (one per trace) overrides ``options.step`` per trace, e.g. the step that generates
    each answer's content word.
    """
    options = options or HeadSelection()
    traces = list(traces)
    if not traces:
        raise HeadSelectionError("the calibration set is empty")
    if traces[0].steps[0].attention is None:
        raise HeadSelectionError("calibration traces need attention rows (default_capture=True)")
    steps = [options.step] * len(traces) if steps is None else list(steps)
    n_layers, n_heads = traces[0].info.n_layers, traces[0].info.n_heads
    mass = torch.stack([t.steps[s].attention[..., t.vision_span.positions].float().sum(-1)
                        for t, s in zip(traces, steps)]).mean(0)  # [L, H]
    cands, elbow = _candidates(mass, options.skip_layers)
    votes = torch.zeros(n_layers, n_heads, dtype=torch.long)
    ent_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    for trace, step in zip(traces, steps):
        grids = _head_grids(trace, step, options.tile)
        ent = [spatial_entropy(grids[la, h]) for la, h in cands]
        for i in sorted(range(len(cands)), key=lambda i: ent[i])[:options.votes_per_sample]:
            if math.isfinite(ent[i]):
                votes[cands[i]] += 1
        for (la, h), e in zip(cands, ent):
            ent_sum[la, h] += e
    entropy = torch.full((n_layers, n_heads), math.nan, dtype=torch.float64)
    for la, h in cands:
        entropy[la, h] = ent_sum[la, h] / len(traces)
    ranked = sorted(cands, key=lambda lh: (-int(votes[lh]), float(entropy[lh])))
    return LocalizationHeads(heads=ranked[:options.top_k], image_attention=mass.tolist(), votes=votes.tolist(),
                             entropy=entropy.tolist(), candidates=cands, elbow=elbow, n_calibration=len(traces),
                             options=options, model_name=traces[0].model_name)


def find_localization_heads(lens: Any, calibration: Iterable[Any], options: Optional[HeadSelection] = None,
                            progress: bool = False) -> LocalizationHeads:
    """Trace each calibration ``(image, question)`` pair (or take a Trace as is) and select heads.

    Only the prompt is needed for the default ``options.step = 0`` (one generated token per trace).
    """
    from llava_lens.analysis.progress import progress_bar

    options = options or HeadSelection()
    n_new = (options.step or 0) + 1
    traces = []
    for item in progress_bar(calibration, "calibration", enabled=progress):
        traces.append(item if isinstance(item, Trace) else lens.trace(item[0], item[1], max_new_tokens=n_new))
    return select_localization_heads(traces, options)


def gaussian_smooth(grid: torch.Tensor, sigma: float) -> torch.Tensor:
    """``[..., rows, cols]`` convolved with a normalised Gaussian (radius ``ceil(3 sigma)``, edges replicated)."""
    if sigma <= 0:
        return grid.float()
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    shape = grid.shape
    g = grid.float().reshape(-1, 1, *shape[-2:])
    g = F.pad(g, (radius, radius, radius, radius), mode="replicate")
    g = F.conv2d(g, k.view(1, 1, 1, -1))
    g = F.conv2d(g, k.view(1, 1, -1, 1))
    return g.reshape(shape)


def localization_heads_map(trace: Trace, heads: Union[LocalizationHeads, Sequence[tuple[int, int]]],
                           sigma: Optional[float] = None, tile: int = 0) -> torch.Tensor:
    """``[S, rows, cols]``: the sum of the given heads' Gaussian-smoothed attention maps, per step.

    ``heads`` is a :class:`LocalizationHeads` (its ``options.sigma`` unless ``sigma`` is given) or a
    list of ``(layer, head)``.
    """
    if isinstance(heads, LocalizationHeads):
        sigma = heads.options.sigma if sigma is None else sigma
        heads = heads.heads
    if not heads:
        raise HeadSelectionError("no localization heads given")
    # one (layer, head) at a time: the full [S, L, H, n] stack is 300 MB at LLaVA-NeXT's size
    per_head = torch.stack([image_attention(trace, [la], heads=[h])[:, 0, 0] for la, h in heads], 1)  # [S, k, n]
    grids = trace.vision_span.to_grid(per_head, tile)  # [S, k, rows, cols]
    return gaussian_smooth(grids, 1.0 if sigma is None else sigma).sum(1)
