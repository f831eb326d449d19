"""LLaVA-OneVision adapter (SigLIP + Qwen2, anyres-max with unpadding)."""

from __future__ import annotations

import torch
from transformer_lens.utilities.attn_implementation import force_eager_attention
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
    image_size_to_num_patches,
)

from llava_lens.errors import UnsupportedModelError
from llava_lens.families.base import ConfigOnly, Family, load_without_video, packed_layout, patch_grid


class LlavaOnevision(Family):
    """LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``).

    Like LLaVA-NeXT: the 27x27 base grid of the whole image, then the unpadded anyres grid with a
    newline after each row; ``anyres_max_N`` then shrinks that grid (bilinear) to at most about
    N base grids. SigLIP has no CLS token, so the ``"full"`` strategy keeps every patch.
    """

    name = "llava-onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    hf_class = LlavaOnevisionForConditionalGeneration
    vit_views = None

    def prepare_hf_model(self, model):
        """Eager attention everywhere, as TransformerLens does for LLaVA.

        TransformerLens 4.3's OneVision adapter skips that step, and the SigLIP tower's
        ``hook_pattern`` never fires under sdpa.
        """
        force_eager_attention(model)

    def load_processor(self, source):
        """The OneVision processor (image processor + tokenizer; no video processor without torchvision)."""
        return load_without_video(LlavaOnevisionProcessor, source)

    def _layout(self, extra, image_size, config, processor):
        if config.vision_feature_select_strategy != "full":
            raise UnsupportedModelError("LLaVA-OneVision with vision_feature_select_strategy="
                                        f"{config.vision_feature_select_strategy!r} is not supported")
        g = patch_grid(config)
        image_sizes = extra["image_sizes"]
        n_tiles = image_size_to_num_patches(image_sizes[0], config.image_grid_pinpoints,
                                            config.vision_config.image_size)
        # HF's own packing (unpad + anyres_max downsampling + newlines) on dummy features whose
        # newline is -1: the model's exact token order, never a hand-computed grid.
        packer = LlavaOnevisionModel.pack_image_features.__get__(ConfigOnly(config))
        (packed,), _ = packer([torch.zeros(n_tiles, g * g, 1)], image_sizes,
                              image_newline=torch.full((1,), -1.0), vision_aspect_ratio=config.vision_aspect_ratio)
        return packed_layout(packed[:, 0], g)
