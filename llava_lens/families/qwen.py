"""Qwen2.5-VL adapter (dynamic resolution, 2x2 patch merging, M-RoPE, windowed vision attention)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

from llava_lens.families.base import Family, grid_boxes, load_without_video


class Qwen25VL(Family):
    """Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``).

    The processor resizes the image to a multiple of 28 px (patch 14 x merge 2) and the merger
    turns each 2x2 block of patches into one token: one grid, ``image_grid_thw`` / merge, in
    raster order (the vision tower's window reordering is undone before the merger's output).
    The language model's rotary positions are 3-d (M-RoPE: time, row, column); the prefill's come
    from the model's own ``get_rope_index``, each decode step's are ``text position + delta``.
    """

    name = "qwen2.5-vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    hf_class = Qwen2_5_VLForConditionalGeneration
    sequence_inputs = ("mm_token_type_ids",)
    vit_views = ("Qwen2.5-VL's vision encoder attends within 112-px windows in most blocks and has no CLS "
                 "token, so ViT rollout / VLM-Visualizer maps do not apply; use the LLM attention maps")

    def load_processor(self, source):
        """The Qwen2.5-VL processor (image processor + tokenizer; no video processor without torchvision)."""
        return load_without_video(Qwen2_5_VLProcessor, source)

    def vision_info(self, config: Any) -> dict[str, Any]:
        """``vision_image_size`` is 0: the input resolution is dynamic."""
        vision = config.vision_config
        return dict(vision_layers=vision.depth, vision_heads=vision.num_heads, vision_image_size=0,
                    vision_patch_size=vision.patch_size * vision.spatial_merge_size,
                    vision_feature_layer=-1, vision_feature_select_strategy="full")

    def position_ids(self, model: Any, kwargs: dict[str, torch.Tensor]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``([3, B, T] M-RoPE positions, [B, 1] delta)`` from the model's own ``get_rope_index``."""
        inner = getattr(model, "model", model)
        return inner.get_rope_index(kwargs["input_ids"], mm_token_type_ids=kwargs["mm_token_type_ids"],
                                    image_grid_thw=kwargs["image_grid_thw"],
                                    attention_mask=kwargs.get("attention_mask"))

    def decode_position_ids(self, text_positions: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``[3, B, 1]``: after the prompt, all three M-RoPE axes advance together from ``max + 1``."""
        return (text_positions + delta.to(text_positions.device))[None].expand(3, -1, -1)

    def _layout(self, extra, image_size, config, processor):
        t, h, w = (int(v) for v in extra["image_grid_thw"][0])
        merge = config.vision_config.spatial_merge_size
        rows, cols = h // merge, w // merge
        k = torch.arange(t * rows * cols)
        row, col = k // cols % rows, k % cols
        return torch.zeros_like(k), row, col, [(rows, cols)], grid_boxes(row, col, rows, cols)
