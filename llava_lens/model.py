"""A LLaVA model in a TransformerLens bridge: :class:`LlavaLens` (made by :func:`llava_lens.load`)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

from transformer_lens.model_bridge import TransformerBridge

from llava_lens import fastpath
from llava_lens.bridgepath import BridgeForward
from llava_lens.engine import Engine, Prepared, Row
from llava_lens.families import Family, VisionSpan
from llava_lens.inputs import ImageLike, ModelInputs, prepare
from llava_lens.options import GenerateOptions
from llava_lens.tokens import token_strings
from llava_lens.trace import ModelInfo, Step, Trace


def _length(max_new_tokens: Optional[int]) -> dict[str, int]:
    return {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}


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
        self.forward_lock = threading.RLock()
        """Serialises forwards: the fast path swaps the model's modules for the length of one."""
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

    def step(self, image: ImageLike, question: str, max_new_tokens: Optional[int] = None, *,
             options: Optional[GenerateOptions] = None,
             **kwargs: Any) -> Iterator[Step]:
        """Generate token by token, yielding a :class:`Step` (with its activations) per token.

        Same options as :meth:`trace`. Break out of the loop any time: no hook stays attached.
        """
        options = GenerateOptions.build(options, **_length(max_new_tokens), **kwargs)
        for rows in Engine(self, [self._prepared(image, question)], options).steps():
            yield rows[0].steps[-1]

    def trace(self, image: ImageLike, question: str, max_new_tokens: Optional[int] = None, *,
              options: Optional[GenerateOptions] = None,
              **kwargs: Any) -> Trace:
        """Generate an answer to ``question`` about ``image`` and record every step.

        ``image`` is a path, bytes, a PIL image or an array (converted to RGB); ``question`` the
        bare question (the model's chat format is applied).

        Options (keyword arguments, or ``options=GenerateOptions(...)``; see :mod:`llava_lens.options`):
            max_new_tokens: stop after this many tokens (also at EOS, a stop string, or the model's
                context length). Default 32.
            capture: extra hooks to record at each step's new position, as a TransformerLens
                names filter (a name, a list of names, or a predicate on names).
            default_capture: record attention rows and residual streams (``Step.attention``,
                ``Step.resid``); turn off to record only ``capture``.
            prefill_cache: ``True``/``"views"`` keeps the :class:`~llava_lens.trace.PrefillSummary`
                the views need (sized for real models); a names filter (``"all"``, a list, a
                predicate) keeps those full-sequence activations in ``Trace.prefill`` (large:
                every LM attention pattern of LLaVA-1.5-7B is 2 GB).
            layers: LM layers whose prefill attention rows the summary keeps (default: 8 spread).
            dtype / attention_dtype: stored dtypes (default float32 / float16).
            top_k: next-token candidates each Step keeps; keep_logits: keep the full logits.
            stop_strings: stop once the decoded answer contains one of these.
            fast: allow the fast path (HF modules + sdpa; see :mod:`llava_lens.fastpath`) when only
                the default capture is asked and no hook is attached; else every hook fires.
            do_sample, temperature, top_p, sample_top_k, seed: sampling (greedy by default; any
                of them turns sampling on).
        """
        return self.trace_batch([image], [question], options=options, **_length(max_new_tokens), **kwargs)[0]

    def trace_batch(self, images: Sequence[ImageLike], questions: Union[str, Sequence[str]], *,
                    options: Optional[GenerateOptions] = None, **kwargs: Any) -> list[Trace]:
        """:meth:`trace` for several examples at once: one left-padded batch per forward pass.

        ``questions`` is one question per image, or one string for all. Each returned
        :class:`Trace` equals ``trace(image, question)`` of its example (up to float rounding),
        with the same options. See :mod:`llava_lens.engine`.
        """
        options = GenerateOptions.build(options, **kwargs)
        questions = [questions] * len(images) if isinstance(questions, str) else list(questions)
        if len(questions) != len(images):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        return self.trace_prepared([self._prepared(image, q) for image, q in zip(images, questions)], options)

    def trace_prepared(self, prepared: Sequence[Prepared], options: GenerateOptions) -> list[Trace]:
        """Traces of examples already prepared (``Prepared(*lens.prepare(image, q), q)``), as one batch.

        For callers that prepare examples one by one to catch a bad input per example (sweeps).
        """
        if not prepared:
            return []
        engine = Engine(self, prepared, options)
        for _ in engine.steps():
            pass
        return [self._trace(row) for row in engine.rows]

    def _prepared(self, image: ImageLike, question: str) -> Prepared:
        return Prepared(*self.prepare(image, question), question)

    def _trace(self, row: Row) -> Trace:
        """The :class:`Trace` of one engine row."""
        inputs = row.prepared.inputs
        ids = inputs.input_ids[0].cpu()
        return Trace(
            steps=row.steps, vision_span=row.prepared.span, prompt_ids=ids,
            prompt_tokens=token_strings(self.tokenizer, ids.tolist()), question=row.prepared.question,
            prompt=inputs.prompt, image=inputs.image, model_name=self.name, info=self.info(),
            text=self.tokenizer.decode([s.token_id for s in row.steps], skip_special_tokens=True),
            stop_reason=row.stop or "max_new_tokens", prefill=row.prefill, summary=row.summary,
        )

    @functools.cached_property
    def fast_forward(self) -> Optional[fastpath.FastForward]:
        """The fast-path forward of this model (None when its text tower is not supported).

        Built once: it walks every module of the model and every hook point of the bridge.
        """
        return fastpath.FastForward(self) if fastpath.supported(self) else None

    @functools.cached_property
    def bridge_forward(self) -> BridgeForward:
        """The bridge-path forward of this model (every TransformerLens hook fires)."""
        return BridgeForward(self)

    def info(self) -> ModelInfo:
        """Sizes and names the views need, stored in each :class:`Trace` as ``trace.info``."""
        return ModelInfo(
            family=self.family.name, n_layers=self.n_layers, n_heads=self.n_heads,
            d_model=self.d_model, d_vocab=self.d_vocab, **self.family.vision_info(self.config),
            n_ctx=getattr(self.config.text_config, "max_position_embeddings", 0) or 0,
        )
