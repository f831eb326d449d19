"""Bad input gets a one-line llava_lens error; odd-but-valid input works; the VisionSpan is right."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

import llava_lens as ll
from llava_lens.toy.build import word_tokenizer

Q = "what color is the circle ?"


def _png(mode, size=(20, 30), color=None):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG" if mode != "CMYK" else "JPEG")
    return buf.getvalue()


def _noisy_png():
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((50, 50, 3)) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


def _one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("bad, match", [
    (b"\x00\x01not an image at all", "cannot read"),
    (_noisy_png()[:3000], "truncated"),                        # truncated PNG
    (np.zeros((0, 0, 3), dtype=np.uint8), "must be HxW"),    # 0x0 array
    (np.zeros((4, 4, 2), dtype=np.uint8), "must be HxW"),    # 2 channels
    ("/nonexistent/picture.png", "not found"),
    (12345, "unsupported image type"),
])
def test_bad_images_raise_image_error(lens, bad, match):
    with pytest.raises(ll.ImageError) as err:
        lens.trace(bad, Q, max_new_tokens=1)
    assert match in _one_line(err)


def test_non_image_file(lens, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, I am not an image")
    with pytest.raises(ll.ImageError) as err:
        lens.trace(path, Q, max_new_tokens=1)
    assert "notes.txt" in _one_line(err)


@pytest.mark.parametrize("make", [
    lambda: Image.new("RGBA", (30, 20), (255, 0, 0, 0)),  # fully transparent red -> white
    lambda: Image.new("L", (30, 20), 128),
    lambda: Image.open(io.BytesIO(_png("CMYK", color=(0, 255, 255, 0)))),
    lambda: Image.new("P", (30, 20)),
    lambda: np.full((1, 1, 3), 200, dtype=np.uint8),          # 1x1
    lambda: np.full((12, 9), 0.5, dtype=np.float32),          # float grayscale in [0, 1]
])
def test_odd_but_valid_images_work(lens, make):
    trace = lens.trace(make(), Q, max_new_tokens=2)
    assert trace.image.mode == "RGB" and len(trace.steps) >= 1


def test_rgba_is_composited_on_white_and_cmyk_converted():
    rgba = ll.load_image(Image.new("RGBA", (4, 4), (255, 0, 0, 0)))
    assert rgba.getpixel((0, 0)) == (255, 255, 255)
    opaque = ll.load_image(Image.new("RGBA", (4, 4), (255, 0, 0, 255)))
    assert opaque.getpixel((0, 0)) == (255, 0, 0)
    cmyk = ll.load_image(_png("CMYK", color=(0, 255, 255, 0)))  # red in CMYK
    r, g, b = cmyk.getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("question, match", [
    ("", "empty"), ("   ", "empty"), ("<image> what is it ?", "image placeholder"),
])
def test_bad_questions_raise_prompt_error(lens, image, question, match):
    with pytest.raises(ll.PromptError) as err:
        lens.trace(image, question, max_new_tokens=1)
    assert match in _one_line(err)


def test_prompt_uses_chat_template_and_falls_back_to_llava15(lens):
    assert lens.processor.chat_template
    assert ll.build_prompt(lens.processor, "hi ?") == "USER: <image>\nhi ? ASSISTANT:"

    class NoTemplate:
        chat_template = None
        image_token = "<image>"

    assert ll.build_prompt(NoTemplate(), "hi ?") == "USER: <image>\nhi ? ASSISTANT:"


def test_one_image_per_prompt(lens, image):
    inputs, span = lens.prepare(image, Q)
    assert int((inputs.input_ids == lens.config.image_token_id).sum()) == len(span)


def test_missing_path_and_unknown_names(tmp_path):
    with pytest.raises(ll.UnsupportedModelError) as err:
        ll.load(str(tmp_path / "nope"))
    assert "not found" in _one_line(err)
    with pytest.raises(ll.UnsupportedModelError) as err:
        ll.load(str(tmp_path))  # a directory without a config
    assert "config.json" in _one_line(err)


def test_text_only_model_is_refused(tmp_path):
    tok = word_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ll.UnsupportedModelError) as err:
        ll.load(str(tmp_path))
    msg = _one_line(err)
    assert "LlamaForCausalLM" in msg and "LlavaForConditionalGeneration" in msg


def test_unknown_architecture_is_refused(tmp_path, llava_dir):
    cfg = json.loads((llava_dir / "config.json").read_text())
    cfg["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ll.UnsupportedModelError) as err:
        ll.load(str(tmp_path))
    assert "Qwen2VLForConditionalGeneration" in _one_line(err)


def test_model_dir_without_processor_files(tmp_path, llava_dir):
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (tmp_path / name).write_bytes((llava_dir / name).read_bytes())
    with pytest.raises(ll.UnsupportedModelError) as err:
        ll.load(str(tmp_path))
    assert "processor" in _one_line(err)


def test_vision_span_positions_llava15(lens, image):
    inputs, span = lens.prepare(image, Q)
    expected = (inputs.input_ids[0] == lens.config.image_token_id).nonzero().flatten()
    assert torch.equal(span.positions, expected)
    g = lens.config.vision_config.image_size // lens.config.vision_config.patch_size
    assert span.grids == [(g, g)] and len(span) == g * g
    # row-major patch order, as CLIP flattens its patch grid
    assert span.row.tolist() == [i // g for i in range(g * g)]
    assert span.col.tolist() == [i % g for i in range(g * g)]
    grid = span.to_grid(torch.arange(len(span), dtype=torch.float32))
    assert grid[1, 2] == g + 2


def test_vision_span_boxes_follow_the_centre_crop(lens):
    # a wide image: the CLIP processor resizes the short side and crops the centre square
    _, span = lens.prepare(np.zeros((40, 80, 3), dtype=np.uint8), Q)
    top, left, bottom, right = span.boxes.T
    assert torch.allclose(left.min(), torch.tensor(0.25)) and torch.allclose(right.max(), torch.tensor(0.75))
    assert torch.allclose(top.min(), torch.tensor(0.0)) and torch.allclose(bottom.max(), torch.tensor(1.0))


@pytest.mark.parametrize("hw", [(40, 56), (100, 30), (32, 32)])
def test_vision_span_llava_next(next_lens, hw):
    inputs, span = next_lens.prepare(np.zeros((*hw, 3), dtype=np.uint8), Q)
    expected = (inputs.input_ids[0] == next_lens.config.image_token_id).nonzero().flatten()
    assert torch.equal(span.positions, expected)
    g = next_lens.config.vision_config.image_size // next_lens.config.vision_config.patch_size
    rows, cols = span.grids[1]
    # base grid first, then the anyres grid row by row, each row closed by a newline token
    assert (span.tile[: g * g] == 0).all()
    hi = span.tile[g * g:]
    assert len(hi) == rows * (cols + 1)
    assert (hi.view(rows, cols + 1)[:, -1] == -1).all() and (hi.view(rows, cols + 1)[:, :-1] == 1).all()
    # every patch position maps to a region inside the image; newlines to none
    patch = span.is_patch
    assert torch.isnan(span.boxes[~patch]).all()
    assert (span.boxes[patch] >= 0).all() and (span.boxes[patch] <= 1).all()
    # the anyres grid keeps the image's aspect ratio (unpadding removes the letterbox)
    assert abs(rows / cols - hw[0] / hw[1]) <= max(1 / cols, 1 / rows) * hw[0] / hw[1] + 1e-6
    # the high-res cells tile the image exactly once
    area = ((span.boxes[:, 2] - span.boxes[:, 0]) * (span.boxes[:, 3] - span.boxes[:, 1]))[span.tile == 1]
    assert torch.isclose(area.sum(), torch.tensor(1.0))
