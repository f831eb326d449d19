"""Procedural scenes: determinism, ground-truth masks, QA consistency, tokenizer, data export."""

import numpy as np
import pytest

from llava_lens.toy.build import BASE_WORDS, word_tokenizer
from llava_lens.toy.data import export_folder, read_folder, to_dataset
from llava_lens.toy.scenes import (
    COLORS,
    MIN_CONTRAST,
    QTYPES,
    SHAPES,
    Style,
    make_scene,
    random_style,
    shape_mask,
    vocabulary,
)

STYLES = [Style(), Style(size=96), Style(outline=True), Style(texture=True), Style(size=128, background="light"),
          Style(background="colour", texture=True), Style(radius=(0.18, 0.25)), Style(size=80, antialias=True),
          Style(size=112, background="light", outline=True, antialias=True, line_width=3)]
IDS = ["default", "96px", "outline", "texture", "light-128", "colour-texture", "large", "soft", "light-soft-outline"]


ORIGINAL_12345 = "b9ae12bebaf57649"  # make_scene(12345) before drawing styles existed


def _words(text):
    import re
    return re.findall(r"[a-z]+|[^\sa-z]", text.lower())


def test_same_seed_same_scene():
    for seed in (0, 17, 123456789):
        a, b = make_scene(seed), make_scene(seed)
        assert np.array_equal(a.image, b.image)
        assert [(q.question, q.answer, q.qtype, q.obj) for q in a.qas] == \
               [(q.question, q.answer, q.qtype, q.obj) for q in b.qas]
        for oa, ob in zip(a.objects, b.objects):
            assert np.array_equal(oa.mask, ob.mask) and oa.bbox == ob.bbox


def test_different_seeds_differ():
    images = [make_scene(s).image for s in range(20)]
    assert len({im.tobytes() for im in images}) == 20


@pytest.mark.parametrize("style", STYLES, ids=IDS)
def test_masks_are_ground_truth(style):
    for seed in range(40):
        scene = make_scene(seed, style)
        assert scene.image.shape == (style.size, style.size, 3)
        assert style.min_objects <= len(scene.objects) <= style.max_objects
        assert len({o.shape for o in scene.objects}) == len(scene.objects)  # names are unambiguous
        assert len({o.color for o in scene.objects}) == len(scene.objects)
        union = np.zeros(scene.image.shape[:2], dtype=int)
        for o in scene.objects:
            assert o.mask.shape == scene.image.shape[:2] and o.mask.sum() >= 8
            rgb = scene.image[o.mask].astype(int)
            if style.antialias:  # edge pixels blend with the background; at least half are over halfway
                dist = np.linalg.norm(rgb - COLORS[o.color], axis=1)
                others = np.linalg.norm(rgb[:, None] - np.array(list(COLORS.values()))[None], axis=2).min(1)
                assert (dist == others).mean() > 0.5 and (dist == 0).any()
            else:
                assert (rgb == np.array(COLORS[o.color])).all()
            ys, xs = np.nonzero(o.mask)
            assert o.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            union += o.mask
        assert union.max() == 1  # objects never overlap
        # no background pixel has exactly an object's colour (clutter is grey)
        background = scene.image[union == 0]
        for o in scene.objects:
            assert not (background == np.array(COLORS[o.color])).all(axis=1).any()


def test_default_style_draws_the_original_scenes():
    """Held-out numbers stay comparable across models: Style() scenes are the original renderer's."""
    scene = make_scene(12345)
    assert scene.image.shape == (64, 64, 3)
    assert scene.image.mean() < 60  # dark canvas
    digest = __import__("hashlib").sha256(scene.image.tobytes()).hexdigest()[:16]
    assert digest == ORIGINAL_12345


def test_backgrounds_and_contrast():
    for kind in ("light", "colour"):
        for seed in range(30):
            scene = make_scene(seed, Style(background=kind, noise=0, clutter=0))
            union = np.zeros(scene.image.shape[:2], bool)
            for o in scene.objects:
                union |= o.mask
            base = scene.image[~union][0].astype(int)
            assert (scene.image[~union] == base).all()  # noise-free, untextured: one colour
            if kind == "light":
                assert base.min() >= 185 and base[0] == base[1] == base[2]
            for o in scene.objects:  # every object stands out from its background
                assert np.linalg.norm(np.array(COLORS[o.color]) - base) >= MIN_CONTRAST
    light = [o.color for s in range(200) for o in make_scene(s, Style(background="light")).objects]
    assert "white" not in light and {"yellow", "cyan"} <= set(light)
    with pytest.raises(ValueError, match="unknown background"):
        make_scene(0, Style(background="plaid"))


def test_outline_width_and_soft_edges():
    thin, thick = (shape_mask("square", 64, 32, 32, 12, outline=True, width=w).sum() for w in (1, 3))
    assert 2.5 < thick / thin < 3.5
    hard = make_scene(3, Style(antialias=False, noise=0, clutter=0)).image
    soft = make_scene(3, Style(antialias=True, noise=0, clutter=0)).image
    n_colours = [len(np.unique(im.reshape(-1, 3), axis=0)) for im in (hard, soft)]
    assert n_colours[1] > n_colours[0] + 4  # blended edge pixels


def test_random_style_covers_every_knob_deterministically():
    styles = [random_style(s) for s in range(400)]
    assert styles[:20] == [random_style(s) for s in range(20)]
    assert {s.size for s in styles} == {48, 64, 80, 96, 112, 128}
    assert {s.background for s in styles} == {"dark", "light", "colour"}
    for knob in ("outline", "texture", "antialias"):
        share = np.mean([getattr(s, knob) for s in styles])
        assert 0.1 < share < 0.7, knob
    assert max(s.radius[1] for s in styles) == 0.25 and min(s.radius[0] for s in styles) < 0.1
    assert len({s.noise for s in styles}) > 10
    for seed in range(60):  # every drawn style renders a valid scene whose grid divides the canvas
        scene = make_scene(seed, random_style(seed))
        assert scene.image.shape[0] % 16 == 0 and 1 <= len(scene.objects) <= 4


def test_qas_are_consistent_with_the_scene():
    seen = set()
    for seed in range(200):
        scene = make_scene(seed)
        for qa in scene.qas:
            seen.add(qa.qtype)
            assert qa.qtype in QTYPES
            words = _words(qa.answer)
            if qa.qtype == "count":
                assert qa.obj is None and qa.mask is None
                n = len(scene.objects)
                assert words[2] == ["zero", "one", "two", "three", "four"][n]
                continue
            if qa.qtype == "exists" and words[0] == "no":
                color, shape = words[-3], words[-2]
                assert (shape, color) not in {(o.shape, o.color) for o in scene.objects}
                assert qa.obj is None
                continue
            obj = scene.objects[qa.obj]
            assert np.array_equal(qa.mask, obj.mask) and qa.bbox == obj.bbox
            if qa.qtype == "color":
                assert obj.shape in qa.question and words[-2] == obj.color
            elif qa.qtype == "shape":
                assert obj.color in qa.question and words[-2] == obj.shape
            elif qa.qtype == "exists":
                assert words[0] == "yes" and f"{obj.color} {obj.shape}" in qa.question
            elif qa.qtype == "position":
                ys, xs = np.nonzero(obj.mask)
                side = words[-2]
                centre = {"left": xs.mean(), "right": xs.mean(), "top": ys.mean(), "bottom": ys.mean()}[side]
                half = scene.image.shape[0] / 2
                assert centre < half if side in ("left", "top") else centre > half
    assert seen == set(QTYPES)


def test_answers_are_balanced():
    colors, shapes, yes = [], [], []
    for seed in range(400):
        for qa in make_scene(seed).qas:
            if qa.qtype == "color":
                colors.append(_words(qa.answer)[-2])
            if qa.qtype == "shape":
                shapes.append(_words(qa.answer)[-2])
            if qa.qtype == "exists":
                yes.append(qa.answer.startswith("yes"))
    assert set(colors) == set(COLORS) and set(shapes) == set(SHAPES)
    assert 0.4 < np.mean(yes) < 0.6


def test_tokenizer_round_trip():
    tok = word_tokenizer(BASE_WORDS)
    assert set(vocabulary()) <= set(BASE_WORDS)
    unk = tok.unk_token_id
    for qa in make_scene(5).qas + make_scene(6).qas:
        for text in (qa.question, qa.answer):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert unk not in ids and len(ids) == len(text.split())
            assert _words(tok.decode(ids)) == _words(text)
    assert tok.convert_tokens_to_ids("<image>") != unk


def test_dataset_export(tmp_path):
    ds = to_dataset(4, first_seed=10)
    expected = [qa for s in range(10, 14) for qa in make_scene(s).qas]
    assert len(ds) == len(expected)
    assert set(ds.column_names) >= {"image", "question", "answer", "mask", "bbox", "qtype", "scene_id"}
    for row, qa in zip(ds, expected):
        assert row["question"] == qa.question and row["answer"] == qa.answer
        if qa.mask is None:
            assert row["mask"] is None and row["bbox"] is None
        else:
            assert np.array_equal(np.asarray(row["mask"]) > 0, qa.mask) and tuple(row["bbox"]) == qa.bbox
    export_folder(tmp_path, 4, first_seed=10)
    back = read_folder(tmp_path)
    assert len(back) == len(expected)
    for row, qa in zip(back, expected):
        assert row["answer"] == qa.answer and (row["mask"] is None) == (qa.mask is None)
        if qa.mask is not None:
            assert np.array_equal(row["mask"], qa.mask)
    assert (tmp_path / "images" / "scene_10.png").is_file()
