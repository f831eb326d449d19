"""Re-scoring the model on edited images: deletion/insertion curves and occlusion maps.

Both mask out image patches chosen by a map (or one at a time), re-run the model teacher-forced on
the generated tokens (batched ``lens.hf_model`` forwards, no generation) and read token probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from llava_lens.analysis.metrics import auc
from llava_lens.families import VisionSpan
from llava_lens.grounding import paint_grid

FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
"""Shares of the patches deleted / inserted along a deletion or insertion curve."""


def patch_order(grid: torch.Tensor) -> torch.Tensor:
    """Grid cells (flat indices) from the highest map value to the lowest (stable on ties)."""
    return torch.sort(grid.flatten().float(), descending=True, stable=True).indices


def masked_images(image: np.ndarray, span: VisionSpan, order: torch.Tensor,
                  fractions: Sequence[float] = FRACTIONS) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Deletion and insertion images for each fraction of the patches in ``order``.

    Deletion replaces the top ``f`` patches by the image's median colour (the background);
    insertion starts from a canvas of that colour (over the patches' region; pixels outside every
    patch box, e.g. centre-cropped margins, stay as they are) and puts the top ``f`` patches back.
    """
    rows, cols = span.grids[0]
    h, w = image.shape[:2]
    fill = np.median(image.reshape(-1, 3), axis=0).astype(image.dtype)
    covered = paint_grid(torch.ones(rows, cols), span, size=(h, w)).numpy() > 0  # pixels the model sees
    cells = torch.zeros(rows * cols)
    deletion, insertion = [], []
    for f in fractions:
        cells.zero_()
        cells[order[: int(round(f * rows * cols))]] = 1
        top = paint_grid(cells.reshape(rows, cols), span, size=(h, w)).numpy() > 0
        d, i = image.copy(), image.copy()
        d[top] = fill
        i[covered & ~top] = fill
        deletion.append(d)
        insertion.append(i)
    return deletion, insertion


@torch.no_grad()
def token_probs(lens: Any, images: Sequence[np.ndarray], question: str, token_ids: Sequence[int],
                batch_size: int = 64) -> torch.Tensor:
    """``[len(images), len(token_ids)]``: probability of each ``token_ids[s]`` given prompt + ``token_ids[:s]``.

    Teacher-forced: one processor call and one forward of ``lens.hf_model`` per batch of images, no
    generation (the processor's extra outputs, e.g. LLaVA-NeXT's ``image_sizes``, are passed on).
    """
    from llava_lens.inputs import build_prompt, load_image

    prompt = build_prompt(lens.processor, question)
    tokens = torch.tensor([list(token_ids)], dtype=torch.long)
    probs = []
    for start in range(0, len(images), batch_size):
        batch = [load_image(im) for im in images[start:start + batch_size]]
        enc = lens.processor(images=batch, text=[prompt] * len(batch), return_tensors="pt")
        n_prompt = enc["input_ids"].shape[1]
        ids = torch.cat([enc["input_ids"], tokens[:, :-1].expand(len(batch), -1)], 1).to(lens.device)
        extra = {k: v.to(lens.device) for k, v in enc.items()
                 if k not in ("input_ids", "pixel_values", "attention_mask")}
        pix = enc["pixel_values"].to(lens.device, lens.dtype)
        logits = lens.hf_model(input_ids=ids, pixel_values=pix, **extra).logits[:, n_prompt - 1:].float()
        index = tokens.expand(len(batch), -1)[..., None].to(lens.device)
        probs.append(logits.softmax(-1).gather(-1, index)[..., 0].cpu())
    return torch.cat(probs)


def answer_probs(lens: Any, images: Sequence[np.ndarray], question: str, prefix_ids: Sequence[int],
                 target_id: int, batch_size: int = 64) -> torch.Tensor:
    """``[len(images)]``: probability of ``target_id`` after the prompt and ``prefix_ids`` (teacher-forced)."""
    return token_probs(lens, images, question, [*prefix_ids, target_id], batch_size)[:, -1]


def occlusion_map(lens: Any, trace: Any, image: Optional[np.ndarray] = None) -> torch.Tensor:
    """``[S, rows, cols]``: drop of each generated token's probability when one patch is occluded.

    A causal reference map (Zeiler & Fergus 2014): every grid-0 patch in turn is replaced by the
    image's median colour and the generated tokens are re-scored, teacher-forced (``rows x cols``
    images in one batched forward).
    """
    image = np.asarray(trace.image) if image is None else image
    span = trace.vision_span
    rows, cols = span.grids[0]
    fill = np.median(image.reshape(-1, 3), axis=0).astype(image.dtype)
    occluded = []
    for cell in range(rows * cols):
        one = torch.zeros(rows * cols)
        one[cell] = 1
        hit = paint_grid(one.reshape(rows, cols), span, size=image.shape[:2]).numpy() > 0
        im = image.copy()
        im[hit] = fill
        occluded.append(im)
    probs = token_probs(lens, [image] + occluded, trace.question, trace.token_ids)  # [1 + P, S]
    return (probs[:1] - probs[1:]).T.reshape(-1, rows, cols)


@dataclass
class DeletionInsertion:
    """Answer probability as the top patches are deleted / inserted, and the areas under the curves."""

    fractions: tuple[float, ...]
    deletion: torch.Tensor
    insertion: torch.Tensor

    @property
    def deletion_auc(self) -> float:
        """Lower is better: the answer should collapse once the top patches are gone."""
        return auc(self.deletion.tolist(), self.fractions)

    @property
    def insertion_auc(self) -> float:
        """Higher is better: the answer should come back with the top patches alone."""
        return auc(self.insertion.tolist(), self.fractions)


def deletion_insertion(lens: Any, image: np.ndarray, question: str, span: VisionSpan, grid: torch.Tensor,
                       prefix_ids: Sequence[int], target_id: int,
                       fractions: Sequence[float] = FRACTIONS) -> DeletionInsertion:
    """Deletion and insertion curves of one map (``grid [rows, cols]``) for one answer token."""
    deletion, insertion = masked_images(image, span, patch_order(grid), fractions)
    probs = answer_probs(lens, deletion + insertion, question, prefix_ids, target_id)
    n = len(fractions)
    return DeletionInsertion(tuple(fractions), probs[:n], probs[n:])
