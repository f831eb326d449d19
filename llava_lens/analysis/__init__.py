"""Analyses on top of a Trace: grounding scores, sinks, head focus, contrastive maps, knockout, entropy."""

from llava_lens.analysis.contrastive import ContrastiveMaps, contrastive_map, contrastive_maps
from llava_lens.analysis.entropy import image_attention_entropy, row_entropy
from llava_lens.analysis.heads import HeadFocus, head_focus, head_image_share
from llava_lens.analysis.knockout import Knockout, knockout_prob, knockout_windows
from llava_lens.analysis.scoring import (
    GroundingResult,
    deletion_insertion,
    energy_in_mask,
    evaluate_grounding,
    pointing_hit,
)
from llava_lens.analysis.sinks import Sinks, exclude_sinks, find_sinks

__all__ = [
    "evaluate_grounding", "GroundingResult", "pointing_hit", "energy_in_mask", "deletion_insertion",
    "find_sinks", "Sinks", "exclude_sinks", "head_focus", "head_image_share", "HeadFocus",
    "contrastive_map", "contrastive_maps", "ContrastiveMaps", "knockout_prob", "knockout_windows", "Knockout",
    "row_entropy", "image_attention_entropy",
]
