"""A corpus of bad inputs and faults (issue #16): each gives a correct result or a one-line llava_lens error.

Categories: lost/duplicated sweep rows (concurrent runs, shard names), corrupt shards, code and
pickle in model folders, memory bombs, silently wrong images, sweep arguments, context length,
changed options on resume, network hangs, bad question text, bad weights.
"""

import io
import json
import os
import shutil
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

import llava_lens as ll
from llava_lens import sweep
from llava_lens.errors import ImageError, LlavaLensError, ModelLoadError, PromptError

Q = "what color ?"


def _one_line(err, cls=LlavaLensError):
    assert isinstance(err.value, cls), type(err.value)
    msg = str(err.value)
    assert msg and "\n" not in msg and "object at 0x" not in msg, msg
    return msg


def _png_header(width, height):
    """A PNG whose header claims ``width`` x ``height`` (no pixel data): how a bomb looks before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---- 4. memory bombs: refused from the header, before any large allocation ---------------------

@pytest.mark.parametrize("make, match", [
    (lambda: _png(Image.new("L", (100000, 1))), "aspect ratio"),        # 100000x1, a few hundred bytes
    (lambda: _png(Image.new("L", (1, 400000))), "aspect ratio"),        # 1x400000
    (lambda: _png_header(12000, 12000), "over the limit"),              # 144 Mpx: our limit, not PIL's error
    (lambda: _png_header(20000, 20000), "over the limit"),              # 400 Mpx: PIL's DecompressionBombError
    (lambda: _png_header(0, 10), "cannot read|empty"),
    (lambda: np.zeros((1, 300, 3), np.uint8), "aspect ratio"),
    (lambda: Image.new("RGB", (5000, 10)), "aspect ratio"),
])
def test_memory_bombs_are_refused_before_decoding(make, match):
    import re
    with pytest.raises(ImageError) as err:
        ll.load_image(make())
    assert re.search(match, _one_line(err))


def test_image_bomb_file_in_a_sweep_is_an_error_row(lens, tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    (data / "bomb.png").write_bytes(_png_header(20000, 20000))
    Image.new("RGB", (20, 20), (200, 0, 0)).save(data / "ok.png")
    counts = sweep.run_sweep(lens, sweep.iter_examples(data, Q), tmp_path / "out", max_new_tokens=1,
                             progress=False)
    assert counts["errors"] == 1
    rows = {r["id"]: r for r in sweep.read_rows(tmp_path / "out").to_pylist()}
    assert rows["bomb.png"]["error"].startswith("ImageError: ") and rows["ok.png"]["error"] is None


# ---- 5. silently wrong images: fixed dtype/range rules, or an error ---------------------------

@pytest.mark.parametrize("array, gray", [
    (np.full((4, 4), 30, np.uint8), 30),
    (np.full((4, 4), 30, np.int64), 30),                   # a dark 0-255 int image stays dark
    (np.full((4, 4), 1, np.int32), 1),                     # ...even when its max is 1
    (np.full((4, 4), 30 * 257, np.uint16), 30),            # 16-bit
    (np.full((4, 4), 0.5, np.float32), 128),
    (np.full((4, 4), 0.01, np.float64), 3),                # a dark float image is not rescaled
    (np.full((4, 4, 3), True), 255),
    (np.full((4, 4, 1), 0.0, np.float16), 0),
])
def test_array_dtype_rules(array, gray):
    assert ll.load_image(array).getpixel((0, 0)) == (gray, gray, gray)


@pytest.mark.parametrize("array, match", [
    (np.full((4, 4), np.nan, np.float32), "NaN or infinite"),
    (np.full((4, 4), np.inf), "NaN or infinite"),
    (np.full((4, 4), 200.0), r"\[0, 1\]"),                  # 0-255 floats are not guessed
    (np.full((4, 4), -0.5), r"\[0, 1\]"),
    (np.full((4, 4), 300, np.int32), "0..255"),
    (np.full((4, 4), -1, np.int8), "0..255"),
    (np.full((4, 4), 5, np.uint32) * 100000, "0..255"),
    (np.array([[object()] * 2] * 2), "dtype object"),
    (np.zeros((4, 4), np.complex64), "dtype complex64"),
    (np.full((4, 4), "a"), "dtype <U1"),
    (np.zeros((3, 8, 8), np.uint8), "must be HxW"),         # channels first
    (np.zeros((2, 2, 2, 3), np.uint8), "must be HxW"),
])
def test_array_values_out_of_policy(array, match):
    import re
    with pytest.raises(ImageError) as err:
        ll.load_image(array)
    assert re.search(match, _one_line(err))


def test_pil_modes_and_16_bit_files():
    sixteen = Image.open(io.BytesIO(_png(Image.fromarray(np.full((4, 4), 100 * 257, np.uint16)))))
    assert sixteen.mode.startswith("I;16") and ll.load_image(sixteen).getpixel((0, 0)) == (100, 100, 100)
    assert ll.load_image(_png(Image.fromarray(np.full((4, 4), 40 * 257, np.uint16)))).getpixel((1, 1)) == (40,) * 3
    assert ll.load_image(Image.fromarray(np.full((4, 4), 0.25, np.float32))).getpixel((0, 0)) == (64,) * 3  # "F"
    assert ll.load_image(Image.fromarray(np.full((4, 4), 7, np.int32))).getpixel((0, 0)) == (7,) * 3      # "I"
    with pytest.raises(ImageError):
        ll.load_image(Image.fromarray(np.full((4, 4), 3.0, np.float32)))
    with pytest.raises(ImageError):
        ll.load_image(Image.fromarray(np.full((4, 4), np.nan, np.float32)))


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert ll.load_image(buf.getvalue()).size == (20, 40)


@pytest.mark.parametrize("bad, match", [
    (io.BytesIO(b"junk junk"), "the image stream"),
    (b"GIF89a" + b"\x00" * 5, "cannot read the image data"),
    (bytearray(b"\x00\x01"), "cannot read the image data"),
    (None, "unsupported image type NoneType"),
    ([[0, 1], [2, 3]], "unsupported image type list"),
])
def test_bad_image_objects(bad, match):
    with pytest.raises(ImageError) as err:
        ll.load_image(bad)
    assert match in _one_line(err)


def test_folder_as_image(tmp_path):
    with pytest.raises(ImageError) as err:
        ll.load_image(tmp_path)
    assert "is a folder" in _one_line(err)


# ---- 10. question text ------------------------------------------------------------------------

@pytest.mark.parametrize("question, match", [
    (123, "must be a string, got int"), (["what", "?"], "must be a string, got list"),
    (None, "must be a string, got NoneType"), (b"what ?", "must be a string, got bytes"),
    ("what \udc80 ?", "not valid text"), ("\t\n ", "empty"),
])
def test_bad_questions(lens, image, question, match):
    with pytest.raises(PromptError) as err:
        lens.prepare(image, question)
    assert match in _one_line(err)


@pytest.mark.parametrize("typed", ["<s>", "</s>", "what </s> is <s>", "<pad> <unk>"])
def test_special_token_text_stays_literal(lens, image, typed):
    tok = lens.processor.tokenizer
    inputs, span = lens.prepare(image, f"{typed} color ?")
    plain, _ = lens.prepare(image, "color ?")
    ids = inputs.input_ids[0].tolist()
    # the word tokenizer spells text it does not know as <unk>: not counted
    special = set(tok.all_special_ids) - {lens.config.image_token_id, tok.unk_token_id}
    # as many special ids as in a prompt without the typed text: the typed text did not become one
    assert sum(i in special for i in ids) == sum(i in special for i in plain.input_ids[0].tolist())
    assert len(span) == int((inputs.input_ids == lens.config.image_token_id).sum())
    assert len(lens.trace(image, f"{typed} color ?", max_new_tokens=2).steps) >= 1


# ---- 3 + 10. model folders: no code, no pickle, bad weights are one line ----------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_auto_map_code_is_never_run(llava_dir, tmp_path):
    model = _copy(llava_dir, tmp_path / "m")
    marker = tmp_path / "ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForImageTextToText": "evil.Model"}
    (model / "config.json").write_text(json.dumps(cfg))
    lens2 = ll.load(str(model), device="cpu")
    assert lens2.n_layers >= 1 and not marker.exists()


def _weights(model):
    return model / "model.safetensors"


def _drop_tensor(model):
    tensors = load_file(_weights(model))
    del tensors[sorted(tensors)[3]]
    save_file(tensors, _weights(model), metadata={"format": "pt"})


def _shrink_tensor(model):
    tensors = load_file(_weights(model))
    name = next(k for k in sorted(tensors) if tensors[k].ndim == 2)
    tensors[name] = tensors[name][:-1].contiguous()
    save_file(tensors, _weights(model), metadata={"format": "pt"})


def _pickle_only(model):
    import torch
    torch.save(load_file(_weights(model)), model / "pytorch_model.bin")
    _weights(model).unlink()


@pytest.mark.parametrize("damage, match", [
    (lambda m: _weights(m).write_bytes(_weights(m).read_bytes()[:4000]), "cannot load the weights"),
    (lambda m: _weights(m).write_bytes(_weights(m).read_bytes()[: _weights(m).stat().st_size // 2]),
     "cannot load the weights"),
    (lambda m: _weights(m).write_bytes(b""), "cannot load the weights"),
    (lambda m: _weights(m).write_bytes(os.urandom(5000)), "cannot load the weights"),
    (_drop_tensor, "lack 1 tensors"),
    (_shrink_tensor, "do not fit its config"),
    (_pickle_only, "only pickle weights \\(pytorch_model.bin\\).*save_pretrained"),
    (lambda m: _weights(m).unlink(), "no weights"),
])
def test_bad_weights_are_one_line(llava_dir, tmp_path, damage, match):
    import re
    model = _copy(llava_dir, tmp_path / "m")
    damage(model)
    with pytest.raises(ModelLoadError) as err:
        ll.load(str(model), device="cpu")
    assert re.search(match, _one_line(err))


# ---- 9. network: a hub that never answers, and a name that does not resolve -------------------

@pytest.fixture
def silent_hub(monkeypatch):
    """An HF_ENDPOINT on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("LLAVA_LENS_HUB_TIMEOUT", "1")
    yield
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_hub_that_never_answers_times_out(silent_hub):
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        ll.load("nobody/never-answers", device="cpu")
    assert time.monotonic() - start < 30  # bounded (1 s timeout); without it this hangs for ever
    assert "cannot reach the hub" in _one_line(err) and "not in the local cache" in str(err.value)


def test_unresolvable_hub_host(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://no-such-host.invalid")
    with pytest.raises(ModelLoadError) as err:
        ll.load("nobody/no-dns", device="cpu")
    assert "cannot reach the hub" in _one_line(err)
