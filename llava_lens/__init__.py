"""llava-lens: see what a LLaVA model looked at, and when it decided.

import llava_lens as ll
lens = ll.load()                                  # embedded model; or "llava-hf/llava-1.5-7b-hf"
trace = lens.trace(image, "What color is the triangle?", max_new_tokens=32, prefill_cache=True)
for step in lens.step(image, question): ...       # one Step (token + activations) per token
result = ll.logit_lens(trace, lens)               # what each layer would predict
ll.views.export(trace, "analysis_results/run", result)   # HTML, plots, heatmaps
"""

from llava_lens import grounding, views
from llava_lens.errors import (
    ImageError,
    LlavaLensError,
    ModelLoadError,
    PromptError,
    SweepError,
    UnsupportedModelError,
)
from llava_lens.families import VisionSpan
from llava_lens.grounding import (
    MAPS,
    VisionShare,
    attention_map_max,
    attention_map_mean,
    paint,
    paint_grid,
    vision_share,
    vit_rollout_map,
    vlm_visualizer_map,
)
from llava_lens.inputs import build_prompt, load_image
from llava_lens.lens import LogitLens, logit_lens, patch_words
from llava_lens.loading import load
from llava_lens.model import LlavaLens
from llava_lens.options import Capture, GenerateOptions, Sampling
from llava_lens.trace import ModelInfo, PrefillSummary, Step, Trace
from llava_lens.views.explore import explore

__all__ = [
    "load", "LlavaLens", "Trace", "Step", "VisionSpan", "ModelInfo", "PrefillSummary", "load_image", "build_prompt",
    "GenerateOptions", "Sampling", "Capture",
    "logit_lens", "LogitLens", "patch_words",
    "vision_share", "VisionShare", "attention_map_mean", "attention_map_max", "vlm_visualizer_map",
    "vit_rollout_map", "paint", "paint_grid", "MAPS", "grounding", "views",
    "explore", "LlavaLensError", "ImageError", "PromptError", "UnsupportedModelError", "ModelLoadError", "SweepError",
]
__version__ = "0.1.0"
