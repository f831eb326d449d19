"""llava-lens: what did the LLaVA model look at, and when did it decide?

    import llava_lens as ll
    lens = ll.load()                                  # embedded model; or "llava-hf/llava-1.5-7b-hf"
    trace = lens.trace(image, "What color is the triangle?", max_new_tokens=32)
    for step in lens.step(image, question): ...       # one Step (token + activations) per token
"""

from llava_lens.errors import ImageError, LlavaLensError, PromptError, UnsupportedModelError
from llava_lens.families import VisionSpan
from llava_lens.inputs import build_prompt, load_image
from llava_lens.model import LlavaLens, load
from llava_lens.trace import Step, Trace

__all__ = [
    "load", "LlavaLens", "Trace", "Step", "VisionSpan", "load_image", "build_prompt",
    "LlavaLensError", "ImageError", "PromptError", "UnsupportedModelError",
]
__version__ = "0.1.0"
