"""How to generate and what to record: one options object for ``trace``, ``step``, ``trace_batch``, sweeps, CLI.

:class:`GenerateOptions` holds the generation settings, a :class:`Sampling` and a :class:`Capture`.
``GenerateOptions.build(**kwargs)`` accepts the flat keyword arguments of :meth:`LlavaLens.trace`
(``max_new_tokens=``, ``prefill_cache=``, ``temperature=``...) and validates them, so a bad
argument fails with one line before the model runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from llava_lens.defaults import DEFAULT_MAX_NEW_TOKENS, MAX_VIEW_LAYERS, view_layers  # noqa: F401 - re-exported
from llava_lens.hooks import NamesFilter

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _dtype(value: Any, what: str) -> torch.dtype:
    if isinstance(value, str):
        value = getattr(torch, value, None)
    if value not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be a floating dtype (float32, float16, bfloat16), got {value!r}")
    return value


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    Greedy by default. ``do_sample=None`` (the default) samples as soon as ``temperature``,
    ``top_p``, ``top_k`` or ``seed`` is set; ``do_sample=False`` together with one of them is an
    error rather than silently ignoring it.
    """

    do_sample: Optional[bool] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """Top-k *sampling* (0 = off). Not to be confused with ``Capture.top_k``."""
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"sample_top_k must be an integer >= 0, got {self.top_k!r}")
        if self.do_sample is False and self.asks_for_sampling:
            raise ValueError("temperature/top_p/sample_top_k/seed have no effect with do_sample=False")

    @property
    def asks_for_sampling(self) -> bool:
        """Whether any sampling parameter differs from greedy decoding's."""
        return self.temperature != 1.0 or self.top_p != 1.0 or self.top_k > 0 or self.seed is not None

    @property
    def sampling(self) -> bool:
        """True when tokens are sampled, False for greedy decoding."""
        return bool(self.do_sample) or (self.do_sample is None and self.asks_for_sampling)


@dataclass(frozen=True)
class Capture:
    """What a trace records. Sizes (bytes) are in BENCHMARKS.md; ``K`` = keys, ``T`` = prompt length.

    Per step (the query position that produced the token): attention rows
    ``[n_layers, n_heads, K]`` in ``attention_dtype`` and the residual stream
    ``[n_layers + 1, d_model]`` in ``dtype`` (``default``; ``2 * n_layers + 1`` rows with ``mid``),
    plus any hooks named in ``names``.

    Prefill (``prefill``): ``False`` nothing; ``True`` or ``"views"`` a
    :class:`~llava_lens.trace.PrefillSummary` sized for real models (attention rows of the text
    queries for ``layers``, the vision encoder's head-mean attention, the prompt positions' logit
    lens as top-k); a TransformerLens names filter (e.g. ``"all"`` or a list of hook names) keeps
    those full-sequence activations in ``Trace.prefill`` — ``blocks.L.attn.hook_pattern`` alone is
    ``n_layers * n_heads * T^2`` floats, 2 GB on LLaVA-1.5-7B.
    """

    default: bool = True
    names: NamesFilter = None
    prefill: Union[bool, str, NamesFilter] = False
    layers: Optional[tuple[int, ...]] = None
    """LM layers whose prefill attention rows the summary keeps (default: :func:`view_layers`)."""
    dtype: torch.dtype = torch.float32
    """Stored dtype of residuals, logits and extra captures."""
    attention_dtype: torch.dtype = torch.float16
    """Stored dtype of attention rows (probabilities: fp16 keeps ~3 significant digits; see BENCHMARKS.md)."""
    top_k: int = 20
    """Next-token candidates each Step keeps."""
    keep_logits: bool = True
    mid: bool = False
    """Also record each block's ``hook_resid_mid`` in ``Step.resid`` (``2 * n_layers + 1`` rows)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _dtype(self.dtype, "dtype"))
        object.__setattr__(self, "attention_dtype", _dtype(self.attention_dtype, "attention_dtype"))
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))

    @property
    def summary(self) -> bool:
        """Whether the prefill summary is recorded."""
        return self.prefill is True or self.prefill == "views"

    @property
    def raw_prefill(self) -> NamesFilter:
        """The names filter of full prefill activations, or None."""
        if self.prefill is False or self.prefill is None or self.summary:
            return None
        return (lambda name: True) if self.prefill == "all" else self.prefill

    @property
    def only_default(self) -> bool:
        """True when nothing beyond the default per-step capture and the summary is asked (the fast path)."""
        return self.default and self.names is None and self.raw_prefill is None


@dataclass(frozen=True)
class GenerateOptions:
    """Generation settings: length, stop conditions, sampling, capture, and which forward to use."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop_strings: tuple[str, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    capture: Capture = field(default_factory=Capture)
    fast: bool = True
    """Use the fast path (HF modules + sdpa) when only the default capture is asked and no hook is attached."""

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {n!r}")
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))

    @classmethod
    def build(cls, options: Optional[GenerateOptions] = None, **kwargs: Any) -> GenerateOptions:
        """Options from flat keyword arguments (those of :meth:`LlavaLens.trace`), over ``options``.

        ``capture`` is the per-step names filter, ``prefill_cache`` the prefill choice,
        ``default_capture``/``dtype``/``attention_dtype``/``top_k``/``keep_logits``/``layers`` go to
        :class:`Capture`; ``do_sample``/``temperature``/``top_p``/``sample_top_k``/``seed`` to
        :class:`Sampling`. Unknown names are an error.
        """
        base = options or cls()
        renames = {"capture": "names", "prefill_cache": "prefill", "default_capture": "default"}
        capture_fields = {f.name for f in dataclasses.fields(Capture)}
        sampling = {k: kwargs.pop(k) for k in ("do_sample", "temperature", "top_p", "seed") if k in kwargs}
        if "sample_top_k" in kwargs:
            sampling["top_k"] = kwargs.pop("sample_top_k")
        capture = {renames.get(k, k): kwargs.pop(k) for k in list(kwargs)
                   if renames.get(k, k) in capture_fields and k not in ("names", "prefill", "default")}
        own = {f.name for f in dataclasses.fields(cls)} - {"sampling", "capture"}
        unknown = sorted(set(kwargs) - own)
        if unknown:
            raise TypeError(f"unknown option {unknown[0]!r}")
        if "stop_strings" in kwargs and isinstance(kwargs["stop_strings"], str):
            kwargs["stop_strings"] = (kwargs["stop_strings"],)
        return dataclasses.replace(
            base, **kwargs,
            sampling=dataclasses.replace(base.sampling, **sampling) if sampling else base.sampling,
            capture=dataclasses.replace(base.capture, **capture) if capture else base.capture,
        )
