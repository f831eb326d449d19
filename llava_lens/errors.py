"""Errors llava-lens raises on bad input: each carries a one-line message naming the problem."""


class LlavaLensError(Exception):
    """Base class of every error llava-lens raises on purpose."""


class UnsupportedModelError(LlavaLensError, ValueError):
    """The model (or directory) is not a LLaVA model llava-lens can load."""


class ModelLoadError(UnsupportedModelError):
    """The model's files could not be read: truncated or mismatched weights, pickle-only weights, network."""


class ImageError(LlavaLensError, ValueError):
    """The image could not be read or is not usable (corrupt, truncated, empty, too large...)."""


class PromptError(LlavaLensError, ValueError):
    """The question or prompt is not usable (empty, not text, too long for the model...)."""


class SweepError(LlavaLensError, ValueError):
    """Bad sweep input or state (unknown data layout, folder owned by another run, changed options...)."""


class ViewNotApplicableError(LlavaLensError, ValueError):
    """A view or map that cannot apply to this model family (the message says why)."""
