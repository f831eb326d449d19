"""A LLaVA model in a TransformerLens bridge: :class:`LlavaLens` (made by :func:`llava_lens.load`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Union

import torch
from transformer_lens.model_bridge import TransformerBridge

from llava_lens.batch import Prepared, trace_one, trace_prepared
from llava_lens.families import Family, VisionSpan
from llava_lens.inputs import ImageLike, ModelInputs, prepare
from llava_lens.trace import ModelInfo, Step, Trace
from llava_lens.tracer import NamesFilter, Sampling, generate_steps


def _sampling(options: dict[str, Any]) -> Sampling:
    """Sampling options of ``trace``/``step``; ``sample_top_k`` (``top_k`` is the kept top-k)."""
    options = dict(options)
    if "sample_top_k" in options:
        options["top_k"] = options.pop("sample_top_k")
    return Sampling(**options)



class LlavaLens:
    """A LLaVA model in a TransformerLens bridge, with its processor: trace and step generation.

    Attributes: ``bridge`` (the ``TransformerBridge``), ``hf_model``, ``processor``,
    ``tokenizer``, ``family`` (the model-family adapter), ``n_layers``, ``n_heads``, ``d_model``.
    """

    def __init__(self, bridge: TransformerBridge, processor: Any, family: Family, name: str = ""):
        self.bridge = bridge
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.family = family
        self.name = name
        self.hf_model = bridge.original_model
        self.config = self.hf_model.config
        text = self.config.text_config
        self.n_layers = text.num_hidden_layers
        self.n_heads = text.num_attention_heads
        self.d_model = text.hidden_size
        self.d_vocab = text.vocab_size
        first = next(self.hf_model.parameters())
        self.device, self.dtype = first.device, first.dtype
        eos = self.hf_model.generation_config.eos_token_id
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos_token_ids = {int(e) for e in eos if e is not None} | {self.tokenizer.eos_token_id}

    def __repr__(self) -> str:
        return (f"LlavaLens({self.name!r}, {self.family.name}, layers={self.n_layers}, "
                f"heads={self.n_heads}, d_model={self.d_model}, device={self.device}, dtype={self.dtype})")

    def prepare(self, image: ImageLike, question: str) -> tuple[ModelInputs, VisionSpan]:
        """Processor inputs and the :class:`VisionSpan` for one image and question."""
        inputs = prepare(self.processor, image, question)
        span = self.family.vision_span(inputs.input_ids, inputs.extra, (inputs.image.height, inputs.image.width),
                                       self.config, self.processor)
        return inputs, span

    def step(self, image: ImageLike, question: str, max_new_tokens: int = 32, *,
             capture: NamesFilter = None, default_capture: bool = True, dtype: torch.dtype = torch.float32,
             top_k: int = 20, keep_logits: bool = True, stop_strings: Sequence[str] = (),
             fast: bool = True, **sampling: Any) -> Iterator[Step]:
        """Generate token by token, yielding a :class:`Step` (with its activations) per token.

        Same arguments as :meth:`trace`, without ``prefill_cache``. Break out of the loop any time.
        """
        inputs, _ = self.prepare(image, question)
        yield from generate_steps(
            self, inputs, max_new_tokens=max_new_tokens, sampling=_sampling(sampling),
            stop_strings=stop_strings, capture=capture, default_capture=default_capture,
            dtype=dtype, top_k=top_k, keep_logits=keep_logits, fast=fast)

    def trace(self, image: ImageLike, question: str, max_new_tokens: int = 32, *,
              capture: NamesFilter = None, default_capture: bool = True,
              prefill_cache: Union[bool, NamesFilter] = False, dtype: torch.dtype = torch.float32,
              top_k: int = 20, keep_logits: bool = True, stop_strings: Sequence[str] = (),
              fast: bool = True, **sampling: Any) -> Trace:
        """Generate an answer to ``question`` about ``image`` and record every step.

        Args:
            image: path, PIL image or array; converted to RGB.
            question: the bare question; the model's chat format is applied.
            max_new_tokens: stop after this many tokens (also stops at EOS or a stop string).
            capture: extra hooks to record at each step's new position, as a TransformerLens
                names filter (a name, a list of names, or a predicate on names).
            default_capture: record attention rows and residual streams (``Step.attention``,
                ``Step.resid``); turn off to record only ``capture``.
            prefill_cache: also keep the prefill's full-sequence activations in ``Trace.prefill``:
                ``True`` for the attention patterns and residual streams of every layer of the
                vision encoder and of the language model, or a names filter (e.g.
                ``lambda name: True`` for every hook; large on a 7B model).
            dtype: dtype of recorded tensors (they are moved to CPU).
            top_k: how many top next-token candidates each step keeps.
            keep_logits: keep each step's full ``[d_vocab]`` logits.
            stop_strings: stop once the decoded answer contains one of these.
            fast: when only the default capture is asked for and no hooks are attached to the
                bridge, run HF's own modules with sdpa and compute just each step's attention
                row (see :mod:`llava_lens.fastpath`); otherwise, or with ``fast=False``, every
                forward goes through the bridge and every TransformerLens hook fires.
            **sampling: ``do_sample``, ``temperature``, ``top_p``, ``sample_top_k`` (top-k sampling;
                ``top_k`` above is how many candidates a Step keeps) and ``seed``; greedy by default.
        """
        item = Prepared(*self.prepare(image, question), question)
        return trace_one(self, item, max_new_tokens=max_new_tokens, sampling=_sampling(sampling),
                         stop_strings=stop_strings, capture=capture, default_capture=default_capture,
                         prefill_cache=prefill_cache, dtype=dtype, top_k=top_k, keep_logits=keep_logits,
                         fast=fast)

    def trace_batch(self, images: Sequence[ImageLike], questions: Union[str, Sequence[str]],
                    max_new_tokens: int = 32, *, dtype: torch.dtype = torch.float32, top_k: int = 20,
                    keep_logits: bool = True, stop_strings: Sequence[str] = (), **sampling: Any) -> list[Trace]:
        """:meth:`trace` for several examples at once: one left-padded batch per forward pass.

        ``questions`` is one question per image, or one string for all. Each returned
        :class:`Trace` equals ``trace(image, question)`` of its example (up to float rounding).
        Records the default capture only (no ``capture``/``prefill_cache``); when the fast path
        cannot be used (hooks attached to the bridge...), the examples are traced one by one.
        See :mod:`llava_lens.batch`.
        """
        questions = [questions] * len(images) if isinstance(questions, str) else list(questions)
        if len(questions) != len(images):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        prepared = [Prepared(*self.prepare(image, q), q) for image, q in zip(images, questions)]
        return trace_prepared(self, prepared, max_new_tokens=max_new_tokens, sampling=_sampling(sampling),
                              stop_strings=stop_strings, dtype=dtype, top_k=top_k, keep_logits=keep_logits)

    def info(self) -> ModelInfo:
        """Sizes and names the views need, stored in each :class:`Trace` as ``trace.info``."""
        vision = self.config.vision_config
        return ModelInfo(
            family=self.family.name, n_layers=self.n_layers, n_heads=self.n_heads,
            d_model=self.d_model, d_vocab=self.d_vocab,
            vision_layers=vision.num_hidden_layers, vision_heads=vision.num_attention_heads,
            vision_image_size=vision.image_size, vision_patch_size=vision.patch_size,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            n_ctx=getattr(self.config.text_config, "max_position_embeddings", 0) or 0,
        )
