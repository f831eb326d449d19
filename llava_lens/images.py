"""The image policy: what llava-lens accepts as an image, and how it becomes 8-bit RGB.

Rules (no guessing from an image's own range, so equal inputs always mean equal pixels):

* Size, checked from the file header (before decoding) or the array shape: at most
  :data:`MAX_IMAGE_PIXELS` pixels (PIL's own default, ``PIL.Image.MAX_IMAGE_PIXELS``) and a
  long/short side ratio of at most :data:`MAX_ASPECT_RATIO` (the limit Qwen2-VL's processor
  uses): a 100000x1 image would take gigabytes once the processor resizes its short side.
* Arrays: ``uint8`` as is; ``bool`` as 0/255; ``uint16`` (16-bit) divided by 257; other
  integer types must hold 0-255; floats must be finite and in [0, 1] (multiplied by 255).
  Anything else (NaN, inf, out of range, object/complex/string dtypes) is an ImageError.
* PIL images follow the same rules by mode: ``I;16`` as uint16, ``I`` as integers 0-255, ``F``
  as floats in [0, 1]; palette, grayscale, CMYK... are converted to RGB, alpha is composited on
  white. Files get their EXIF orientation applied (as ``transformers.image_utils.load_image``).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llava_lens.errors import ImageError

ImageLike = Union[str, Path, bytes, Image.Image, np.ndarray]

MAX_IMAGE_PIXELS = 89_478_485
MAX_ASPECT_RATIO = 200


def check_size(width: int, height: int, name: str = "the image") -> None:
    """Raise :class:`ImageError` if ``width`` x ``height`` breaks the size policy (before any decoding)."""
    if width <= 0 or height <= 0:
        raise ImageError(f"{name} is empty ({width}x{height} pixels)")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of "
                         f"{MAX_IMAGE_PIXELS:,}; resize it first")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ImageError(f"{name} is {width}x{height}, an aspect ratio over {MAX_ASPECT_RATIO}:1; "
                         "crop or pad it first")


def load_image(image: ImageLike) -> Image.Image:
    """Return ``image`` as a fully decoded 8-bit RGB PIL image, following the module's policy.

    Accepts a path, raw bytes, a binary file object, a PIL image or an array (HxW, HxWx1,
    HxWx3, HxWx4). Raises :class:`ImageError` (one line) for a missing, corrupt, truncated,
    empty, too large or out-of-range image.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise ImageError(f"{path} is a folder, not an image file")
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        with open(path, "rb") as f:
            img = _open(f, str(path))
    elif isinstance(image, (bytes, bytearray, memoryview)):
        img = _open(io.BytesIO(bytes(image)), "the image data")
    elif hasattr(image, "read"):
        img = _open(image, "the image stream")
    elif isinstance(image, Image.Image):
        check_size(image.width, image.height)
        img = image
    elif isinstance(image, np.ndarray):
        img = _from_array(image)
    else:
        raise ImageError(f"unsupported image type {type(image).__name__}; pass a path, bytes, a PIL "
                         "image or an HxW / HxWx3 / HxWx4 numpy array")
    return _to_rgb(img)


def _first_line(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text.split(" <_io.")[0].split(" <PIL.")[0]  # no object reprs in messages


def _open(stream: Any, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check comes next
            img = Image.open(stream)
            check_size(img.width, img.height, name)
            img.load()  # decode now: truncated files fail here, not deep inside the processor
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as err:
        raise ImageError(f"{name} is over the limit of {MAX_IMAGE_PIXELS:,} pixels ({_first_line(err)}); "
                         "resize it first") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot read {name} as an image: not a known image format") from None
    except (OSError, SyntaxError, ValueError, MemoryError, EOFError) as err:
        if isinstance(err, ImageError):
            raise
        raise ImageError(f"cannot read {name} as an image: {_first_line(err)}") from None
    return img


def _to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    """Apply the dtype rules: uint8 as is, bool 0/255, uint16 / 257, ints 0-255, floats [0, 1] * 255."""
    kind = arr.dtype.kind
    if arr.dtype == np.uint8:
        return arr
    if kind == "b":
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if kind in "ui":
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high > 255:
            raise ImageError(f"{what} of type {arr.dtype} holds {low}..{high}; integer images must hold "
                             "0..255 (or be uint16 for 16-bit)")
        return arr.astype(np.uint8)
    if kind == "f":
        if not np.isfinite(arr).all():
            raise ImageError(f"{what} holds NaN or infinite values")
        low, high = float(arr.min()), float(arr.max())
        if low < 0 or high > 1:
            raise ImageError(f"{what} of type {arr.dtype} holds {low:g}..{high:g}; float images must be in "
                             "[0, 1] (divide 0-255 data by 255)")
        return np.round(arr.astype(np.float64) * 255).astype(np.uint8)
    raise ImageError(f"{what} has dtype {arr.dtype}; use uint8, uint16, bool, an integer type or a float type")


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or 0 in arr.shape:
        raise ImageError(f"image array must be HxW, HxWx3 or HxWx4 and non-empty, got shape {arr.shape}")
    check_size(arr.shape[1], arr.shape[0], "the image array")
    return Image.fromarray(np.ascontiguousarray(_to_uint8(arr, "the image array")))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16"):
        return Image.fromarray(_to_uint8(np.asarray(img).astype(np.uint16), "the 16-bit image")).convert("RGB")
    if img.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img), f"the mode-{img.mode} image")).convert("RGB")
    if img.mode == "RGB":
        return img
    try:
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            background = Image.new("RGB", rgba.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageError(f"cannot convert a mode-{img.mode} image to RGB: {_first_line(err)}") from None
