"""Turn user input (an image and a question) into model inputs, with clear errors on bad input.

The image policy (sizes, dtypes, ranges) lives in :mod:`llava_lens.images`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from llava_lens.errors import ImageError, PromptError
from llava_lens.images import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, ImageLike, check_size, load_image

__all__ = ["ImageLike", "load_image", "check_size", "MAX_IMAGE_PIXELS", "MAX_ASPECT_RATIO", "check_question",
           "build_prompt", "UnknownWordsWarning", "unknown_words", "warn_unknown_words", "ModelInputs", "prepare",
           "LLAVA15_FORMAT"]

# Vocabularies up to this size are listed in full in the unknown-words warning (word-level toys).
LIST_VOCAB_UP_TO = 300

# The LLaVA-1.5 conversation format, used when the processor has no chat template.
LLAVA15_FORMAT = "USER: <image>\n{question} ASSISTANT:"


def check_question(question: Any) -> str:
    """Return ``question`` if it is usable text, else raise a one-line :class:`PromptError`."""
    if not isinstance(question, str):
        raise PromptError(f"the question must be a string, got {type(question).__name__}")
    if not question.strip():
        raise PromptError("the question is empty; ask something about the image")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PromptError(f"the question is not valid text: {err.reason} {question[err.start]!r} "
                          f"at position {err.start}") from None
    return question


def build_prompt(processor: Any, question: str) -> str:
    r"""The full prompt for one image and one question, in the model's own conversation format.

    Uses the processor's chat template when it has one, else LLaVA-1.5's
    ``USER: <image>\n{question} ASSISTANT:``. The question must be non-empty text with no image
    placeholder of its own: llava-lens puts exactly one image in each prompt.
    """
    check_question(question)
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


def _find_last(haystack: list[int], needle: list[int]) -> int:
    for start in range(len(haystack) - len(needle), -1, -1):
        if haystack[start:start + len(needle)] == needle:
            return start
    return -1


def _literal_specials(processor: Any, question: str, input_ids: torch.Tensor) -> torch.Tensor:
    """Re-tokenise special-token text typed in the question (``<s>``, ``</s>``...) as plain text.

    A tokenizer matches special tokens anywhere in its input, so a typed ``</s>`` would end the
    prompt. The question's tokens are found in ``input_ids`` and replaced by its tokenisation
    with ``split_special_tokens=True`` (the prompt's own specials, the image token, stay).
    """
    tokenizer = getattr(processor, "tokenizer", None)
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    if tokenizer is None or not any(t in question for t in specials):
        return input_ids
    matched = tokenizer(question, add_special_tokens=False)["input_ids"]
    literal = tokenizer(question, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids = input_ids[0].tolist()
    start = _find_last(ids, matched)
    if start < 0:
        found = next(t for t in specials if t in question)
        raise PromptError(f"the question contains the special token {found!r}, which this tokenizer cannot "
                          "keep as plain text; remove it")
    ids[start:start + len(matched)] = literal
    return torch.tensor([ids], dtype=input_ids.dtype)


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
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
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
    image: Any
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
    input_ids = _literal_specials(processor, question, out["input_ids"])
    extra = {k: v for k, v in out.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    return ModelInputs(input_ids, out["pixel_values"], extra, img, prompt)
