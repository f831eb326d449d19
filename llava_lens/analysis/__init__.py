"""Analyses on top of a Trace.

Grounding scores, localization heads, TAM, sinks, head focus, contrastive maps, knockout, entropy, emergence.
"""

from llava_lens.analysis.contrastive import ContrastiveMaps, contrastive_map, contrastive_maps
from llava_lens.analysis.emergence import emergence_layers
from llava_lens.analysis.entropy import image_attention_entropy, row_entropy
from llava_lens.analysis.evaluation import EvalOptions, GroundingResult, evaluate_grounding
from llava_lens.analysis.heads import HeadFocus, head_focus, head_image_share
from llava_lens.analysis.knockout import Knockout, knockout_prob, knockout_windows
from llava_lens.analysis.localization import (
    HeadSelection,
    LocalizationHeads,
    find_localization_heads,
    localization_heads_map,
    select_localization_heads,
    spatial_entropy,
)
from llava_lens.analysis.metrics import energy_in_mask, func_iou, obj_iou, otsu_threshold, pointing_hit
from llava_lens.analysis.rescoring import deletion_insertion, occlusion_map
from llava_lens.analysis.sinks import Sinks, exclude_sinks, find_sinks
from llava_lens.analysis.tam import tam_map

__all__ = [
    "evaluate_grounding", "EvalOptions", "GroundingResult", "pointing_hit", "energy_in_mask", "obj_iou", "func_iou",
    "otsu_threshold", "deletion_insertion", "occlusion_map",
    "find_localization_heads", "select_localization_heads", "localization_heads_map", "LocalizationHeads",
    "HeadSelection", "spatial_entropy", "tam_map", "emergence_layers",
    "find_sinks", "Sinks", "exclude_sinks", "head_focus", "head_image_share", "HeadFocus",
    "contrastive_map", "contrastive_maps", "ContrastiveMaps", "knockout_prob", "knockout_windows", "Knockout",
    "row_entropy", "image_attention_entropy",
]
