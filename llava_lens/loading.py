"""Load a LLaVA model and its processor into a TransformerLens bridge: :func:`load`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities.multi_gpu import resolve_device_map
from transformers import AutoConfig, AutoProcessor

from llava_lens.errors import UnsupportedModelError
from llava_lens.families import family_for
from llava_lens.model import LlavaLens

EMBEDDED_MODELS = {"shapes-tiny": Path(__file__).parent / "toy" / "shapes-tiny"}
DEFAULT_MODEL = "shapes-tiny"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def default_device_dtype(device: Optional[str], dtype: Optional[torch.dtype]) -> tuple[str, torch.dtype]:
    """CUDA + bf16 when a GPU is present, else CPU + fp32; explicit arguments win."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return device, dtype


def _resolve_source(path_or_id: Optional[str]) -> str:
    name = path_or_id or DEFAULT_MODEL
    if name in EMBEDDED_MODELS:
        path = EMBEDDED_MODELS[name]
        if not (path / "config.json").is_file():
            raise UnsupportedModelError(f"the embedded model {name!r} is not installed at {path}")
        return str(path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UnsupportedModelError(f"{path} is not a model directory (no config.json)")
        return str(path)
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return name  # a hub id: transformers downloads (or reads its cache)
    raise UnsupportedModelError(f"model not found: {name!r} is neither a directory nor a hub id (org/name)")


def _load_config(source: str) -> Any:
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UnsupportedModelError(f"cannot load the config of {source!r}: {str(err).splitlines()[0]}") from None


def _load_processor(source: str) -> Any:
    try:
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UnsupportedModelError(
            f"cannot load the processor/tokenizer of {source!r}: {str(err).splitlines()[0]}") from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise UnsupportedModelError(
            f"{source!r} has no LLaVA processor (image processor + tokenizer files); "
            "save one with processor.save_pretrained(dir)")
    return processor


def load(path_or_id: Optional[str] = None, device: Optional[str] = None,
         dtype: Optional[torch.dtype] = None, **boot_kwargs: Any) -> LlavaLens:
    """Load a LLaVA-1.5 or LLaVA-NeXT model and its processor into a TransformerLens bridge.

    ``path_or_id`` is a local model directory, a Hugging Face hub id (e.g.
    ``"llava-hf/llava-1.5-7b-hf"``) or an embedded model name; ``None`` loads the embedded
    ``shapes-tiny`` model. ``device``/``dtype`` default to CUDA + bf16 when available, else CPU +
    fp32. ``device_map`` (e.g. ``"auto"``) or ``n_devices=K`` shard a model too large for one GPU
    (HF dispatches it at load time); other keyword arguments go to
    ``TransformerBridge.boot_transformers``.
    """
    source = _resolve_source(path_or_id)
    config = _load_config(source)
    family = family_for(config)
    processor = _load_processor(source)
    device_map = boot_kwargs.pop("device_map", None)
    n_devices = boot_kwargs.pop("n_devices", None)
    if device_map is not None or (n_devices or 1) > 1:
        # A model sharded over devices is dispatched by HF at load time; the bridge then wraps it
        # as it is (it refuses device_map together with a pre-loaded hf_model).
        device_map, max_memory = resolve_device_map(n_devices, device_map, None, boot_kwargs.pop("max_memory", None))
        dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        hf_model = family.hf_class.from_pretrained(source, dtype=dtype, device_map=device_map, max_memory=max_memory)
    else:
        device, dtype = default_device_dtype(device, dtype)
        hf_model = family.hf_class.from_pretrained(source, dtype=dtype).to(device)
        boot_kwargs["device"] = device
    bridge = TransformerBridge.boot_transformers(
        source, hf_model=hf_model.eval(), dtype=dtype, tokenizer=processor.tokenizer, **boot_kwargs)
    return LlavaLens(bridge, processor, family, name=path_or_id or DEFAULT_MODEL)


