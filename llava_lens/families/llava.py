"""LLaVA-1.5 and LLaVA-NeXT adapters."""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

from llava_lens.errors import UnsupportedModelError
from llava_lens.families.base import (
    ConfigOnly,
    Family,
    center_crop_box,
    grid_boxes,
    packed_layout,
    patch_grid,
    with_cls,
)


class Llava15(Family):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): one square patch grid of the centre crop."""

    name = "llava-1.5"
    architectures = ("LlavaForConditionalGeneration",)
    hf_class = LlavaForConditionalGeneration

    def _layout(self, extra, image_size, config, processor):
        g = patch_grid(config)
        idx = torch.arange(g * g)
        row, col = idx // g, idx % g
        boxes = grid_boxes(row, col, g, g, *center_crop_box(processor.image_processor, image_size))
        tile, row, col, boxes = with_cls(config, torch.zeros_like(idx), row, col, boxes)
        return tile, row, col, [(g, g)], boxes


class LlavaNext(Family):
    """LLaVA-NeXT (``LlavaNextForConditionalGeneration``).

    Base grid, then the unpadded anyres grid with a newline token after each row.
    """

    name = "llava-next"
    architectures = ("LlavaNextForConditionalGeneration",)
    hf_class = LlavaNextForConditionalGeneration

    def _layout(self, extra, image_size, config, processor):
        if config.vision_feature_select_strategy == "full":
            raise UnsupportedModelError("LLaVA-NeXT with vision_feature_select_strategy='full' is not supported")
        g = patch_grid(config)
        image_sizes = extra["image_sizes"]
        n_tiles = image_size_to_num_patches(image_sizes[0], config.image_grid_pinpoints,
                                            config.vision_config.image_size)
        # Run HF's own packing on 1-d dummy features with a -1 newline, so the layout (tiles merged
        # into one unpadded grid, a newline token after each row) is exactly the model's.
        packer = LlavaNextModel.pack_image_features.__get__(ConfigOnly(config))
        (packed,), _ = packer([torch.zeros(n_tiles, g * g, 1)], image_sizes, "default",
                              image_newline=torch.full((1,), -1.0))
        return packed_layout(packed[:, 0], g)
