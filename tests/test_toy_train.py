"""The toy training script: a tiny two-stage run, its outputs, bit-for-bit resumption, its batches."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava_lens.toy.batches import ATTRIBUTE_WORDS, COLOR_NAMES, PatchBatches, QABatches, patch_labels, pixels
from llava_lens.toy.scenes import SHAPES, Style, make_scene
from llava_lens.toy.train import lr_at, parse_args, qa_loss, train


def _run(out, steps, *extra, vision_steps=5):
    return train(parse_args(["--out", str(out), "--steps", str(steps), "--vision-steps", str(vision_steps),
                             "--tiny", "--batch-size", "4", "--vision-batch-size", "8", "--warmup", "5",
                             "--save-every", "10", "--threads", "1", *extra]))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "m"
    return out, _run(out, 15)


def test_two_stage_run_writes_a_loadable_model(tiny_run):
    out, log = tiny_run
    assert log["steps"] == 20
    assert [(step, name) for step, name, _ in log["losses"]] == [(5, "vision"), (20, "language")]  # stage ends
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 20
    # The training-only heads live in the checkpoint, never in the model.
    assert (out / "checkpoint" / "heads.safetensors").is_file()
    assert not [k for k in load_file(str(out / "model.safetensors")) if "heads" in k]
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    batch = QABatches(processor, 0, 2, Style(size=32))[0]
    with torch.no_grad():
        loss = qa_loss(model, batch).item()
    assert loss < 4.5  # vocabulary of ~75 words: ln(75) = 4.3 at random; trained must not be worse


def _plain_loss(model, batch):
    """HF's own forward: every sequence with its scene's pixels, the whole prompt per sequence."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 pixel_values=batch["pixel_values"][batch["scene_index"]]).loss


def test_shared_image_loss_equals_the_plain_forward(tiny_run):
    """Encoding each scene once and sharing it must be exactly HF's forward with repeated pixels."""
    out, _ = tiny_run
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    batch = QABatches(AutoProcessor.from_pretrained(out), 3, 2, Style(size=32))[7]
    assert len(batch["scene_index"]) > 2
    with torch.no_grad():
        ours = qa_loss(model, batch)
        theirs = _plain_loss(model, batch)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_shared_prefix_gradients_equal_the_plain_forward(tiny_run):
    """The prompt prefix runs once per scene; the gradients must still be HF's, parameter by parameter."""
    out, _ = tiny_run
    batch = QABatches(AutoProcessor.from_pretrained(out), 5, 3, Style(size=32))[2]
    grads = []
    for plain in (False, True):
        model = LlavaForConditionalGeneration.from_pretrained(out).eval()
        (_plain_loss(model, batch) if plain else qa_loss(model, batch)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "vision_tower" not in n})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_loss_only_on_answer_tokens(tiny_run):
    processor = AutoProcessor.from_pretrained(tiny_run[0])
    data = QABatches(processor, 0, 4, Style(size=32))
    ids, labels = data.encode("what color is the star ?", "the star is red .")
    tok = processor.tokenizer
    supervised = [i for i, y in zip(ids, labels) if y != -100]
    assert tok.convert_ids_to_tokens(supervised) == ["the", "star", "is", "red", ".", "</s>"]
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == (32 // 8) ** 2
    batch = data[0]  # every QA of every scene, each pointing at its own image
    n_qas = [len(make_scene(s, Style(size=32)).qas) for s in (0, 1, 2, 3)]
    assert batch["scene_index"].tolist() == [k for k, n in enumerate(n_qas) for _ in range(n)]
    more = QABatches(processor, 0, 4, Style(size=32), extra=("exists",))[0]  # one more exists question each
    assert more["scene_index"].tolist() == [k for k, n in enumerate(n_qas) for _ in range(n + 1)]
    assert torch.equal(more["pixel_values"], batch["pixel_values"])
    # encodings are cached per instance: a batch from a used instance equals one from a fresh instance
    used = QABatches(processor, 0, 4, Style(size=32), extra=("exists",))
    [used[step] for step in range(3)]
    assert len(used.encoded) > 0
    assert all(value == used._encode(*key) for key, value in used.encoded.items())
    for key, value in QABatches(processor, 0, 4, Style(size=32), extra=("exists",))[2].items():
        assert torch.equal(used[2][key], value), key


@pytest.mark.parametrize("vision_steps", [5, 0], ids=["stopped-in-vision-stage", "stopped-in-language-stage"])
def test_resume_matches_uninterrupted_run(tmp_path, vision_steps):
    _run(tmp_path / "full", 12, vision_steps=vision_steps)
    _run(tmp_path / "part", 12, "--max-minutes", "1e-9", vision_steps=vision_steps)  # stops after one step
    assert json.loads((tmp_path / "part" / "checkpoint" / "state.json").read_text())["step"] == 1
    _run(tmp_path / "part", 12, "--resume", vision_steps=vision_steps)
    for name in ("model.safetensors", "heads.safetensors"):
        a = load_file(str(tmp_path / "full" / "checkpoint" / name))
        b = load_file(str(tmp_path / "part" / "checkpoint" / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_language_stage_leaves_the_vision_tower_alone(tmp_path):
    _run(tmp_path / "v", 0, vision_steps=3)
    _run(tmp_path / "vl", 5, vision_steps=3)
    a, b = load_file(str(tmp_path / "v" / "model.safetensors")), load_file(str(tmp_path / "vl" / "model.safetensors"))
    tower = [k for k in a if "vision_tower" in k]
    assert tower and all(torch.equal(a[k], b[k]) for k in tower)
    assert any(not torch.equal(a[k], b[k]) for k in a if "language_model" in k)


def test_patch_labels_follow_the_masks():
    scene = next(s for s in map(make_scene, range(50)) if len(s.objects) >= 3)
    labels = patch_labels(scene, 8)
    shape, color, rows, cols = labels
    for obj in scene.objects:  # the patch holding the object's centre is that object's
        r, c = int(obj.center[1]) // 8, int(obj.center[0]) // 8
        assert SHAPES[shape[r * 8 + c]] == obj.shape and COLOR_NAMES[color[r * 8 + c]] == obj.color
    covered = np.zeros(64, bool)
    for obj in scene.objects:
        covered |= obj.mask.reshape(8, 8, 8, 8).any((1, 3)).reshape(-1)
    assert (shape[~covered] == len(SHAPES)).all() and (color[~covered] == len(COLOR_NAMES)).all()
    assert rows.tolist() == [i // 8 for i in range(64)] and cols.tolist() == [i % 8 for i in range(64)]
    batch = PatchBatches(0, 3, Style(), 8)[2]
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and batch["labels"].shape == (3, 4, 64)


def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 10) == 0.1
    assert lr_at(10, 100, 1.0, 10) == 1.0
    assert abs(lr_at(100, 100, 1.0, 10) - 0.05) < 1e-9


def test_training_pixels_match_the_processor(tiny_run):
    """Training normalises pixels itself; it must be what the saved processor gives at inference."""
    processor = AutoProcessor.from_pretrained(tiny_run[0])
    images = [make_scene(s, Style(size=32)).image for s in range(3)]
    ours = pixels(images)
    theirs = processor.image_processor([Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=0)
    assert np.abs((ours - theirs).numpy()).mean() < 2e-3


def test_random_style_batches_resize_every_canvas_to_the_model_input(tiny_run):
    """Canvases of 48-128 px reach the model as the processor would give them, with labels on its grid."""
    processor = AutoProcessor.from_pretrained(tiny_run[0])  # 32-px model, 4x4 patch grid
    from llava_lens.toy.scenes import random_style
    seeds = [s for s in range(40) if random_style(s).size != 32][:6]
    images = [make_scene(s, random_style(s)).image for s in seeds]
    assert len({im.shape[0] for im in images}) > 2
    ours = pixels(images, 32)
    theirs = processor.image_processor([Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (6, 3, 32, 32)
    assert np.abs((ours - theirs).numpy()).mean() < 0.01  # resampling filters differ only slightly (measured ~0.003)
    batch = PatchBatches(0, 5, random_style, 8, 32)[1]
    assert batch["pixel_values"].shape == (5, 3, 32, 32) and batch["labels"].shape == (5, 4, 16)
    qa = QABatches(processor, 0, 3, random_style)[1]
    n_image = (qa["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum(1)
    assert qa["pixel_values"].shape[1:] == (3, 32, 32) and (n_image == 16).all()


def test_patch_labels_on_a_larger_canvas_match_the_downscaled_grid():
    """A 128-px scene labelled on the 8x8 grid of a 64-px model: label = object covering most of the cell."""
    style = Style(size=128)
    scene = next(s for s in (make_scene(k, style) for k in range(50)) if len(s.objects) >= 3)
    shape = patch_labels(scene, 8, 64)[0]
    for obj in scene.objects:
        r, c = int(obj.center[1]) // 16, int(obj.center[0]) // 16
        assert SHAPES[shape[r * 8 + c]] == obj.shape
    covered = np.zeros(64, bool)
    for obj in scene.objects:
        covered |= obj.mask.reshape(8, 16, 8, 16).any((1, 3)).reshape(-1)
    assert (shape[~covered] == len(SHAPES)).all()


def test_attribute_words_weigh_more_and_the_loss_is_their_weighted_mean(tiny_run):
    """``answer_weight`` lands on the attribute words only; the loss is a hand-computed weighted mean."""
    out, _ = tiny_run
    processor = AutoProcessor.from_pretrained(out)
    batch = QABatches(processor, 3, 2, Style(size=32), answer_weight=5.0)[4]
    tok = processor.tokenizer
    for ids, labels, weights in zip(batch["input_ids"], batch["labels"], batch["weights"]):
        answer = [(tok.convert_ids_to_tokens(int(t)), float(w)) for t, y, w in zip(ids, labels, weights) if y != -100]
        assert answer and all(w == (5.0 if word in ATTRIBUTE_WORDS else 1.0) for word, w in answer), answer
        assert float(weights[labels == -100].abs().sum()) == 0.0
    assert (batch["weights"] == 5.0).sum() >= len(batch["scene_index"])  # every answer names something
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"][batch["scene_index"]]).logits
        ours = qa_loss(model, batch)
    expected, total = 0.0, 0.0
    for seq, labels, weights in zip(logits.log_softmax(-1), batch["labels"], batch["weights"]):
        for t in range(1, labels.shape[0]):
            if labels[t] != -100:  # the token at t is predicted at t - 1
                expected -= float(weights[t]) * float(seq[t - 1, labels[t]])
                total += float(weights[t])
    torch.testing.assert_close(ours.item(), expected / total, rtol=1e-5, atol=1e-6)


def test_a_type_named_twice_in_extra_is_asked_twice_more(tiny_run):
    processor = AutoProcessor.from_pretrained(tiny_run[0])
    n_qas = [len(make_scene(s, Style(size=32)).qas) for s in (0, 1, 2)]
    twice = QABatches(processor, 0, 3, Style(size=32), extra=("count", "count"))[0]
    assert twice["scene_index"].tolist() == [k for k, n in enumerate(n_qas) for _ in range(n + 2)]
    count_id = processor.tokenizer.convert_tokens_to_ids("many")  # "how many objects are there ?"
    per_scene = [int((twice["input_ids"][twice["scene_index"] == k] == count_id).any(1).sum()) for k in range(3)]
    assert per_scene == [3, 3, 3]


def test_lm_heads_sets_the_head_count_and_keeps_the_initial_weights(tmp_path):
    """``--lm-heads`` changes only how d_model is split: same seed, same initial parameters."""
    plain = _run(tmp_path / "a", 0, vision_steps=0)
    wide = _run(tmp_path / "b", 0, "--lm-heads", "4", vision_steps=0)
    assert plain["sizes"]["n_heads"] == 2 and wide["sizes"]["n_heads"] == 4
    a = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a")
    b = LlavaForConditionalGeneration.from_pretrained(tmp_path / "b")
    assert b.config.text_config.num_attention_heads == 4
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
