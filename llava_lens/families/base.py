"""The adapter contract (:class:`Family`) and what every adapter returns (:class:`VisionSpan`).

See :mod:`llava_lens.families` for what an adapter must provide.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from transformers import AutoProcessor

from llava_lens.errors import UnsupportedModelError


@dataclass
class VisionSpan:
    """Which sequence positions hold image features, and where each sits on the image.

    ``n`` below is the number of image-feature positions in the sequence.
    """

    positions: torch.Tensor
    """``[n]`` long: sequence positions of the image features, ascending."""
    tile: torch.Tensor
    """``[n]`` long: index into ``grids``: 0 for the base (whole-image) grid, 1 for the
    high-resolution (anyres) grid of LLaVA-NeXT/OneVision; -1 for positions that cover no patch
    (row-end newline tokens, a kept CLS feature)."""
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


def grid_boxes(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int,
                top: float = 0.0, left: float = 0.0, height: float = 1.0, width: float = 1.0) -> torch.Tensor:
    """Boxes of cells (row, col) of an n_rows x n_cols grid laid over a sub-rectangle of the image."""
    r, c = rows.float(), cols.float()
    return torch.stack([
        top + r / n_rows * height, left + c / n_cols * width,
        top + (r + 1) / n_rows * height, left + (c + 1) / n_cols * width,
    ], dim=-1)


def center_crop_box(image_processor: Any, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
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
    """Base adapter: one model family. Subclasses set the class attributes and ``_layout``."""

    name: str
    """Short name stored in every trace (``trace.info.family``)."""
    architectures: tuple[str, ...]
    """``config.architectures`` entries this adapter accepts."""
    hf_class: type
    """The Hugging Face ``...ForConditionalGeneration`` class to load."""
    sequence_inputs: tuple[str, ...] = ()
    """Processor outputs laid out per token (``[1, seq]``): left-padded with the ids in a batch."""
    vit_views: Optional[str] = None
    """None when the ViT attention views apply, else the one-line reason they do not."""

    def load_processor(self, source: str) -> Any:
        """The model's processor (``AutoProcessor``; adapters may load an image-only variant)."""
        return AutoProcessor.from_pretrained(source, trust_remote_code=False)

    def prepare_hf_model(self, model: Any) -> None:
        """Fix up the loaded HF model before TransformerLens wraps it (default: nothing)."""

    def vision_info(self, config: Any) -> dict[str, Any]:
        """The ``vision_*`` fields of :class:`~llava_lens.trace.ModelInfo` (CLIP/SigLIP-style configs)."""
        vision = config.vision_config
        return dict(vision_layers=vision.num_hidden_layers, vision_heads=vision.num_attention_heads,
                    vision_image_size=vision.image_size, vision_patch_size=vision.patch_size,
                    vision_feature_layer=config.vision_feature_layer,
                    vision_feature_select_strategy=config.vision_feature_select_strategy)

    def position_ids(self, model: Any, kwargs: dict[str, torch.Tensor]) -> Optional[tuple[torch.Tensor, Any]]:
        """``(prefill position ids, state for decode)`` of a left-padded batch, or None.

        None: the engine's 1-d ``cumsum(mask) - 1``. ``kwargs``: the prefill inputs (mask,
        ``sequence_inputs``).
        """
        return None

    def decode_position_ids(self, text_positions: torch.Tensor, state: Any) -> torch.Tensor:
        """One decode step's position ids from ``[B, 1]`` 1-d positions and :meth:`position_ids`' state."""
        return text_positions

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
        """``(tile, row, col, grids, boxes)`` of the image features, in sequence order."""
        raise NotImplementedError


def image_only_processor(cls: type) -> type:
    """``cls`` (a ProcessorMixin) without its video processor, which needs torchvision to load.

    The subclass's ``__init__`` signature lacks ``video_processor``, so ``from_pretrained``
    loads only the image processor and the tokenizer (and still reads processor_config.json).
    """
    params = [p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "video_processor"]
    # from_pretrained reads the accepted keywords from __init__.__code__, so the subclass needs a
    # real function with those parameters (defaults passed by name, never through repr)
    names = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    defaults = {f"_d{i}": p.default for i, p in enumerate(params) if p.default is not p.empty}
    signature = ", ".join(
        f"**{p.name}" if p.kind is p.VAR_KEYWORD else
        (f"{p.name}=_d{i}" if p.default is not p.empty else p.name) for i, p in enumerate(params))
    rest = next((f", **{p.name}" for p in params if p.kind is p.VAR_KEYWORD), "")
    call = ", ".join(f"{n}={n}" for n in names[1:])
    scope: dict[str, Any] = {"_parent": cls, **defaults}
    exec(f"def __init__({signature}):\n    _parent.__init__(self, {call}, video_processor=None{rest})\n", scope)
    return type(cls.__name__, (cls,), {"__init__": scope["__init__"], "__module__": __name__})


def load_without_video(cls: type, source: str) -> Any:
    """``AutoProcessor.from_pretrained``, else :func:`image_only_processor`'s.

    The fallback is for a video processor that cannot load (it needs torchvision, or the
    directory has none): llava-lens never feeds videos.
    """
    try:
        return AutoProcessor.from_pretrained(source, trust_remote_code=False)
    except (ImportError, OSError):
        return image_only_processor(cls).from_pretrained(source, trust_remote_code=False)


def patch_grid(config: Any) -> int:
    """Patches per side of the vision tower's square input."""
    return config.vision_config.image_size // config.vision_config.patch_size


def with_cls(config: Any, tile, row, col, boxes):
    """Prepend a patchless CLS feature when the model keeps it ("full" feature strategy)."""
    if config.vision_feature_select_strategy != "full":
        return tile, row, col, boxes
    minus = torch.tensor([-1])
    nan = torch.full((1, 4), float("nan"))
    return (torch.cat([minus, tile]), torch.cat([minus, row]), torch.cat([minus, col]),
            torch.cat([nan, boxes]))


def packed_layout(packed: torch.Tensor, g: int):
    """``(tile, row, col, grids, boxes)`` from HF-packed dummy features (``[n]``, newlines < 0).

    The packing is LLaVA-NeXT's and OneVision's: the ``g x g`` base grid (the whole image), then
    the unpadded high-resolution grid row by row, each row followed by a newline feature (or,
    without high-resolution tiles, newline features only).
    """
    n_base = g * g
    base = torch.arange(n_base)
    base_row, base_col = base // g, base % g
    is_nl = packed[n_base:] < 0
    grids = [(g, g)]
    boxes = [grid_boxes(base_row, base_col, g, g)]
    k = torch.arange(len(is_nl))
    hi_row = hi_col = torch.full_like(k, -1)
    if not is_nl.all():
        n_rows = int(is_nl.sum())
        n_cols = len(is_nl) // n_rows - 1
        hi_row, hi_col = k // (n_cols + 1), k % (n_cols + 1)
        grids.append((n_rows, n_cols))
    boxes.append(grid_boxes(hi_row, hi_col, *grids[-1]) if len(grids) > 1 else torch.zeros(len(k), 4))
    tile = torch.cat([torch.zeros(n_base, dtype=torch.long), torch.where(is_nl, -1, 1)])
    row = torch.cat([base_row, torch.where(is_nl, -1, hi_row)])
    col = torch.cat([base_col, torch.where(is_nl, -1, hi_col)])
    boxes = torch.cat(boxes)
    boxes[tile < 0] = float("nan")
    return tile, row, col, grids, boxes


class ConfigOnly:
    """Stand-in ``self`` for HF's ``pack_image_features``, which only reads ``self.config``."""

    def __init__(self, config: Any):
        self.config = config


