"""Defaults shared by the library and the ``llava-lens`` command line, so the two never disagree.

This module imports nothing: the command line reads it before deciding whether to load torch.
"""

DEFAULT_MAX_NEW_TOKENS = 32  # tokens generated per answer by ``LlavaLens.trace``/``step`` and every CLI command
