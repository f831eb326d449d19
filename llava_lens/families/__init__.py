"""What differs between vision-language model families: one small adapter each.

An adapter is a subclass of :class:`Family` in its own module here, registered in
:data:`FAMILIES`. It must provide:

``name``, ``architectures``, ``hf_class``
    its short name (stored in traces), the ``config.architectures`` it accepts, and the HF class
    :func:`llava_lens.load` instantiates (TransformerLens must have a bridge for it).
``_layout(extra, image_size, config, processor)``
    ``(tile, row, col, grids, boxes)`` of every image-feature position, in sequence order,
    computed with the model's own processor outputs and packing code (never a hard-coded grid);
    :meth:`Family.vision_span` checks its length against the image tokens the processor inserted
    and builds the :class:`VisionSpan`.

and may override:

``load_processor(source)``
    when ``AutoProcessor`` cannot load the processor as is (e.g. a video processor that needs
    torchvision: :func:`~llava_lens.families.base.load_without_video`).
``vision_info(config)``
    the ``vision_*`` fields of :class:`~llava_lens.trace.ModelInfo` when the vision config is not
    CLIP/SigLIP-shaped.
``position_ids(model, kwargs)`` / ``decode_position_ids(text_positions, state)``
    rotary positions that are not ``cumsum(attention_mask) - 1`` (M-RoPE), for the engine's
    left-padded prefill and each decode step; ``sequence_inputs`` names processor outputs laid
    out per token, which the engine left-pads like the ids.
``vit_views``
    a one-line reason when the ViT attention views (rollout, VLM-Visualizer) do not apply.

Each adapter's tests are one entry in ``tests/test_families.py``'s conformance suite (a builder
with the real geometry of a published checkpoint, see :mod:`llava_lens.toy.families_build`).
"""

from __future__ import annotations

from typing import Any

from llava_lens.errors import UnsupportedModelError
from llava_lens.families.base import Family, VisionSpan
from llava_lens.families.llava import Llava15, LlavaNext
from llava_lens.families.onevision import LlavaOnevision
from llava_lens.families.qwen import Qwen25VL

FAMILIES: tuple[Family, ...] = (Llava15(), LlavaNext(), LlavaOnevision(), Qwen25VL())

__all__ = ["FAMILIES", "Family", "VisionSpan", "family_for", "family_named"]


def family_for(config: Any) -> Family:
    """The adapter for a model config, or a clear error naming the supported architectures."""
    archs = list(getattr(config, "architectures", None) or [])
    for fam in FAMILIES:
        if any(a in fam.architectures for a in archs):
            return fam
    supported = ", ".join(a for f in FAMILIES for a in f.architectures)
    found = ", ".join(archs) or f"model_type {getattr(config, 'model_type', '?')!r}"
    raise UnsupportedModelError(f"unsupported model ({found}); llava-lens supports {supported}")


def family_named(name: str) -> Family:
    """The adapter whose ``name`` is ``name`` (as stored in ``trace.info.family``)."""
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise UnsupportedModelError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")
