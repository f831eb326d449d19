"""Token ids to strings for labels: every id gets a string, including ids the tokenizer lacks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The tokenizer's spelling of each id; ``<id:N>`` for ids it has no entry for.

    Real checkpoints have more output ids than tokenizer entries (llava-1.5: 32,064 vs 32,002).
    """
    return [t if t is not None else f"<id:{i}>" for i, t in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)))]
