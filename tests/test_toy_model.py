"""The shipped shapes-tiny checkpoint: size, format, loading through llava_lens.load(), accuracy."""

import re

import pytest

import llava_lens as ll
from llava_lens.loading import EMBEDDED_MODELS
from llava_lens.toy.evaluate import HELD_OUT_BASE
from llava_lens.toy.scenes import QTYPES, make_scene

CKPT = EMBEDDED_MODELS["shapes-tiny"]


def _words(text):
    return re.findall(r"[a-z]+|[^\sa-z]", text.lower())


def _questions(n_per_type=4, first=HELD_OUT_BASE + 10_000):
    """Held-out (never trained on) QAs, ``n_per_type`` of each question type; truth from the generator."""
    picked, seed = {q: [] for q in QTYPES}, first
    while any(len(v) < n_per_type for v in picked.values()):
        scene = make_scene(seed)
        for qa in scene.qas:
            if len(picked[qa.qtype]) < n_per_type:
                picked[qa.qtype].append((scene.image, qa.question, qa.answer))
        seed += 1
    return [row for rows in picked.values() for row in rows]


@pytest.fixture(scope="module")
def toy_lens():
    return ll.load(device="cpu")


def test_checkpoint_is_small_safetensors():
    files = [p for p in CKPT.rglob("*") if p.is_file()]
    assert (CKPT / "model.safetensors").is_file() and (CKPT / "config.json").is_file()
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20


def test_default_and_named_load_the_embedded_model(toy_lens):
    assert toy_lens.name == "shapes-tiny"
    assert toy_lens.config.vision_config.image_size // toy_lens.config.vision_config.patch_size >= 8
    assert toy_lens.n_layers >= 2


def test_answers_held_out_questions(toy_lens):
    rows = _questions()
    assert len(rows) == 20
    right = []
    for image, question, answer in rows:
        got = toy_lens.trace(image, question, max_new_tokens=12, default_capture=False, keep_logits=False).text
        right.append(_words(got) == _words(answer))
    assert sum(right) >= 18, [(q, a) for (_, q, a), ok in zip(rows, right) if not ok]


def test_count_questions_use_the_image(toy_lens):
    """Count answers (96% held out) must follow the scene, not a fixed guess."""
    rows = [(make_scene(s).image, qa.answer) for s in range(HELD_OUT_BASE + 20_000, HELD_OUT_BASE + 20_012)
            for qa in make_scene(s).qas if qa.qtype == "count"]
    got = [toy_lens.trace(im, "how many objects are there ?", max_new_tokens=8, default_capture=False,
                          keep_logits=False).text for im, _ in rows]
    right = sum(_words(g) == _words(a) for g, (_, a) in zip(got, rows))
    assert len({a for _, a in rows}) >= 3 and right >= 9, (got, [a for _, a in rows])


def test_loading_by_name_gives_the_same_model(toy_lens):
    other = ll.load("shapes-tiny", device="cpu")
    a, b = toy_lens.hf_model.state_dict(), other.hf_model.state_dict()
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_target_report_verdicts():
    """Met/missed lines of the issue-#19 targets, checked by hand."""
    from llava_lens.toy.evaluate import target_report

    lines = target_report({"held-out": {"color": 0.99, "shape": 0.90, "overall": 0.93},
                           "light bg": {"color": 0.80}, "outlines": {"color": 0.85},
                           "blank image": {"overall": 0.45}, "_chance": {"overall": 0.30}})
    assert lines == ["held-out color 99.0 >= 97: met", "held-out shape 90.0 >= 95: MISSED by 5.0 points",
                     "held-out overall 93.0 >= 92: met", "outlines color 85.0 >= 85: met",
                     "light bg color 80.0 >= 85: MISSED by 5.0 points",
                     "blank image overall 45.0 <= chance + 10 = 40.0: MISSED by 5.0 points"]


def test_model_card_states_the_recipe_it_was_given(tmp_path):
    """The card's command, time and table come from train_log.json and the measured table, nothing else."""
    import json
    import shlex
    import shutil

    from llava_lens.toy.evaluate import write_card
    from llava_lens.toy.train import parse_args

    shutil.copytree(CKPT, tmp_path / "m")
    log = {"seed": 3, "steps": 12, "vision_steps": 7, "vision_batch_size": 5, "vision_lr": 0.002,
           "batch_size": 4, "extra_qtypes": "shape,exists,exists", "answer_weight": 3.0, "lr": 0.001,
           "styles": "random", "warmup": 2,
           "sizes": {"image_size": 64, "n_heads": 8}, "threads": 2, "vision_workers": 1, "seconds": 90.0,
           "cpu_seconds": 120.0, "losses": [[5, "vision", 1.5], [12, "language", 0.25]]}
    (tmp_path / "m" / "train_log.json").write_text(json.dumps(log))
    card = write_card(tmp_path / "m", "| my | table |", 11, 13).read_text()
    assert ("`python -m llava_lens.toy.train --vision-steps 7 --vision-batch-size 5 --vision-lr 0.002 "
            "--vision-workers 1 --steps 5 --batch-size 4 --lr 0.001 --extra-qtypes 'shape,exists,exists' "
            "--answer-weight 3 --styles random --lm-heads 8`") in card
    command = card.split("`python -m llava_lens.toy.train ")[1].split("`")[0]
    args = parse_args(shlex.split(command))  # the card's command is one the trainer accepts, as stated
    assert (args.extra_qtypes, args.answer_weight, args.vision_workers, args.steps, args.lm_heads) == (
        "shape,exists,exists", 3, 1, 5, 8)
    assert "plus one more shape and two more exists question each" in card
    assert "3x on the words naming a colour" in card
    assert "seed 3, 1.5 minutes of wall-clock time (2.0 CPU minutes in the training process)" in card
    assert "stage 1: 1 torch thread(s) + 1 scene-drawing worker(s); stage 2: 2 torch threads" in card
    assert "| 12 | language | 0.2500 |" in card and "| my | table |" in card and "11 scenes" in card
