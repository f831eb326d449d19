"""Defaults shared by the library and the ``llava-lens`` command line, so the two never disagree.

This module imports nothing heavy: the command line reads it before deciding whether to load torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

DEFAULT_MAX_NEW_TOKENS = 32  # tokens generated per answer by ``LlavaLens.trace``/``step`` and every CLI command

MAX_VIEW_LAYERS = 8
"""Layers whose prefill attention a default trace keeps, and that the report shows, when none are named."""


def view_layers(n_layers: int, layers: Optional[Sequence[int]] = None) -> list[int]:
    """The layers views show: ``layers`` (validated, negatives from the end), else a spread.

    At most :data:`MAX_VIEW_LAYERS` evenly spaced layers (first and last kept) when none are named.
    """
    if layers is not None:
        bad = [x for x in layers if not -n_layers <= int(x) < n_layers]
        if bad:
            raise ValueError(f"layer {bad[0]} does not exist: the model has layers 0-{n_layers - 1}")
        return sorted({int(x) % n_layers for x in layers})
    if n_layers <= MAX_VIEW_LAYERS:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / (MAX_VIEW_LAYERS - 1)) for i in range(MAX_VIEW_LAYERS)})
