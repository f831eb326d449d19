"""Turn user input (an image and a question) into model inputs, with clear errors on bad input."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from llava_lens.errors import ImageError, PromptError

ImageLike = Union[str, Path, bytes, Image.Image, np.ndarray]

# Vocabularies up to this size are listed in full in the unknown-words warning (word-level toys).
LIST_VOCAB_UP_TO = 300

# The LLaVA-1.5 conversation format, used when the processor has no chat template.
LLAVA15_FORMAT = "USER: <image>\n{question} ASSISTANT:"


def load_image(image: ImageLike) -> Image.Image:
    """Return ``image`` as a fully decoded RGB PIL image.

    Accepts a path, raw bytes, a PIL image or a ``uint8``/float array (HxW, HxWx1, HxWx3, HxWx4).
    Palette, grayscale, RGBA and CMYK modes are converted to RGB (alpha composited on white).
    Raises :class:`ImageError` for a missing, corrupt, truncated or empty image.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        img = _open(path.read_bytes(), str(path))
    elif isinstance(image, bytes):
        img = _open(image, "image bytes")
    elif isinstance(image, Image.Image):
        img = image
    elif isinstance(image, np.ndarray):
        img = _from_array(image)
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}; pass a path, PIL image or array")
    if img.width == 0 or img.height == 0:
        raise ImageError(f"image is empty ({img.width}x{img.height} pixels)")
    return _to_rgb(img)


def _open(data: bytes, name: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now: truncated files fail here, not deep inside the processor
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot read {name} as an image: {str(err).splitlines()[0]}") from None
    return img


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or 0 in arr.shape:
        raise ImageError(f"image array must be HxW, HxWx3 or HxWx4 and non-empty, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        # float images are taken to be in [0, 1], as matplotlib and most pipelines use
        arr = np.clip(np.asarray(arr, dtype=np.float64) * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255)
        arr = arr.astype(np.uint8)
    return Image.fromarray(arr)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def build_prompt(processor: Any, question: str) -> str:
    r"""The full prompt for one image and one question, in the model's own conversation format.

    Uses the processor's chat template when it has one, else LLaVA-1.5's
    ``USER: <image>\n{question} ASSISTANT:``. The question must be non-empty text with no image
    placeholder of its own: llava-lens puts exactly one image in each prompt.
    """
    if not isinstance(question, str) or not question.strip():
        raise PromptError("the question is empty; ask something about the image")
    image_token = getattr(processor, "image_token", "<image>")
    if image_token in question:
        raise PromptError(
            f"the question contains the image placeholder {image_token!r}; "
            "llava-lens inserts exactly one image itself, so pass the bare question"
        )
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return LLAVA15_FORMAT.format(question=question)


class UnknownWordsWarning(UserWarning):
    """The question has words the tokenizer maps to its unknown token: the model cannot read them."""


def unknown_words(tokenizer: Any, text: str) -> list[str]:
    """The pieces of ``text`` that ``tokenizer`` maps to its unknown token, in order, without repeats.

    Empty for tokenizers without an unknown token (byte-level BPE never needs one). Uses the
    tokenizer's own offsets, so what is reported is exactly the text it could not read.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    found = [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]
    return list(dict.fromkeys(found))


def warn_unknown_words(tokenizer: Any, question: str) -> list[str]:
    """Warn once (one :class:`UnknownWordsWarning` per question) naming the words read as unknown.

    Small vocabularies (up to ``LIST_VOCAB_UP_TO`` entries, the embedded model's included) are
    listed in the warning so the user sees which words the model does know. Returns the words.
    """
    words = unknown_words(tokenizer, question)
    if words:
        vocab = sorted(w for w in tokenizer.get_vocab() if w not in tokenizer.all_special_tokens)
        known = (f"; the words it knows: {' '.join(vocab)}" if len(vocab) <= LIST_VOCAB_UP_TO
                 else "; see the tokenizer's vocabulary")
        warnings.warn(f"the model's tokenizer does not know {', '.join(map(repr, words))} "
                      f"(read as {tokenizer.unk_token!r}: the model cannot read them){known}",
                      UnknownWordsWarning, stacklevel=3)
    return words


@dataclass
class ModelInputs:
    """Processor output for one (image, question) pair, plus what it was made from."""

    input_ids: torch.Tensor
    """``[1, seq]`` token ids, image placeholders already expanded to one per image feature."""
    pixel_values: torch.Tensor
    """``[1, 3, H, W]`` (LLaVA-1.5) or ``[1, n_tiles, 3, H, W]`` (LLaVA-NeXT)."""
    extra: dict[str, torch.Tensor]
    """Other processor outputs the model needs (``image_sizes`` for LLaVA-NeXT)."""
    image: Image.Image
    prompt: str


def prepare(processor: Any, image: ImageLike, question: str) -> ModelInputs:
    """Validate ``image`` and ``question`` and run the processor on them.

    Words of ``question`` the tokenizer cannot read give an :class:`UnknownWordsWarning`.
    """
    img = load_image(image)
    prompt = build_prompt(processor, question)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "is_fast", False):
        warn_unknown_words(tokenizer, question)
    try:
        out = processor(images=img, text=prompt, return_tensors="pt")
    except ValueError as err:
        raise ImageError(f"the processor rejected the image: {str(err).splitlines()[0]}") from None
    extra = {k: v for k, v in out.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    return ModelInputs(out["input_ids"], out["pixel_values"], extra, img, prompt)
