"""What differs between LLaVA model families, one small adapter each.

An adapter knows the Hugging Face class of its family and how the image features sit in the
token sequence: which sequence positions hold them and which region of the original image each
covers (the :class:`VisionSpan`). Adding a family (Qwen2.5-VL, Idefics3...) means adding one
adapter here and registering it in :data:`FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextModel,
    image_size_to_num_patches,
)

from llava_lens.errors import UnsupportedModelError


@dataclass
class VisionSpan:
    """Which sequence positions hold image features, and where each sits on the image.

    ``n`` below is the number of image-feature positions in the sequence.
    """

    positions: torch.Tensor
    """``[n]`` long: sequence positions of the image features, ascending."""
    tile: torch.Tensor
    """``[n]`` long: 0 for the base (whole-image) grid, 1 for LLaVA-NeXT's high-resolution
    (anyres) grid, -1 for positions that cover no patch (NeXT's row-end newline tokens)."""
    row: torch.Tensor
    """``[n]`` long: row of the patch within its grid (-1 where ``tile`` is -1)."""
    col: torch.Tensor
    """``[n]`` long: column of the patch within its grid (-1 where ``tile`` is -1)."""
    boxes: torch.Tensor
    """``[n, 4]`` float: (top, left, bottom, right) of the patch's region as fractions of the
    original image's height and width; NaN where ``tile`` is -1."""
    grids: list[tuple[int, int]]
    """(rows, cols) of each grid, indexed by ``tile``."""
    image_size: tuple[int, int]
    """(height, width) of the original image in pixels."""

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def is_patch(self) -> torch.Tensor:
        """``[n]`` bool: the position covers an image region (not a newline token)."""
        return self.tile >= 0

    def to_grid(self, values: torch.Tensor, tile: int = 0) -> torch.Tensor:
        """Arrange per-position ``values [..., n]`` on grid ``tile`` as ``[..., rows, cols]``."""
        rows, cols = self.grids[tile]
        grid = values.new_zeros(*values.shape[:-1], rows, cols)
        sel = self.tile == tile
        grid[..., self.row[sel], self.col[sel]] = values[..., sel]
        return grid

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (tensors as lists)."""
        return {
            "positions": self.positions.tolist(), "tile": self.tile.tolist(), "row": self.row.tolist(),
            "col": self.col.tolist(), "boxes": self.boxes.tolist(), "grids": [list(g) for g in self.grids],
            "image_size": list(self.image_size),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionSpan:
        """Inverse of :meth:`to_dict`."""
        long = {k: torch.tensor(d[k], dtype=torch.long) for k in ("positions", "tile", "row", "col")}
        boxes = torch.tensor(d["boxes"], dtype=torch.float32).reshape(-1, 4)
        return cls(**long, boxes=boxes, grids=[tuple(g) for g in d["grids"]],
                   image_size=tuple(d["image_size"]))


def _grid_boxes(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int,
                top: float = 0.0, left: float = 0.0, height: float = 1.0, width: float = 1.0) -> torch.Tensor:
    """Boxes of cells (row, col) of an n_rows x n_cols grid laid over a sub-rectangle of the image."""
    r, c = rows.float(), cols.float()
    return torch.stack([
        top + r / n_rows * height, left + c / n_cols * width,
        top + (r + 1) / n_rows * height, left + (c + 1) / n_cols * width,
    ], dim=-1)


def _center_crop_box(image_processor: Any, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """(top, left, height, width), as fractions, of the region a CLIP-style processor keeps."""
    if not getattr(image_processor, "do_center_crop", False):
        return 0.0, 0.0, 1.0, 1.0
    h, w = image_size
    size, crop = image_processor.size, image_processor.crop_size
    if "shortest_edge" in size:
        scale = size["shortest_edge"] / min(h, w)
        rh, rw = h * scale, w * scale
    else:
        rh, rw = size["height"], size["width"]
    ch, cw = min(crop["height"], rh), min(crop["width"], rw)
    return (rh - ch) / 2 / rh, (rw - cw) / 2 / rw, ch / rh, cw / rw


class Family:
    """Base adapter: one LLaVA model family."""

    name: str
    architectures: tuple[str, ...]
    hf_class: type

    def vision_span(self, input_ids: torch.Tensor, extra: dict, image_size: tuple[int, int],
                    config: Any, processor: Any) -> VisionSpan:
        """The :class:`VisionSpan` of one processed prompt (``input_ids [1, seq]``)."""
        positions = (input_ids[0] == config.image_token_id).nonzero().flatten()
        tile, row, col, grids, boxes = self._layout(extra, image_size, config, processor)
        if len(tile) != len(positions):
            raise UnsupportedModelError(
                f"{len(positions)} image tokens in the prompt but the {self.name} layout has "
                f"{len(tile)} features; the processor and model config disagree"
            )
        return VisionSpan(positions, tile, row, col, boxes, grids, image_size)

    def _layout(self, extra, image_size, config, processor):
        raise NotImplementedError


def _patch_grid(config: Any) -> int:
    return config.vision_config.image_size // config.vision_config.patch_size


def _with_cls(config: Any, tile, row, col, boxes):
    """Prepend a patchless CLS feature when the model keeps it ("full" feature strategy)."""
    if config.vision_feature_select_strategy != "full":
        return tile, row, col, boxes
    minus = torch.tensor([-1])
    nan = torch.full((1, 4), float("nan"))
    return (torch.cat([minus, tile]), torch.cat([minus, row]), torch.cat([minus, col]),
            torch.cat([nan, boxes]))


class Llava15(Family):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): one square patch grid of the centre crop."""

    name = "llava-1.5"
    architectures = ("LlavaForConditionalGeneration",)
    hf_class = LlavaForConditionalGeneration

    def _layout(self, extra, image_size, config, processor):
        g = _patch_grid(config)
        idx = torch.arange(g * g)
        row, col = idx // g, idx % g
        boxes = _grid_boxes(row, col, g, g, *_center_crop_box(processor.image_processor, image_size))
        tile, row, col, boxes = _with_cls(config, torch.zeros_like(idx), row, col, boxes)
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
        g = _patch_grid(config)
        image_sizes = extra["image_sizes"]
        n_tiles = image_size_to_num_patches(image_sizes[0], config.image_grid_pinpoints,
                                            config.vision_config.image_size)
        # Run HF's own packing on 1-d dummy features with a -1 newline, so the layout (tiles merged
        # into one unpadded grid, a newline token after each row) is exactly the model's.
        packer = LlavaNextModel.pack_image_features.__get__(_ConfigOnly(config))
        (packed,), _ = packer([torch.zeros(n_tiles, g * g, 1)], image_sizes, "default",
                              image_newline=torch.full((1,), -1.0))
        n_base = g * g
        is_nl = packed[n_base:, 0] < 0
        n_rows = int(is_nl.sum())
        n_cols = len(is_nl) // n_rows - 1
        k = torch.arange(len(is_nl))
        hi_row, hi_col = k // (n_cols + 1), k % (n_cols + 1)
        base = torch.arange(n_base)
        base_row, base_col = base // g, base % g
        tile = torch.cat([torch.zeros(n_base, dtype=torch.long), torch.where(is_nl, -1, 1)])
        row = torch.cat([base_row, torch.where(is_nl, -1, hi_row)])
        col = torch.cat([base_col, torch.where(is_nl, -1, hi_col)])
        boxes = torch.cat([_grid_boxes(base_row, base_col, g, g),
                           _grid_boxes(hi_row, hi_col, n_rows, n_cols)])
        boxes[tile < 0] = float("nan")
        return tile, row, col, [(g, g), (n_rows, n_cols)], boxes


class _ConfigOnly:
    """Stand-in ``self`` for HF's ``pack_image_features``, which only reads ``self.config``."""

    def __init__(self, config: Any):
        self.config = config


FAMILIES: tuple[Family, ...] = (Llava15(), LlavaNext())


def family_for(config: Any) -> Family:
    """The adapter for a model config, or a clear error naming the supported architectures."""
    archs = list(getattr(config, "architectures", None) or [])
    for fam in FAMILIES:
        if any(a in fam.architectures for a in archs):
            return fam
    supported = ", ".join(a for f in FAMILIES for a in f.architectures)
    found = ", ".join(archs) or f"model_type {getattr(config, 'model_type', '?')!r}"
    raise UnsupportedModelError(f"unsupported model ({found}); llava-lens supports {supported}")
