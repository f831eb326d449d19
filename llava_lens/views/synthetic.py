"""A :class:`~llava_lens.Trace` of real-model geometry with random attention, built without a model.

For sizing and rendering the views at LLaVA-1.5-7B / LLaVA-NeXT scale in tests and benchmarks
(32 layers x 32 heads, 576 or ~2,900 image features): :func:`synthetic_trace`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from llava_lens.families import VisionSpan
from llava_lens.trace import ModelInfo, Step, Trace

PREFIX = ["<s>", "▁USER", ":", "▁"]
SUFFIX = ["<0x0A>", "What", "▁color", "▁is", "▁the", "▁cross", "?", "▁A", "SS", "IST", "ANT", ":"]


def _grid_span(start: int, grids: Sequence[tuple[int, int]], newline: bool, size: tuple[int, int]) -> VisionSpan:
    """Positions from ``start``: grid 0 row-major, then grid 1 with a newline feature after each row."""
    tile, row, col, boxes = [], [], [], []
    for t, (rows, cols) in enumerate(grids):
        for r in range(rows):
            for c in range(cols):
                tile.append(t), row.append(r), col.append(c)
                boxes.append([r / rows, c / cols, (r + 1) / rows, (c + 1) / cols])
            if newline and t == 1:
                tile.append(-1), row.append(-1), col.append(-1)
                boxes.append([float("nan")] * 4)
    n = len(tile)
    return VisionSpan(torch.arange(start, start + n), torch.tensor(tile), torch.tensor(row), torch.tensor(col),
                      torch.tensor(boxes, dtype=torch.float32), [tuple(g) for g in grids], size)


def _image(size: int) -> Image.Image:
    """Grey canvas with a purple cross (the colour a heatmap overlay must not wash out)."""
    img = np.full((size, size, 3), 200, np.uint8)
    third = size // 3
    img[third:2 * third, size // 8:-size // 8] = (128, 0, 128)
    img[size // 8:-size // 8, third:2 * third] = (128, 0, 128)
    return Image.fromarray(img)


def _rows(gen: torch.Generator, layers: int, heads: int, keys: int) -> torch.Tensor:
    return (3 * torch.randn(layers, heads, keys, generator=gen)).softmax(-1).half()


def synthetic_trace(n_steps: int = 24, layers: int = 32, heads: int = 32, next_grid: Sequence[int] | None = None,
                    prefill_layers: Sequence[int] = (), image_size: int = 336, seed: int = 0) -> Trace:
    """A trace with random fp16 attention rows, LLaVA-1.5 geometry or LLaVA-NeXT's.

    Default: 24x24 patches; with ``next_grid=(rows, cols)`` a 24x24 base grid plus a
    high-resolution grid with row-end newlines. ``prefill_layers`` get a full random ``[H, P, P]``
    prefill pattern (``2 H P^2`` bytes each); other layers have none, as in a trace that stored only some.
    """
    gen = torch.Generator().manual_seed(seed)
    grids = [(24, 24)] + ([tuple(next_grid)] if next_grid else [])
    span = _grid_span(len(PREFIX), grids, bool(next_grid), (image_size, image_size))
    prompt_tokens = PREFIX + ["<image>"] * len(span) + SUFFIX
    prompt_len = len(prompt_tokens)
    words = ["▁The", "▁cross", "▁is", "\tpurple", "<id:32010>", "</script>", "▁$x$", "."]
    steps = []
    for i in range(n_steps):
        steps.append(Step(index=i, token_id=100 + i, token=words[i % len(words)], position=prompt_len - 1 + i,
                          logits=None, top_ids=torch.tensor([100 + i]), top_logits=torch.tensor([1.0]),
                          attention=_rows(gen, layers, heads, prompt_len + i)))
    prefill = {}
    for layer in prefill_layers:
        scores = torch.randn(heads, prompt_len, prompt_len, generator=gen)
        mask = torch.ones(prompt_len, prompt_len, dtype=torch.bool).triu(1)
        prefill[f"blocks.{layer}.attn.hook_pattern"] = scores.masked_fill(mask, float("-inf")).softmax(-1).half()
    info = ModelInfo(family="llava_next" if next_grid else "llava", n_layers=layers, n_heads=heads, d_model=4096,
                     d_vocab=32064, vision_layers=24, vision_heads=16, vision_image_size=336,
                     vision_patch_size=14, vision_feature_layer=-2, vision_feature_select_strategy="default")
    return Trace(steps=steps, vision_span=span, prompt_ids=torch.arange(prompt_len), prompt_tokens=prompt_tokens,
                 question="What color is the cross?", prompt="USER: <image>\nWhat color is the cross? ASSISTANT:",
                 text="".join(s.token for s in steps).replace("▁", " "), image=_image(image_size),
                 model_name="synthetic/llava-geometry", info=info, prefill=prefill)
