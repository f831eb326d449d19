"""Random-weight model directories with the *real* geometry of the llava-hf checkpoints, at tiny widths.

Everything llava-lens stores grows with layers, heads, image tokens and vocabulary, not with the
hidden width; so a model with the real numbers of layers, heads, KV heads, image/patch size,
vision-tower depth, anyres pinpoints, (padded) vocabulary and position limit of a checkpoint, but
``head_dim`` 8, exercises every shape the real checkpoint does while a forward runs in seconds on
a CPU. :func:`build_real_geometry` writes such a directory (config + processor + word tokenizer,
loadable with ``ll.load(dir)`` and ``llava-lens trace --model dir``).

The numbers below are copied from each checkpoint's ``config.json`` / processor files on the
Hugging Face hub (no hub access at build time; the table is the record):

=========================  ===================================  ======  =====  ========  ======  ======  =========
name                       source checkpoint                    layers  heads  kv heads  vocab   tokens  max pos
=========================  ===================================  ======  =====  ========  ======  ======  =========
``llava-1.5-7b``           ``llava-hf/llava-1.5-7b-hf``         32      32     32        32064   32002   4096
``llava-1.5-13b``          ``llava-hf/llava-1.5-13b-hf``        40      40     40        32064   32002   4096
``llava-next-mistral-7b``  ``llava-hf/llava-v1.6-mistral-7b-hf``  32    32     8         32064   32002   32768
=========================  ===================================  ======  =====  ========  ======  ======  =========

All three use CLIP ViT-L/14-336 (``openai/clip-vit-large-patch14-336``: 24 layers, 16 heads,
image 336, patch 14, so 24x24 = 576 patches + CLS), ``vision_feature_layer=-2`` and the
``"default"`` feature strategy (CLS dropped): 576 image tokens for LLaVA-1.5. LLaVA-NeXT adds
anyres tiles on the pinpoints ``[[336,672],[672,336],[672,672],[1008,336],[336,1008]]``: 576
base tokens + the unpadded high-resolution grid with a newline token per row, e.g. 2,340 image
tokens for a 640x480 image (48x48 grid unpadded to 36 rows, 36 x 49 + 576).

"vocab" is the text config's ``vocab_size`` (the embedding and unembedding rows); "tokens" is the
number of entries of the checkpoint's tokenizer (32000 SentencePiece pieces + ``<image>`` +
``<pad>``). The 62 ids above the tokenizer are padding rows (llava-hf padded the matrices to a
multiple of 64): they have logits but no token string, and the built models keep that quirk.

What is *not* real: the hidden widths (``heads x width``; the MLP keeps the checkpoint's
intermediate/hidden ratio), the weights (random), and the tokenizer's words (a word-level
tokenizer from :func:`llava_lens.toy.build.word_tokenizer`, padded with filler words to the real
number of entries; its special tokens sit at ids 0-4, not at the checkpoint's ids). The chat
template is LLaVA-1.5's for every family, which changes only the few prompt tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from transformers import (
    CLIPImageProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from llava_lens.errors import LlavaLensError
from llava_lens.toy.build import BASE_WORDS, CHAT_TEMPLATE, SPECIAL_TOKENS, _vision_config, word_tokenizer

NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class Geometry:
    """The shape-defining numbers of one llava-hf checkpoint (see the module table)."""

    checkpoint: str
    family: Literal["llava", "llava_next"]
    text_model: Literal["llama", "mistral"]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_size: int
    """The checkpoint's d_model; only its ratio to ``intermediate_size`` is kept."""
    intermediate_size: int
    vocab_size: int
    tokenizer_size: int
    max_positions: int
    rope_theta: float
    image_size: int = 336
    patch_size: int = 14
    vision_layers: int = 24
    vision_heads: int = 16
    vision_feature_layer: int = -2
    pinpoints: tuple[tuple[int, int], ...] = ()


GEOMETRIES: dict[str, Geometry] = {
    # llava-hf/llava-1.5-7b-hf: text_config = Vicuna-7B v1.5 (Llama-2 shape), vision = CLIP ViT-L/14-336
    "llava-1.5-7b": Geometry(
        checkpoint="llava-hf/llava-1.5-7b-hf", family="llava", text_model="llama",
        n_layers=32, n_heads=32, n_kv_heads=32, hidden_size=4096, intermediate_size=11008,
        vocab_size=32064, tokenizer_size=32002, max_positions=4096, rope_theta=10000.0),
    # llava-hf/llava-1.5-13b-hf: text_config = Vicuna-13B v1.5 (Llama-2-13B shape)
    "llava-1.5-13b": Geometry(
        checkpoint="llava-hf/llava-1.5-13b-hf", family="llava", text_model="llama",
        n_layers=40, n_heads=40, n_kv_heads=40, hidden_size=5120, intermediate_size=13824,
        vocab_size=32064, tokenizer_size=32002, max_positions=4096, rope_theta=10000.0),
    # llava-hf/llava-v1.6-mistral-7b-hf: text_config = Mistral-7B-Instruct-v0.2 (GQA 32/8 heads,
    # rope_theta 1e6, no sliding window), anyres image_grid_pinpoints as in its config.json
    "llava-next-mistral-7b": Geometry(
        checkpoint="llava-hf/llava-v1.6-mistral-7b-hf", family="llava_next", text_model="mistral",
        n_layers=32, n_heads=32, n_kv_heads=8, hidden_size=4096, intermediate_size=14336,
        vocab_size=32064, tokenizer_size=32002, max_positions=32768, rope_theta=1000000.0,
        pinpoints=NEXT_PINPOINTS),
}


def padded_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """The toy word tokenizer padded with filler words (``w00000``...) to exactly ``size`` entries."""
    n_base = len(dict.fromkeys((*SPECIAL_TOKENS, *BASE_WORDS)))
    if size < n_base:
        raise LlavaLensError(f"a tokenizer of {size} entries cannot hold the {n_base} base words")
    tok = word_tokenizer((*BASE_WORDS, *(f"w{i:05d}" for i in range(size - n_base))))
    assert len(tok) == size, (len(tok), size)
    return tok


def _text_config(geo: Geometry, n_layers: int, width: int, tokenizer: PreTrainedTokenizerFast):
    d_model = geo.n_heads * width
    common = dict(
        vocab_size=geo.vocab_size, hidden_size=d_model, head_dim=width,
        intermediate_size=round(d_model * geo.intermediate_size / geo.hidden_size),
        num_hidden_layers=n_layers, num_attention_heads=geo.n_heads, num_key_value_heads=geo.n_kv_heads,
        max_position_embeddings=geo.max_positions, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": geo.rope_theta},
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    if geo.text_model == "mistral":
        return MistralConfig(**common, sliding_window=None)
    return LlamaConfig(**common)


def _image_processor(geo: Geometry):
    size = {"shortest_edge": geo.image_size}
    crop = {"height": geo.image_size, "width": geo.image_size}
    mean, std = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    if geo.family == "llava":
        return CLIPImageProcessor(size=size, crop_size=crop, image_mean=mean, image_std=std)
    return LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=[list(p) for p in geo.pinpoints],
                                   image_mean=mean, image_std=std)


def build_real_geometry(
    path: str | Path,
    name: str,
    n_layers: Optional[int] = None,
    width: int = 8,
    seed: int = 0,
    vision_layers: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a random-init model directory with the real geometry of checkpoint ``name`` to ``path``.

    ``name`` is a key of :data:`GEOMETRIES` (``"llava-1.5-7b"``, ``"llava-1.5-13b"``,
    ``"llava-next-mistral-7b"``). ``n_layers`` / ``vision_layers`` reduce the LM / ViT depth
    (``None``: the checkpoint's); ``width`` is the per-head width of both towers, so the LM's
    d_model is ``heads x width`` (256 for 32 heads) and the ViT's 16 x ``width``. Returns ``path``.
    """
    if name not in GEOMETRIES:
        raise LlavaLensError(f"unknown geometry {name!r}; expected one of {', '.join(GEOMETRIES)}")
    geo = GEOMETRIES[name]
    vision_layers = vision_layers or geo.vision_layers
    if vision_layers < -geo.vision_feature_layer:
        raise LlavaLensError(f"vision_layers={vision_layers} is too shallow for vision_feature_layer "
                             f"{geo.vision_feature_layer}")
    tokenizer = padded_tokenizer(geo.tokenizer_size)
    vision = _vision_config(geo.image_size, geo.patch_size, geo.vision_heads * width, vision_layers,
                            geo.vision_heads)
    text = _text_config(geo, n_layers or geo.n_layers, width, tokenizer)
    features = dict(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                    vision_feature_layer=geo.vision_feature_layer, vision_feature_select_strategy="default")
    processor_args = dict(image_processor=_image_processor(geo), tokenizer=tokenizer, patch_size=geo.patch_size,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          num_additional_image_tokens=1)
    torch.manual_seed(seed)
    if geo.family == "llava":
        model = LlavaForConditionalGeneration(LlavaConfig(**features))
        processor = LlavaProcessor(**processor_args)
    else:
        config = LlavaNextConfig(**features, image_grid_pinpoints=[list(p) for p in geo.pinpoints])
        model = LlavaNextForConditionalGeneration(config)
        processor = LlavaNextProcessor(**processor_args)
    out = Path(path)
    model.to(dtype).eval().save_pretrained(out)
    processor.save_pretrained(out)
    return out
