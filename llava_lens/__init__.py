"""llava-lens: see what a LLaVA model looked at, and when it decided.

import llava_lens as ll
lens = ll.load()                                  # embedded model; or "llava-hf/llava-1.5-7b-hf"
trace = lens.trace(image, "What color is the triangle?", max_new_tokens=32, prefill_cache=True)
for step in lens.step(image, question): ...       # one Step (token + activations) per token
result = ll.logit_lens(trace, lens)               # what each layer would predict
ll.views.export(trace, "analysis_results/run", result)   # HTML, plots, heatmaps

The names below are imported on first use (PEP 562), so ``import llava_lens.cli`` and
``llava-lens --help`` do not pay for torch and transformers.
"""

from importlib import import_module
from typing import Any

# public name -> the llava_lens module defining it ("" for a submodule of that name)
_EXPORTS = {
    "load": "loading", "LlavaLens": "model", "Trace": "trace", "Step": "trace", "VisionSpan": "families",
    "ModelInfo": "trace", "PrefillSummary": "trace", "load_image": "inputs", "build_prompt": "inputs",
    "GenerateOptions": "options", "Sampling": "options", "Capture": "options",
    "logit_lens": "lens", "LogitLens": "lens", "patch_words": "lens",
    "vision_share": "grounding", "VisionShare": "grounding", "attention_map_mean": "grounding",
    "attention_map_max": "grounding", "vlm_visualizer_map": "grounding", "vit_rollout_map": "grounding",
    "paint": "grounding", "paint_grid": "grounding", "MAPS": "grounding",
    "analyse_to_dir": "run", "grounding": "", "views": "", "explore": "views.explore",
    "LlavaLensError": "errors", "ImageError": "errors", "PromptError": "errors", "UnsupportedModelError": "errors",
    "ModelLoadError": "errors", "SweepError": "errors",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import a public name on first access (``ll.load``, ``ll.views``...)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llava_lens' has no attribute {name!r}")
    module = import_module(f"llava_lens.{_EXPORTS[name] or name}")
    value = getattr(module, name) if _EXPORTS[name] else module
    globals()[name] = value  # later accesses are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
