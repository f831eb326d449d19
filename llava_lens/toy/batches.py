r"""Training batches for the embedded ``shapes-tiny`` model, each a pure function of ``(seed, step)``.

Two kinds, one per training stage (see :mod:`llava_lens.toy.train`):

- :class:`PatchBatches`: images with a label per ViT patch (shape and colour of the object covering
  it, or background; the patch's row and column), to pretrain the vision tower the way a real
  LLaVA's CLIP encoder is pretrained before the language model ever sees it.
- :class:`QABatches`: every question/answer pair of each scene, as ``USER: <image>\n{question}
  ASSISTANT: {answer}</s>`` with labels on the answer tokens only. A scene's image is encoded once
  and shared by its 4-7 questions (``scene_index`` maps each sequence to its image).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from llava_lens.toy.scenes import COLORS, SHAPES, Scene, Style, make_qas, make_scene

MEAN = np.array(OPENAI_CLIP_MEAN, dtype=np.float32)
STD = np.array(OPENAI_CLIP_STD, dtype=np.float32)
COLOR_NAMES = tuple(COLORS)
# A patch belongs to the object covering most of it, if that object covers at least this share.
MIN_COVER = 0.15


def scene_seed(seed: int, step: int, index: int, batch_size: int) -> int:
    """The scene seed of sample ``index`` of training step ``step`` (training seeds stay < 2**50)."""
    return (seed % 1024) * 2**40 + step * batch_size + index


def pixels(images: list[np.ndarray]) -> torch.Tensor:
    """CLIP-normalised ``[B, 3, H, W]`` pixels (what the CLIP image processor gives at native size)."""
    arr = (np.stack(images).astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def patch_labels(scene: Scene, patch: int) -> np.ndarray:
    """``[4, G*G]`` int64 labels per patch (row-major): shape, colour, row, column.

    Shape is an index into ``SHAPES`` or ``len(SHAPES)`` for background; colour likewise into
    ``COLOR_NAMES``. A patch belongs to the object covering most of it (at least ``MIN_COVER``).
    """
    size = scene.image.shape[0]
    g = size // patch
    shape = np.full(g * g, len(SHAPES))
    color = np.full(g * g, len(COLOR_NAMES))
    best = np.full(g * g, MIN_COVER)
    for obj in scene.objects:
        cover = obj.mask.reshape(g, patch, g, patch).mean((1, 3)).reshape(-1)
        mine = cover >= best
        shape[mine], color[mine] = SHAPES.index(obj.shape), COLOR_NAMES.index(obj.color)
        best = np.maximum(best, cover)
    rows, cols = np.divmod(np.arange(g * g), g)
    return np.stack([shape, color, rows, cols]).astype(np.int64)


class PatchBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``step`` is the vision-pretraining batch of that step."""

    def __init__(self, seed: int, batch_size: int, style: Style, patch: int):
        self.seed, self.batch_size, self.style, self.patch = seed, batch_size, style, patch

    def __len__(self) -> int:
        return 2**31

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        scenes = [make_scene(scene_seed(self.seed, step, i, self.batch_size), self.style)
                  for i in range(self.batch_size)]
        labels = torch.from_numpy(np.stack([patch_labels(s, self.patch) for s in scenes]))
        return {"pixel_values": pixels([s.image for s in scenes]), "labels": labels}


class QABatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``step`` is the question-answering batch of that step.

    ``batch_size`` scenes, all of each scene's QA pairs, plus one more freshly drawn question of each
    type in ``extra`` (the types that take longest to learn get more of the batch). Keys: ``pixel_values [S, 3, H, W]``,
    ``scene_index [N]``, ``input_ids``/``attention_mask``/``labels`` ``[N, T]`` (right-padded).
    """

    def __init__(self, processor, seed: int, batch_size: int, style: Style, extra: tuple[str, ...] = ()):
        self.tok = processor.tokenizer
        self.extra = extra
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self.seed, self.batch_size, self.style = seed, batch_size, style
        self.n_image = (style.size // processor.patch_size) ** 2

    def __len__(self) -> int:
        return 2**31

    def encode(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """Token ids and labels of one prompt + answer (labels are -100 outside the answer)."""
        prompt = self.tok(f"USER: <image>\n{question} ASSISTANT:")["input_ids"]
        i = prompt.index(self.image_id)
        prompt = prompt[:i] + [self.image_id] * self.n_image + prompt[i + 1:]
        target = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return prompt + target, [-100] * len(prompt) + target

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        ids, labels, images, index = [], [], [], []
        for k in range(self.batch_size):
            seed = scene_seed(self.seed, step, k, self.batch_size)
            scene = make_scene(seed, self.style)
            images.append(scene.image)
            more = make_qas(np.random.default_rng(seed + 2**50), scene.objects, self.style.size) if self.extra else []
            for qa in scene.qas + [qa for qa in more if qa.qtype in self.extra]:
                x, y = self.encode(qa.question, qa.answer)
                ids.append(x)
                labels.append(y)
                index.append(k)
        width = max(map(len, ids))
        pad = self.tok.pad_token_id
        return {
            "pixel_values": pixels(images),
            "scene_index": torch.tensor(index),
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
        }
