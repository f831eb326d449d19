"""Errors llava-lens raises on bad input: each carries a one-line message naming the problem."""


class LlavaLensError(Exception):
    """Base class of every error llava-lens raises on purpose."""


class UnsupportedModelError(LlavaLensError, ValueError):
    """The model (or directory) is not a LLaVA model llava-lens can load."""


class ImageError(LlavaLensError, ValueError):
    """The image could not be read or is not usable (corrupt, truncated, empty...)."""


class PromptError(LlavaLensError, ValueError):
    """The question or prompt is not usable (empty, several image placeholders...)."""
