"""Build small LLaVA model directories from scratch: word-level tokenizer, processor, random weights.

Used by the tests (tiny random configs), the benchmarks (real-shaped random configs) and the
embedded toy model (which trains what this builds). Everything is saved with plain
``save_pretrained`` so it loads through the same code path as ``llava-hf/llava-1.5-7b-hf``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")

# The LLaVA-1.5 conversation format ("USER: <image>\n... ASSISTANT:"), as a Jinja chat template
# so that `processor.apply_chat_template` builds it exactly as it does for llava-hf checkpoints.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Lower case: the tokenizer lower-cases its input (so "USER:" of the prompt is "user" here, at the id
# "USER" had before the normaliser existed).
BASE_WORDS = (
    "user : assistant . , ? ! the a an is are what which how many of in on at to and or "
    "color colour shape object objects there yes no left right top bottom image describe "
    "red green blue yellow purple orange white black gray pink cyan brown "
    "circle square triangle star diamond cross hexagon heart one two three four five"
).split()


def word_tokenizer(words: Sequence[str] = BASE_WORDS) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with LLaVA's special tokens (``<s>``, ``</s>``, ``<image>``...).

    Text is lower-cased (a ``Lowercase`` normaliser, as uncased tokenizers do) and split on
    whitespace and punctuation, so "What color is the square?" and "what color is the square ?"
    give the same ids; unknown words map to ``<unk>``. Special tokens are matched before the
    normaliser runs, so ``<image>`` stays one token.
    """
    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, *words):
        vocab.setdefault(tok, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.add_bos_token = True
    return tok


def _vision_config(image_size: int, patch_size: int, width: int, layers: int, heads: int):
    return CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=width,
    )


def _text_config(vocab_size: int, d_model: int, layers: int, heads: int, kv_heads: int | None):
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=d_model * 2 + d_model // 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


@dataclass(frozen=True)
class ModelSizes:
    """Geometry of a built LLaVA; the defaults are a tiny model for unit tests.

    ``image_size`` and ``patch_size`` in pixels (``(image_size // patch_size) ** 2`` image tokens);
    the CLIP vision tower's width, layers and heads; the Llama language model's ``d_model``, layers,
    heads and key/value heads (``None``: as many as ``n_heads``, no grouped-query attention).
    """

    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None


def build_llava(
    out_dir: str | Path,
    family: Literal["llava", "llava_next"] = "llava",
    *,
    tokenizer: PreTrainedTokenizerFast | None = None,
    sizes: ModelSizes = ModelSizes(),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    save: bool = True,
) -> LlavaForConditionalGeneration | LlavaNextForConditionalGeneration:
    """Build a randomly initialised LLaVA-1.5 (``family="llava"``) or LLaVA-NeXT model of ``sizes``.

    The model directory (weights as safetensors, config naming its architecture, tokenizer,
    image processor and processor with chat template) is written to ``out_dir`` when ``save``.
    The default sizes are a tiny model suitable for unit tests; pass real sizes for benchmarks.
    """
    tokenizer = tokenizer or word_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    image_size, patch_size = sizes.image_size, sizes.patch_size
    vision = _vision_config(image_size, patch_size, sizes.vision_width, sizes.vision_layers, sizes.vision_heads)
    text = _text_config(len(tokenizer), sizes.d_model, sizes.n_layers, sizes.n_heads, sizes.n_kv_heads)
    torch.manual_seed(seed)
    mean, std = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    if family == "llava":
        config = LlavaConfig(
            vision_config=vision, text_config=text, image_token_id=image_token_id,
            vision_feature_layer=-2, vision_feature_select_strategy="default",
        )
        model = LlavaForConditionalGeneration(config)
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_mean=mean, image_std=std,
        )
        processor = LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
            vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
            num_additional_image_tokens=1,
        )
    elif family == "llava_next":
        pinpoints = [[image_size, image_size * 2], [image_size * 2, image_size],
                     [image_size * 2, image_size * 2]]
        config = LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_id=image_token_id,
            vision_feature_layer=-2, vision_feature_select_strategy="default",
            image_grid_pinpoints=pinpoints,
        )
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=pinpoints, image_mean=mean, image_std=std,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
            vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
            num_additional_image_tokens=1,
        )
    else:
        raise ValueError(f"unknown LLaVA family {family!r}; expected 'llava' or 'llava_next'")
    model = model.to(dtype).eval()
    if save:
        out = Path(out_dir)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return model
