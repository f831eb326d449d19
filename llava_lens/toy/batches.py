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

from collections import Counter
from collections.abc import Callable
from typing import Union

import numpy as np
import torch
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from llava_lens.toy.scenes import COLORS, NUMBERS, SHAPES, Scene, Style, make_qas, make_scene

MEAN = np.array(OPENAI_CLIP_MEAN, dtype=np.float32)
STD = np.array(OPENAI_CLIP_STD, dtype=np.float32)
COLOR_NAMES = tuple(COLORS)
# A fixed style, or a function giving each scene seed its own style (``scenes.random_style``).
StyleLike = Union[Style, Callable[[int], Style]]
# A patch belongs to the object covering most of it, if that object covers at least this share.
MIN_COVER = 0.15
# The words that name what an answer says about the image (colour, shape, number, yes/no, side).
# Weighting them up in stage 2 (``answer_weight``) makes the one word that decides a position or
# yes/no answer count as much as the sentence around it; an attribute word that is only copied from
# the question ("the *star* is red") is weighted too, harmlessly: copying is learned first.
ATTRIBUTE_WORDS = (*COLORS, *SHAPES, *NUMBERS, "yes", "no", "left", "right", "top", "bottom")


def scene_seed(seed: int, step: int, index: int, batch_size: int) -> int:
    """The scene seed of sample ``index`` of training step ``step`` (training seeds stay < 2**50)."""
    return (seed % 1024) * 2**40 + step * batch_size + index


def style_of(style: StyleLike, seed: int) -> Style:
    """The style scene ``seed`` is drawn in."""
    return style if isinstance(style, Style) else style(seed)


def pixels(images: list[np.ndarray], size: int | None = None) -> torch.Tensor:
    """CLIP-normalised ``[B, 3, size, size]`` pixels, as the CLIP image processor gives them.

    Square images of another size are resized (bicubic, antialiased, like the processor).
    """
    out = []
    for image in images:
        x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
        if size is not None and image.shape[0] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                                                align_corners=False).clamp(0, 255).round()
        out.append(x[0])
    mean, std = torch.from_numpy(MEAN)[:, None, None], torch.from_numpy(STD)[:, None, None]
    return ((torch.stack(out) / 255.0 - mean) / std).contiguous()


def patch_labels(scene: Scene, patch: int, image_size: int | None = None) -> np.ndarray:
    """``[4, G*G]`` int64 labels per patch (row-major): shape, colour, row, column.

    ``G = image_size // patch`` (``image_size``: the model's input size, default the scene's); the
    scene's canvas must be a multiple of ``G``. Shape is an index into ``SHAPES`` or ``len(SHAPES)``
    for background; colour likewise into ``COLOR_NAMES``. A patch belongs to the object covering
    most of it (at least ``MIN_COVER``).
    """
    size = scene.image.shape[0]
    g = (image_size or size) // patch
    patch = size // g  # in canvas pixels
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

    def __init__(self, seed: int, batch_size: int, style: StyleLike, patch: int, image_size: int = 64):
        self.seed, self.batch_size, self.style, self.patch = seed, batch_size, style, patch
        self.image_size = image_size

    def __len__(self) -> int:
        return 2**31

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        seeds = [scene_seed(self.seed, step, i, self.batch_size) for i in range(self.batch_size)]
        scenes = [make_scene(s, style_of(self.style, s)) for s in seeds]
        labels = torch.from_numpy(np.stack([patch_labels(s, self.patch, self.image_size) for s in scenes]))
        return {"pixel_values": pixels([s.image for s in scenes], self.image_size), "labels": labels}


class QABatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``step`` is the question-answering batch of that step.

    ``batch_size`` scenes, all of each scene's QA pairs, plus one more freshly drawn question per
    mention of a type in ``extra`` (the types that take longest to learn get more of the batch).
    Keys: ``pixel_values [S, 3, H, W]``, ``scene_index [N]``,
    ``input_ids``/``attention_mask``/``labels``/``weights`` ``[N, T]`` (right-padded).
    ``weights`` is the loss weight of each label: ``answer_weight`` on the words in ``ATTRIBUTE_WORDS``,
    1 on the other answer tokens, 0 outside the answer.
    """

    def __init__(self, processor, seed: int, batch_size: int, style: StyleLike, extra: tuple[str, ...] = (),
                 answer_weight: float = 1.0):
        self.tok = processor.tokenizer
        self.extra, self.answer_weight = Counter(extra), answer_weight
        ids = set(self.tok.convert_tokens_to_ids(list(ATTRIBUTE_WORDS))) - {self.tok.unk_token_id}
        self.attribute = torch.tensor(sorted(ids))
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self.seed, self.batch_size, self.style = seed, batch_size, style
        self.image_size = processor.image_processor.crop_size["height"]
        self.n_image = (self.image_size // processor.patch_size) ** 2
        # A few hundred distinct (question, answer) pairs recur all run: tokenize each once
        # (nearly half of a batch's drawing time otherwise). Per instance, so per data-loading worker.
        self.encoded: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def __len__(self) -> int:
        return 2**31

    def encode(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """Token ids and labels of one prompt + answer (labels are -100 outside the answer); do not mutate them."""
        if (question, answer) not in self.encoded:
            self.encoded[question, answer] = self._encode(question, answer)
        return self.encoded[question, answer]

    def _encode(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        prompt = self.tok(f"USER: <image>\n{question} ASSISTANT:")["input_ids"]
        i = prompt.index(self.image_id)
        prompt = prompt[:i] + [self.image_id] * self.n_image + prompt[i + 1:]
        target = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return prompt + target, [-100] * len(prompt) + target

    def extra_qas(self, seed: int, objects, size: int) -> list:
        """Freshly drawn questions of the types in ``extra``; a type named k times is drawn k times."""
        qas = []
        for round_ in range(max(self.extra.values(), default=0)):
            rng = np.random.default_rng(seed + 2**50 if round_ == 0 else (seed, round_))
            wanted = {t for t, n in self.extra.items() if n > round_}
            qas += [qa for qa in make_qas(rng, objects, size) if qa.qtype in wanted]
        return qas

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        ids, labels, images, index = [], [], [], []
        for k in range(self.batch_size):
            seed = scene_seed(self.seed, step, k, self.batch_size)
            scene = make_scene(seed, style_of(self.style, seed))
            images.append(scene.image)
            size = scene.image.shape[0]
            for qa in scene.qas + self.extra_qas(seed, scene.objects, size):
                x, y = self.encode(qa.question, qa.answer)
                ids.append(x)
                labels.append(y)
                index.append(k)
        width = max(map(len, ids))
        pad = self.tok.pad_token_id
        labels = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
        weights = torch.where(torch.isin(labels, self.attribute), self.answer_weight, 1.0) * (labels != -100)
        return {
            "pixel_values": pixels(images, self.image_size),
            "scene_index": torch.tensor(index),
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": labels,
            "weights": weights,
        }
