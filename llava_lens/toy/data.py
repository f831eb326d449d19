"""Export procedural shape scenes as a Hugging Face ``datasets.Dataset`` or as an image folder.

One row per question/answer pair: ``scene_id`` (the scene's seed), ``image``, ``question``,
``answer``, ``qtype``, ``obj`` (index of the object asked about, -1 for none), ``mask`` (that
object's boolean mask as a black/white image, ``None`` when the question is about no single
object) and ``bbox`` (``[x0, y0, x1, y1]``, exclusive; ``None`` likewise).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from llava_lens.toy.scenes import Style, make_scene

MANIFEST_COLUMNS = ("scene_id", "image", "question", "answer", "qtype", "obj", "mask", "bbox")


def rows(n_scenes: int, first_seed: int = 0, style: Style = Style()) -> Iterator[dict]:
    """One dict per QA pair of scenes ``first_seed .. first_seed + n_scenes - 1``."""
    for seed in range(first_seed, first_seed + n_scenes):
        scene = make_scene(seed, style)
        image = scene.pil()
        for qa in scene.qas:
            yield {
                "scene_id": seed,
                "image": image,
                "question": qa.question,
                "answer": qa.answer,
                "qtype": qa.qtype,
                "obj": -1 if qa.obj is None else qa.obj,
                "mask": None if qa.mask is None else Image.fromarray(qa.mask.astype(np.uint8) * 255, "L"),
                "bbox": None if qa.bbox is None else list(qa.bbox),
            }


def to_dataset(n_scenes: int, first_seed: int = 0, style: Style = Style()):
    """The QA pairs of ``n_scenes`` scenes as a ``datasets.Dataset`` (image and mask as images)."""
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as ImageFeature

    features = Features({
        "scene_id": Value("int64"), "image": ImageFeature(), "question": Value("string"),
        "answer": Value("string"), "qtype": Value("string"), "obj": Value("int32"),
        "mask": ImageFeature(), "bbox": Sequence(Value("int32"), length=4),
    })
    return Dataset.from_list(list(rows(n_scenes, first_seed, style)), features=features)


def export_folder(out_dir: str | Path, n_scenes: int, first_seed: int = 0, style: Style = Style()) -> Path:
    """Write ``images/``, ``masks/`` (PNG) and ``manifest.csv`` under ``out_dir``; returns the manifest.

    Paths in the manifest are relative to ``out_dir``; ``bbox`` is a JSON list or empty.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for row in rows(n_scenes, first_seed, style):
            sid = row["scene_id"]
            image_path = f"images/scene_{sid}.png"
            if not (out / image_path).exists():
                row["image"].save(out / image_path)
            mask_path = ""
            if row["mask"] is not None:
                mask_path = f"masks/scene_{sid}_obj_{row['obj']}.png"
                row["mask"].save(out / mask_path)
            writer.writerow({**row, "image": image_path, "mask": mask_path,
                             "bbox": "" if row["bbox"] is None else json.dumps(row["bbox"])})
    return manifest


def read_folder(out_dir: str | Path) -> list[dict]:
    """The manifest rows of :func:`export_folder`, with ``mask`` loaded as a boolean array (or None)."""
    out = Path(out_dir)
    result = []
    with (out / "manifest.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            row["scene_id"], row["obj"] = int(row["scene_id"]), int(row["obj"])
            row["bbox"] = json.loads(row["bbox"]) if row["bbox"] else None
            row["mask"] = np.asarray(Image.open(out / row["mask"])) > 0 if row["mask"] else None
            result.append(row)
    return result
