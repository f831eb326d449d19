"""When the answer appears: the one definition of the logit-lens *emergence layer* in llava-lens."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Optional

from llava_lens import hooks


def emergence_layers(ranks: Any) -> list[int]:
    """Per token, the first logit-lens row from which its rank stays 0 (top-1) to the last; -1 if never.

    ``ranks [L, S]`` as in :attr:`llava_lens.LogitLens.target_ranks` (row ``l < L - 1`` decodes
    ``blocks.l.hook_resid_pre``, so 0 = the embeddings; the last row is the model's output, where
    the generated token is top-1 under greedy decoding). A token that is top-1 at some middle row,
    loses it and regains it later emerges at the later row.
    """
    top = (ranks == 0).flip(0).int().cumprod(0).sum(0)  # length of the trailing run of top-1 rows
    n_rows = ranks.shape[0]
    return [n_rows - int(k) if k > 0 else -1 for k in top]


FUNCTION_WORDS = frozenset(
    "the a an is are was were be it its this that these those there here of in on at to and or with as "
    "by for from i you image picture photo shows show".split())
"""Words the ``first-content`` and ``last-content`` rules skip (plus every token without a letter or digit)."""
ANSWER_WORD_RULES = ("target", "first-content", "last-content")
"""How :func:`answer_word_index` picks the answer word of a generated answer."""


def token_word(token: str) -> str:
    """A token as a plain lower-case word: SentencePiece/BPE space marks and punctuation dropped."""
    return re.sub(r"[^0-9a-z]+", "", token.replace("▁", " ").replace("Ġ", " ").lower())


def answer_word_index(tokens: Sequence[str], rule: str = "target", target: Optional[str] = None,
                      skip: frozenset[str] = FUNCTION_WORDS) -> Optional[int]:
    """Index of the answer word among generated ``tokens``, or None when there is none.

    Rules: ``first-content`` — the first token that is a word and not in ``skip`` (the issue's
    default: "the triangle is purple ." → "triangle"); ``last-content`` — the last such token
    ("purple"); ``target`` — the first generated word that appears in the ``target`` answer (when
    the data has answers; else ``first-content``).
    """
    if rule not in ANSWER_WORD_RULES:
        raise ValueError(f"unknown answer-word rule {rule!r}; choose from {', '.join(ANSWER_WORD_RULES)}")
    words = [token_word(t) for t in tokens]
    content = [i for i, w in enumerate(words) if w and w not in skip]
    if rule == "target" and target:
        wanted = {token_word(w) for w in target.split()} - {""}
        hits = [i for i, w in enumerate(words) if w in wanted and w not in skip]
        if hits:
            return hits[0]
    if not content:
        return None
    return content[-1] if rule == "last-content" else content[0]


def row_name(row: int, n_layers: int) -> str:
    """The TransformerLens hook a logit-lens row decodes.

    ``blocks.{row}.hook_resid_pre``; the last row ``blocks.{n_layers - 1}.hook_resid_post``.
    """
    return hooks.resid_stack(n_layers)[row]
