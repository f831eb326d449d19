"""Compatibility module: grounding scores now live in :mod:`.metrics`, :mod:`.rescoring` and :mod:`.evaluation`.

(No ``plot_*`` here; nothing new should import from this module.)
"""

from llava_lens.analysis.evaluation import (
    LAYER_RANGES,
    EvalOptions,
    GroundingResult,
    answer_step,
    evaluate_grounding,
    resolve_layers,
    score_example,
)
from llava_lens.analysis.methods import random_map
from llava_lens.analysis.metrics import auc, energy_in_mask, patch_chance, pointing_hit
from llava_lens.analysis.rescoring import (
    FRACTIONS,
    DeletionInsertion,
    answer_probs,
    deletion_insertion,
    masked_images,
    occlusion_map,
    patch_order,
    token_probs,
)
from llava_lens.grounding import paint_grid

__all__ = [
    "LAYER_RANGES", "EvalOptions", "GroundingResult", "answer_step", "evaluate_grounding", "resolve_layers",
    "score_example", "random_map", "auc", "energy_in_mask", "patch_chance", "pointing_hit", "FRACTIONS",
    "DeletionInsertion", "answer_probs", "deletion_insertion", "masked_images", "occlusion_map", "patch_order",
    "token_probs", "paint_grid",
]
