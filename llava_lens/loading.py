"""Load a LLaVA model and its processor into a TransformerLens bridge: :func:`load`.

Loading never runs code or unpickles data from the model's files: ``trust_remote_code=False``
everywhere (a config's ``auto_map`` is ignored; LLaVA's classes come from transformers) and
weights load only from safetensors (a folder with only ``pytorch_model.bin`` is refused).
A hub id is resolved to a local snapshot first, with one bounded metadata request
(``LLAVA_LENS_HUB_TIMEOUT`` seconds, default 20) and per-read download timeouts; everything
after that reads local files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities.multi_gpu import resolve_device_map
from transformers import AutoConfig

from llava_lens.errors import ModelLoadError, UnsupportedModelError
from llava_lens.families import family_for
from llava_lens.model import LlavaLens

EMBEDDED_MODELS = {"shapes-tiny": Path(__file__).parent / "toy" / "shapes-tiny"}
DEFAULT_MODEL = "shapes-tiny"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a snapshot needs: configs, tokenizer/processor files, chat template, safetensors weights
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
CONVERT_HINT = ("llava-lens loads only safetensors weights (no pickle); convert them once, somewhere you trust "
                "the files: from_pretrained(dir).save_pretrained(dir) writes model.safetensors")


def default_device_dtype(device: Optional[str], dtype: Optional[torch.dtype]) -> tuple[str, torch.dtype]:
    """CUDA + bf16 when a GPU is present, else CPU + fp32; explicit arguments win."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return device, dtype


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def hub_timeout() -> float:
    """Seconds allowed for the hub's metadata request (``LLAVA_LENS_HUB_TIMEOUT``, default 20)."""
    try:
        return max(0.1, float(os.environ.get("LLAVA_LENS_HUB_TIMEOUT", "20")))
    except ValueError:
        raise ModelLoadError("LLAVA_LENS_HUB_TIMEOUT must be a number of seconds") from None


def _snapshot(repo_id: str) -> str:
    """Download (or find in the cache) the files of hub model ``repo_id``; return the local folder."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    endpoint, timeout = os.environ.get("HF_ENDPOINT") or None, hub_timeout()
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, timeout=timeout)
    except GatedRepoError:
        raise ModelLoadError(f"{repo_id} is gated on the hub: accept its licence, then `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"model not found on the hub: {repo_id}") from None
    except Exception as err:  # noqa: BLE001 - offline, DNS, proxy, timeout: fall back to the cache
        try:
            return snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached either
            raise ModelLoadError(
                f"cannot reach the hub ({endpoint or 'huggingface.co'}) for {repo_id} within {timeout:g} s "
                f"({type(err).__name__}: {_first_line(err)}) and it is not in the local cache") from None
    names = [s.rfilename for s in info.siblings or []]
    if names and not any(n.endswith(".safetensors") for n in names):
        raise ModelLoadError(f"{repo_id} has no safetensors weights; {CONVERT_HINT}")
    try:
        return snapshot_download(repo_id, revision=info.sha, allow_patterns=HUB_FILES, etag_timeout=timeout,
                                 endpoint=endpoint)
    except Exception as err:  # noqa: BLE001 - network errors of any HTTP stack, disk full...
        raise ModelLoadError(f"downloading {repo_id} failed: {type(err).__name__}: {_first_line(err)}") from None


def _check_weights(path: Path) -> None:
    if any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
    if pickled:
        raise ModelLoadError(f"{path} has only pickle weights ({', '.join(pickled)}); {CONVERT_HINT}")
    raise ModelLoadError(f"{path} has no weights (model.safetensors)")


def _resolve_source(path_or_id: Optional[str]) -> str:
    name = path_or_id or DEFAULT_MODEL
    if not isinstance(name, (str, os.PathLike)):
        raise UnsupportedModelError(f"the model must be a path or hub id, got {type(name).__name__}")
    name = str(name)
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
        return _snapshot(name)
    raise UnsupportedModelError(f"model not found: {name!r} is neither a directory nor a hub id (org/name)")


def _load_config(source: str) -> Any:
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UnsupportedModelError(f"cannot load the config of {source!r}: {_first_line(err)}") from None


def _load_processor(source: str, family: Any) -> Any:
    try:
        processor = family.load_processor(source)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UnsupportedModelError(
            f"cannot load the processor/tokenizer of {source!r}: {_first_line(err)}") from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise UnsupportedModelError(
            f"{source!r} has no LLaVA processor (image processor + tokenizer files); "
            "save one with processor.save_pretrained(dir)")
    return processor


def load_weights(hf_class: Any, source: str, **kwargs: Any) -> Any:
    """``hf_class.from_pretrained`` from safetensors only; truncated, foreign or partial weights are one-line errors."""
    _check_weights(Path(source))
    try:
        model, info = hf_class.from_pretrained(source, use_safetensors=True, trust_remote_code=False,
                                               output_loading_info=True, **kwargs)
    except RuntimeError as err:
        if "mismatch" in str(err):
            raise ModelLoadError(f"the weights in {source} do not fit its config.json (tensor shapes differ)") from None
        raise ModelLoadError(f"cannot load the weights in {source}: {_first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - SafetensorError has no useful base class; OSError, ValueError
        raise ModelLoadError(f"cannot load the weights in {source}: {type(err).__name__}: "
                             f"{_first_line(err)}") from None
    missing = list(info.get("missing_keys") or []) + [str(k[0]) if isinstance(k, tuple) else str(k)
                                                       for k in info.get("mismatched_keys") or []]
    if missing:
        raise ModelLoadError(f"the weights in {source} lack {len(missing)} tensors the config needs "
                             f"(e.g. {missing[0]}); the file is incomplete or for another model")
    return model


@contextmanager
def _boot_with(processor: Any) -> Iterator[None]:
    """During ``boot_transformers``, give the bridge our processor and do not ask for torchvision.

    TransformerLens 4.3's boot loads the model's processor a second time and, when that fails
    (OneVision and Qwen2.5-VL processors want torchvision for their video processor), runs
    ``pip install torchvision`` in the user's environment, which can replace their torch with another
    build; its Qwen2.5-VL adapter refuses to start without torchvision for the same reason. We
    already hold the processor (loaded without its video half) and the models never import
    torchvision (tests/test_families.py runs every family without it), so we hand ours over and
    drop torchvision from the adapter's required libraries. Both are undone on exit; a
    TransformerLens without these hooks is left alone.
    """
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
    try:
        from transformer_lens.model_bridge.sources.transformers import source as boot_module
    except ImportError:
        boot_module = None
    check_libraries = getattr(ArchitectureAdapter, "_check_required_libraries", None)

    def attach(bridge: Any, *_: Any, **__: Any) -> None:
        bridge.processor = processor

    def check_without_torchvision(adapter: Any) -> None:
        adapter.required_libraries = [lib for lib in adapter.required_libraries if lib != "torchvision"]
        check_libraries(adapter)

    swaps = [(owner, name, new) for owner, name, new in (
        (boot_module, "load_modality_processor", attach),
        (ArchitectureAdapter, "_check_required_libraries", check_without_torchvision)) if hasattr(owner, name)]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
    for owner, name, new in swaps:
        setattr(owner, name, new)
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def load(path_or_id: Optional[str] = None, device: Optional[str] = None,
         dtype: Optional[torch.dtype] = None, **boot_kwargs: Any) -> LlavaLens:
    """Load a supported model (see :mod:`llava_lens.families`) and its processor into a TransformerLens bridge.

    ``path_or_id`` is a local model directory, a Hugging Face hub id (e.g.
    ``"llava-hf/llava-1.5-7b-hf"``) or an embedded model name; ``None`` loads the embedded
    ``shapes-tiny`` model. ``device``/``dtype`` default to CUDA + bf16 when available, else CPU +
    fp32. ``device_map`` (e.g. ``"auto"``) or ``n_devices=K`` shard a model too large for one GPU
    (HF dispatches it at load time); other keyword arguments go to
    ``TransformerBridge.boot_transformers``. Only safetensors weights are read, and no code from
    the model's files is run (see the module docstring).
    """
    source = _resolve_source(path_or_id)
    config = _load_config(source)
    family = family_for(config)
    processor = _load_processor(source, family)
    device_map = boot_kwargs.pop("device_map", None)
    n_devices = boot_kwargs.pop("n_devices", None)
    if device_map is not None or (n_devices or 1) > 1:
        # A model sharded over devices is dispatched by HF at load time; the bridge then wraps it
        # as it is (it refuses device_map together with a pre-loaded hf_model).
        device_map, max_memory = resolve_device_map(n_devices, device_map, None, boot_kwargs.pop("max_memory", None))
        dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        hf_model = load_weights(family.hf_class, source, dtype=dtype, device_map=device_map, max_memory=max_memory)
    else:
        device, dtype = default_device_dtype(device, dtype)
        hf_model = load_weights(family.hf_class, source, dtype=dtype).to(device)
        boot_kwargs["device"] = device
    family.prepare_hf_model(hf_model)
    with _boot_with(processor):
        bridge = TransformerBridge.boot_transformers(
            source, hf_model=hf_model.eval(), dtype=dtype, tokenizer=processor.tokenizer, **boot_kwargs)
    return LlavaLens(bridge, processor, family, name=path_or_id or DEFAULT_MODEL)
