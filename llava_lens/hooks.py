"""Hook names, in TransformerLens' grammar: the one place they are spelled out.

Language-model hooks are those of ``TransformerBridge`` (``blocks.{L}.attn.hook_pattern``...);
vision-encoder hooks those of its LLaVA adapter (``vision_encoder.encoder_layers.{L}...``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]
"""A TransformerLens names filter: None (nothing), a name, a list of names, or a predicate."""

LM_PREFIX = "blocks."
VIT_PREFIX = "vision_encoder.encoder_layers."


def attn_pattern(layer: int) -> str:
    """``blocks.{layer}.attn.hook_pattern``: ``[heads, query, key]`` attention probabilities."""
    return f"blocks.{layer}.attn.hook_pattern"


def resid_pre(layer: int) -> str:
    """``blocks.{layer}.hook_resid_pre``: the residual stream entering block ``layer``."""
    return f"blocks.{layer}.hook_resid_pre"


def resid_mid(layer: int) -> str:
    """``blocks.{layer}.hook_resid_mid``: the residual stream between attention and MLP."""
    return f"blocks.{layer}.hook_resid_mid"


def resid_post(layer: int) -> str:
    """``blocks.{layer}.hook_resid_post``: the residual stream leaving block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def vit_pattern(layer: int) -> str:
    """``vision_encoder.encoder_layers.{layer}.attn.hook_pattern``: the vision encoder's attention."""
    return f"{VIT_PREFIX}{layer}.attn.hook_pattern"


def resid_stack(n_layers: int, mid: bool = False) -> list[str]:
    """The logit-lens rows: ``hook_resid_pre`` of every block, then the last ``hook_resid_post``.

    ``n_layers + 1`` names, or ``2 * n_layers + 1`` with ``mid`` (each block's ``hook_resid_mid``
    after its ``hook_resid_pre``: the order of ``accumulated_resid(incl_mid=True)``); the rows of
    ``Step.resid`` and ``LogitLens``.
    """
    pre = [[resid_pre(layer), resid_mid(layer)] if mid else [resid_pre(layer)] for layer in range(n_layers)]
    return [name for names in pre for name in names] + [resid_post(n_layers - 1)]


def has_mid(n_rows: int, n_layers: int) -> bool:
    """Whether ``n_rows`` residual rows of an ``n_layers`` model include the mid-block rows."""
    if n_rows not in (n_layers + 1, 2 * n_layers + 1):
        raise ValueError(f"{n_rows} residual rows do not fit a {n_layers}-layer model")
    return n_rows == 2 * n_layers + 1


def as_predicate(names: NamesFilter) -> Callable[[str], bool]:
    """TransformerLens-style names filter (None, a name, a list of names, a predicate) as a predicate."""
    if names is None:
        return lambda name: False
    if isinstance(names, str):
        return lambda name: name == names
    if callable(names):
        return names
    wanted = set(names)
    return lambda name: name in wanted
