"""The map methods :func:`~llava_lens.analysis.evaluation.evaluate_grounding` scores, by name.

Each :class:`Method` maps ``(trace, layers, example) -> [S, rows, cols]`` on grid 0; ``layers``
matters only for ``layered`` methods (LLM attention), the others are scored once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from llava_lens import grounding
from llava_lens.analysis.contrastive import contrastive_map_fn
from llava_lens.analysis.localization import LocalizationHeads, localization_heads_map
from llava_lens.analysis.rescoring import occlusion_map
from llava_lens.analysis.sinks import sink_excluded_map
from llava_lens.analysis.tam import tam_map
from llava_lens.errors import LlavaLensError
from llava_lens.trace import Trace

MapFn = Callable[[Trace, Optional[list], Any], torch.Tensor]
HeadSets = Union[LocalizationHeads, Mapping[str, LocalizationHeads]]
"""One selection for every question, or one per question type (``example.qtype``)."""

HEAD_METHODS = {
    "localization_heads": "Kang et al. as published: last prompt token, calibration pooled over question types",
    "localization_heads_answer": "query = the step generating the answer word; calibration pooled",
    "localization_heads_per_type": "query = the answer step; heads selected per question type",
}
"""Localization-head variants: name -> how their heads were selected (see ``evaluation.select_heads``)."""

METHODS = ("llm_mean", "llm_max", "llm_mean_no_sinks", "vlm_visualizer", "vlm_visualizer_keep_first",
           "vit_rollout", "contrastive_llm_mean", "occlusion", *HEAD_METHODS,
           "tam", "tam_no_eci", "tam_no_filter", "random")
"""Every method :func:`build_methods` knows, in table order."""


class UnknownMethodError(LlavaLensError):
    """A method name that :func:`build_methods` does not know."""


@dataclass
class Method:
    """A named map method and whether it takes a layer range."""

    fn: MapFn
    layered: bool = False


def random_map(trace: Trace, seed: int = 0) -> torch.Tensor:
    """A random ``[S, rows, cols]`` map (the chance row of every table)."""
    rows, cols = trace.vision_span.grids[0]
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(len(trace.steps), rows, cols, generator=gen)


def _heads_fn(heads: HeadSets) -> MapFn:
    def fn(trace: Trace, layers: Any, example: Any) -> torch.Tensor:
        chosen = heads if isinstance(heads, LocalizationHeads) else heads[example.qtype]
        return localization_heads_map(trace, chosen)

    return fn


def _attention_fn(name: str) -> MapFn:
    return lambda trace, layers, example: grounding.MAPS[name](trace, layers)


def build_methods(lens: Any, names: Optional[Sequence[str]] = None,
                  heads: Optional[Mapping[str, HeadSets]] = None) -> dict[str, Method]:
    """The methods ``names`` (default :data:`METHODS`) ready to score; ``heads`` feeds the head methods.

    Localization-head methods without an entry in ``heads`` are left out.
    """
    names = list(METHODS if names is None else names)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise UnknownMethodError(f"unknown map method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    heads = heads or {}
    contrastive = contrastive_map_fn(lens, "llm_mean")
    no_sinks = sink_excluded_map(grounding.MAPS["llm_mean"])
    table = {
        "llm_mean": Method(_attention_fn("llm_mean"), True),
        "llm_max": Method(_attention_fn("llm_max"), True),
        "llm_mean_no_sinks": Method(lambda t, layers, e: no_sinks(t, layers), True),
        "vlm_visualizer": Method(_attention_fn("vlm_visualizer"), True),
        "vlm_visualizer_keep_first": Method(_attention_fn("vlm_visualizer_keep_first"), True),
        "vit_rollout": Method(lambda t, layers, e: grounding.vit_rollout_map(t)),
        "contrastive_llm_mean": Method(lambda t, layers, e: contrastive(t, layers), True),
        "occlusion": Method(lambda t, layers, e: occlusion_map(lens, t)),
        "tam": Method(lambda t, layers, e: tam_map(lens, t)),
        "tam_no_eci": Method(lambda t, layers, e: tam_map(lens, t, use_eci=False)),
        "tam_no_filter": Method(lambda t, layers, e: tam_map(lens, t, rank_filter=False)),
        "random": Method(lambda t, layers, e: random_map(t, seed=e.index)),
    }
    table.update({name: Method(_heads_fn(sel)) for name, sel in heads.items()})
    return {n: table[n] for n in names if n in table}
