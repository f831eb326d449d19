"""The data everything downstream reads: a :class:`Trace` of generation :class:`Step` s.

A Trace is plain data (tensors on CPU, strings, the image); views and analyses are pure
functions of it. It saves to a directory as ``trace.safetensors`` + ``trace.json`` +
``image.png`` and loads back without pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llava_lens.errors import LlavaLensError
from llava_lens.families import VisionSpan

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 stored ModelInfo's fields as a ``config`` dict


@dataclass(frozen=True)
class ModelInfo:
    """What views and analyses need to know about the model a trace came from (read from its config)."""

    family: str
    n_layers: int
    n_heads: int
    d_model: int
    d_vocab: int
    """Output ids of the unembedding (may exceed the tokenizer's entries, e.g. 32064 vs 32002)."""
    vision_layers: int
    vision_heads: int
    vision_image_size: int
    vision_patch_size: int
    vision_feature_layer: Any
    """An int or a list of ints: ViT ``hidden_states`` index(es) the projector reads (CLIP-style)."""
    vision_feature_select_strategy: str
    n_ctx: int = 0
    """Maximum sequence length (``max_position_embeddings``); 0 when unknown."""

    @property
    def vit_layers_used(self) -> list[int]:
        """ViT layers whose output feeds the projector: ``hidden_states[k]`` is layer ``k - 1``'s output."""
        layers = self.vision_feature_layer
        layers = layers if isinstance(layers, (list, tuple)) else [layers]
        last = max(f if f >= 0 else self.vision_layers + 1 + f for f in layers)
        return list(range(last))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        """Inverse of :meth:`to_dict` (unknown keys, e.g. from later versions, are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Step:
    """One generated token and what the model computed to produce it.

    The activations are those of the *query position that produced the token*: for step 0 the
    last prompt position (from the prefill), for step ``i > 0`` the position of token ``i - 1``.
    That position attends over ``n_keys = prompt_len + index`` keys.
    """

    index: int
    """0-based generation step."""
    token_id: int
    token: str
    """The token as the tokenizer spells it (e.g. ``"▁red"``); ``Trace.text`` is the decoded answer."""
    position: int
    """Sequence position of the query that produced this token (``prompt_len - 1 + index``)."""
    logits: Optional[torch.Tensor]
    """``[d_vocab]`` final logits, or None when only top-k was kept."""
    top_ids: torch.Tensor
    """``[k]`` ids of the k most likely next tokens (k = ``top_k`` of the trace call)."""
    top_logits: torch.Tensor
    """``[k]`` their logits."""
    attention: Optional[torch.Tensor] = None
    """``[n_layers, n_heads, n_keys]``: the attention row of this query in every layer and head."""
    resid: Optional[torch.Tensor] = None
    """``[n_layers + 1, d_model]``: residual stream entering each block, then after the last
    (``hooks.resid_stack``); ``2 * n_layers + 1`` rows, each block's ``hook_resid_mid`` after its
    ``hook_resid_pre``, when traced with ``mid=True``."""
    cache: dict[str, torch.Tensor] = field(default_factory=dict)
    """Other captured hooks (TransformerLens names), batch dim dropped, this position only."""

    @property
    def top_probs(self) -> torch.Tensor:
        """``[k]`` probabilities of ``top_ids`` (needs the full ``logits``: ``keep_logits=True``)."""
        if self.logits is None:
            raise ValueError("top_probs needs the full logits; trace with keep_logits=True")
        return self.logits.float().softmax(-1)[self.top_ids]

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors of this step keyed for safetensors."""
        out = {f"{prefix}top_ids": self.top_ids, f"{prefix}top_logits": self.top_logits}
        for name in ("logits", "attention", "resid"):
            value = getattr(self, name)
            if value is not None:
                out[prefix + name] = value
        out.update({f"{prefix}cache.{k}": v for k, v in self.cache.items()})
        return out

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str) -> Step:
        """Inverse of :meth:`to_tensors` (``meta`` holds the scalar fields)."""
        cache_prefix = prefix + "cache."
        cache = {k[len(cache_prefix):]: v for k, v in tensors.items() if k.startswith(cache_prefix)}
        return cls(**meta, logits=tensors.get(prefix + "logits"), top_ids=tensors[prefix + "top_ids"],
                   top_logits=tensors[prefix + "top_logits"], attention=tensors.get(prefix + "attention"),
                   resid=tensors.get(prefix + "resid"), cache=cache)


@dataclass
class PrefillSummary:
    """What the views read from the prefill, sized for real models (``Capture(prefill="views")``).

    ``Q`` = text (non-image) prompt positions, ``T`` = prompt length, ``Ls`` = ``len(layers)``,
    ``V`` = ``len(vit_layers)``, ``P`` = vision-encoder tokens of one tile (CLS + patches),
    ``L + 1`` = logit-lens rows, ``k`` = top-k. Bytes: ``Ls*H*Q*T`` + ``V*P*P`` attention values
    (fp16 by default) + ``(L+1)*T*k`` ids and probabilities + ``(L+1)*T`` norms, against
    ``L*H*T*T`` for full patterns and ``(L+1)*T*d_model`` for full residual streams.
    """

    text_positions: torch.Tensor
    """``[Q]`` long: prompt positions of the text queries whose attention rows are kept."""
    layers: list[int]
    """LM layers of ``attention``."""
    attention: torch.Tensor
    """``[Ls, H, Q, T]``: attention rows of the text queries over every prompt key."""
    vit_layers: list[int] = field(default_factory=list)
    """Vision-encoder layers of ``vit_attention`` (those feeding the projector)."""
    vit_attention: Optional[torch.Tensor] = None
    """``[V, P, P]``: the vision encoder's attention, mean over heads, of the base (whole-image) tile."""
    lens_top_ids: Optional[torch.Tensor] = None
    """``[L + 1, T, k]`` long: logit-lens top-k tokens at every prompt position (rows as ``Step.resid``)."""
    lens_top_probs: Optional[torch.Tensor] = None
    """``[L + 1, T, k]``: their probabilities."""
    resid_norms: Optional[torch.Tensor] = None
    """``[L + 1, T]``: L2 norm of the residual stream at every prompt position (massive activations, sinks)."""

    TENSORS = ("text_positions", "attention", "vit_attention", "lens_top_ids", "lens_top_probs", "resid_norms")

    def rows(self, layer: int) -> Optional[torch.Tensor]:
        """``[H, Q, T]`` rows of ``layer``, or None when that layer was not kept."""
        return self.attention[self.layers.index(layer)] if layer in self.layers else None

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors keyed for safetensors."""
        return {prefix + k: getattr(self, k) for k in self.TENSORS if getattr(self, k) is not None}

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str) -> PrefillSummary:
        """Inverse of :meth:`to_tensors` (``meta`` holds the layer lists)."""
        return cls(layers=meta["layers"], vit_layers=meta["vit_layers"],
                   **{k: tensors.get(prefix + k) for k in cls.TENSORS})


@dataclass
class Trace:
    """A whole generation: prompt, image layout, and one :class:`Step` per generated token."""

    steps: list[Step]
    vision_span: VisionSpan
    prompt_ids: torch.Tensor
    """``[prompt_len]`` token ids of the prompt, image placeholders expanded."""
    prompt_tokens: list[str]
    question: str
    prompt: str
    """The prompt text given to the processor (chat template applied)."""
    text: str
    """The generated answer, decoded."""
    image: Image.Image
    model_name: str
    info: ModelInfo
    """Sizes and names of the model (layers, heads, vocabulary, vision encoder...)."""
    stop_reason: str = "max_new_tokens"
    """Why generation stopped: ``"eos"``, ``"stop_string"`` or ``"max_new_tokens"``."""
    prefill: dict[str, torch.Tensor] = field(default_factory=dict)
    """Full-sequence prefill activations (batch dim dropped) of the hooks named by ``prefill_cache``."""
    summary: Optional[PrefillSummary] = None
    """The prefill summary the views read (``prefill_cache=True``, the CLI's default)."""

    @property
    def token_ids(self) -> list[int]:
        """Generated token ids, in order."""
        return [s.token_id for s in self.steps]

    @property
    def tokens(self) -> list[str]:
        """Generated tokens as the tokenizer spells them."""
        return [s.token for s in self.steps]

    @property
    def all_tokens(self) -> list[str]:
        """Prompt tokens followed by generated tokens: the labels of every key position."""
        return self.prompt_tokens + self.tokens

    def __len__(self) -> int:
        return len(self.steps)

    def save(self, directory: str | Path) -> Path:
        """Write ``trace.safetensors``, ``trace.json`` and ``image.png`` into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"prompt_ids": self.prompt_ids}
        for step in self.steps:
            tensors.update(step.to_tensors(f"steps.{step.index}."))
        tensors.update({f"prefill.{k}": v for k, v in self.prefill.items()})
        if self.summary is not None:
            tensors.update(self.summary.to_tensors("summary."))
        tensors, aliases = _dedupe(tensors)
        save_file(tensors, out / "trace.safetensors")
        meta = {
            "format_version": FORMAT_VERSION, "question": self.question, "prompt": self.prompt,
            "text": self.text, "model_name": self.model_name, "info": self.info.to_dict(),
            "stop_reason": self.stop_reason, "prompt_tokens": self.prompt_tokens,
            "vision_span": self.vision_span.to_dict(), "aliases": aliases,
            "summary": None if self.summary is None else {"layers": self.summary.layers,
                                                           "vit_layers": self.summary.vit_layers},
            "steps": [{"index": s.index, "token_id": s.token_id, "token": s.token, "position": s.position}
                      for s in self.steps],
        }
        (out / "trace.json").write_text(json.dumps(meta, indent=1))
        self.image.save(out / "image.png")
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Trace:
        """Load a trace written by :meth:`save` (safetensors + JSON; no pickle).

        Raises :class:`~llava_lens.LlavaLensError` with one line when the files are missing,
        corrupt, of another format version, or inconsistent with each other.
        """
        d = Path(directory)
        if not (d / "trace.json").is_file() or not (d / "trace.safetensors").is_file():
            raise LlavaLensError(f"no saved trace in {d} (expected trace.json and trace.safetensors)")
        try:
            meta = json.loads((d / "trace.json").read_text(encoding="utf-8"))
            tensors = load_file(d / "trace.safetensors")
        except (OSError, ValueError, SafetensorError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise LlavaLensError(f"corrupt trace in {d}: {(str(err).splitlines() or [repr(err)])[0]}") from None
        if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_VERSIONS:
            version = meta.get("format_version") if isinstance(meta, dict) else None
            raise LlavaLensError(f"trace in {d} has format {version!r}, this llava-lens reads {READABLE_VERSIONS}")
        try:
            trace = cls._from_saved(meta, tensors, d)
        except (KeyError, TypeError, ValueError, IndexError, OSError) as err:
            raise LlavaLensError(f"corrupt trace in {d}: bad or missing field {err}") from None
        trace.validate(where=str(d))
        return trace

    @classmethod
    def _from_saved(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], d: Path) -> Trace:
        tensors.update({alias: tensors[key] for alias, key in meta.get("aliases", {}).items()})
        steps = [Step.from_tensors(m, tensors, f"steps.{m['index']}.") for m in meta["steps"]]
        prefill = {k[len("prefill."):]: v for k, v in tensors.items() if k.startswith("prefill.")}
        summary = PrefillSummary.from_tensors(meta["summary"], tensors, "summary.") if meta.get("summary") else None
        with Image.open(d / "image.png") as img:
            image = img.convert("RGB")
        return cls(
            steps=steps, vision_span=VisionSpan.from_dict(meta["vision_span"]),
            prompt_ids=tensors["prompt_ids"], prompt_tokens=list(meta["prompt_tokens"]),
            question=str(meta["question"]), prompt=str(meta["prompt"]), text=str(meta["text"]), image=image,
            model_name=str(meta["model_name"]), info=ModelInfo.from_dict(meta.get("info") or meta["config"]),
            stop_reason=str(meta["stop_reason"]), prefill=prefill, summary=summary,
        )

    def validate(self, where: str = "trace") -> None:
        """Check the parts agree (shapes, positions, token counts); one-line error naming the first problem."""
        n = len(self.prompt_ids)
        problems = []
        if len(self.prompt_tokens) != n:
            problems.append(f"{len(self.prompt_tokens)} prompt tokens for {n} prompt ids")
        if len(self.vision_span) and int(self.vision_span.positions.max()) >= n:
            problems.append("image positions beyond the prompt")
        for i, step in enumerate(self.steps):
            if step.index != i or step.position != n - 1 + i:
                problems.append(f"step {i} has index {step.index} and position {step.position}")
            elif step.attention is not None and tuple(step.attention.shape) != (
                    self.info.n_layers, self.info.n_heads, n + i):
                problems.append(f"step {i} attention has shape {tuple(step.attention.shape)}, expected "
                                f"{(self.info.n_layers, self.info.n_heads, n + i)}")
            elif step.resid is not None and step.resid.shape[0] not in (self.info.n_layers + 1,
                                                                          2 * self.info.n_layers + 1):
                problems.append(f"step {i} residual has {step.resid.shape[0]} rows for {self.info.n_layers} layers")
            if problems:
                break
        if problems:
            raise LlavaLensError(f"corrupt trace in {where}: {problems[0]}")


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each tensor once; return the unique tensors and an alias -> stored-key map.

    Hook aliases (``hook_resid_pre`` = the previous block's ``hook_out``...) share memory, which
    safetensors refuses.
    """
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, value in tensors.items():
        ident = (value.data_ptr(), value.shape, value.stride(), value.dtype)
        storage = value.untyped_storage().data_ptr()
        if value.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        # a different view of storage already stored (e.g. a slice of it) gets its own copy
        unique[key] = value.clone() if storage in storages else value.contiguous()
        storages.add(storage)
    return unique, aliases
