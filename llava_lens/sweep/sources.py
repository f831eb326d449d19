"""Sweep inputs: an image folder, a saved ``datasets`` dataset or a Parquet/CSV manifest, as Examples.

Ids are stable across runs (so resuming works by id): the path relative to the folder, the
dataset's ``id`` column (else the row index), the manifest's ``id`` column (else
``<image path>#<row>``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pyarrow.parquet as pq

from llava_lens.errors import SweepError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ID_COLUMNS = ("id", "example_id")
IMAGE_COLUMNS = ("image", "image_path", "path", "file")
TARGET_COLUMNS = ("answer", "target", "label")


@dataclass
class Example:
    """One sweep input: a stable id, an image, a question, an optional target answer.

    ``image`` is a path, bytes, a PIL image, or a zero-argument callable returning one of those
    (read only when the example is analysed, so a sweep never holds a dataset's images in memory).
    ``question`` is ``None`` when the data has no question for this example (an error row).
    """

    id: str
    image: Any
    question: Optional[str]
    target: Optional[str] = None


def _missing(value: Any) -> bool:
    """A null cell: ``None`` or a float NaN (how pandas and CSV readers write a missing value)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _question(row: dict, question: Optional[str], column: Optional[str]) -> Optional[str]:
    if column is None:
        return question
    if column not in row:
        raise SweepError(f"question column {column!r} not in the data (columns: {', '.join(row)})")
    value = row[column]
    return None if _missing(value) else str(value)


def _pick(row: dict, names: tuple[str, ...]) -> Optional[str]:
    return next((n for n in names if n in row), None)


def _folder(data: Path, question: Optional[str]) -> Iterator[Example]:
    files = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise SweepError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {data}")
    for path in files:
        # a file name that is not UTF-8 holds lone surrogates; ids are stored as valid text
        ex_id = path.relative_to(data).as_posix().encode("utf-8", "backslashreplace").decode("utf-8")
        yield Example(ex_id, path, question)


def _rows(rows: Iterator[dict], base: Optional[Path], question: Optional[str],
          column: Optional[str]) -> Iterator[Example]:
    """Examples from dict rows of a dataset or manifest (``base``: folder of relative image paths)."""
    for i, row in enumerate(rows):
        image_col, id_col, target_col = (_pick(row, IMAGE_COLUMNS), _pick(row, ID_COLUMNS),
                                         _pick(row, TARGET_COLUMNS))
        if image_col is None:
            raise SweepError(f"no image column ({'/'.join(IMAGE_COLUMNS)}) in the data: {', '.join(row)}")
        image = row[image_col]
        if base is not None and isinstance(image, str):
            image = base / image
        if id_col is not None:
            if _missing(row[id_col]) or str(row[id_col]) == "":
                raise SweepError(f"row {i} of the data has no {id_col!r}; ids must be unique and non-empty")
            ex_id = str(row[id_col])
        else:
            ex_id = f"{row[image_col]}#{i}" if base is not None else str(i)
        target = None if target_col is None or _missing(row[target_col]) or row[target_col] == "" \
            else str(row[target_col])
        yield Example(ex_id, image, _question(row, question, column), target)


def _dataset_image(ds: Any, index: int, column: str) -> Any:
    """Bytes (or path) of one undecoded ``datasets`` Image cell, read when needed."""
    cell = ds[index][column]
    return (cell.get("bytes") or cell.get("path")) if isinstance(cell, dict) else cell


def _dataset_rows(ds: Any) -> Iterator[dict]:
    """Rows of a dataset with the image column replaced by a lazy loader (ids need no pixels)."""
    image_col = next((n for n in IMAGE_COLUMNS if n in ds.column_names), None)
    if image_col is None:
        yield from ds
        return
    for i, row in enumerate(ds.remove_columns([image_col])):
        yield {**row, image_col: functools.partial(_dataset_image, ds, i, image_col)}


def _manifest(path: Path) -> list[dict]:
    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_table(path).to_pylist()
        import csv
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, ValueError, UnicodeDecodeError) as err:  # pyarrow's errors are ValueErrors
        raise SweepError(f"cannot read the manifest {path}: {str(err).splitlines()[0]}") from None


def iter_examples(data: str | Path, question: Optional[str] = None,
                  question_column: Optional[str] = None) -> Iterator[Example]:
    """Yield the examples of ``data`` (image folder, saved ``datasets`` dataset, .parquet/.csv manifest).

    Exactly one of ``question`` (the same for all) and ``question_column`` should be given.
    """
    path = Path(data)
    if not path.exists():
        raise SweepError(f"data not found: {path}")
    if path.is_file():
        if path.suffix.lower() not in (".parquet", ".csv"):
            raise SweepError(f"{path}: expected an image folder, a saved dataset or a .parquet/.csv manifest")
        return _rows(iter(_manifest(path)), path.parent, question, question_column)
    if (path / "dataset_dict.json").is_file():  # several splits: ask for one rather than guess
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise SweepError(f"{path} holds several splits ({', '.join(splits)}); pass {path}/<split>")
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        from datasets import Image as ImageFeature
        from datasets import load_from_disk
        ds = load_from_disk(str(path))
        for name, feature in ds.features.items():
            if isinstance(feature, ImageFeature):  # decode per example, so a bad image is one error row
                ds = ds.cast_column(name, ImageFeature(decode=False))
        return _rows(_dataset_rows(ds), None, question, question_column)
    return _folder(path, question)
