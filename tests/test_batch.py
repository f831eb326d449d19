"""Batched tracing: each trace of a batch equals the example's own single trace; batched sweeps."""

import numpy as np
import pytest
import torch
from PIL import Image

from llava_lens import cli, sweep

QUESTIONS = ["what color is the circle ?", "how many ?", "is there a big red square on the left side of it ?"]


def _assert_same_trace(batched, single):
    assert batched.token_ids == single.token_ids and batched.text == single.text
    assert batched.stop_reason == single.stop_reason
    assert torch.equal(batched.prompt_ids, single.prompt_ids) and batched.prompt_tokens == single.prompt_tokens
    assert torch.equal(batched.vision_span.positions, single.vision_span.positions)
    assert batched.prompt == single.prompt and batched.info == single.info
    for b, s in zip(batched.steps, single.steps):
        assert (b.index, b.position, b.token) == (s.index, s.position, s.token)
        assert b.attention.shape == s.attention.shape == (single.info.n_layers, single.info.n_heads,
                                                           len(single.prompt_ids) + s.index)
        torch.testing.assert_close(b.attention, s.attention, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.resid, s.resid, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.logits, s.logits, atol=1e-5, rtol=0)
        assert torch.equal(b.top_ids, s.top_ids)


def test_trace_batch_equals_single_traces(lens, monkeypatch):
    rng = np.random.default_rng(3)
    images = [(rng.random((40 + 8 * i, 56, 3)) * 255).astype("uint8") for i in range(3)]
    # Make "no" an end-of-sequence token so the examples stop at different steps (the random tiny
    # model never emits its real EOS): finished rows keep stepping on pad but record nothing.
    no = lens.tokenizer.convert_tokens_to_ids("no")
    monkeypatch.setattr(lens, "eos_token_ids", lens.eos_token_ids | {no})
    # float32 rows: the 1e-5 comparison is of the computation, not of fp16 storage rounding
    batched = lens.trace_batch(images, QUESTIONS, max_new_tokens=6, attention_dtype=torch.float32)
    singles = [lens.trace(image, q, max_new_tokens=6, attention_dtype=torch.float32)
               for image, q in zip(images, QUESTIONS)]
    assert len({len(t.prompt_ids) for t in singles}) == 3  # three different pad lengths
    assert len({len(t) for t in singles}) > 1, [t.tokens for t in singles]  # stopped at different steps
    assert "eos" in {t.stop_reason for t in singles}
    for b, s in zip(batched, singles):
        _assert_same_trace(b, s)


def test_trace_batch_checks_its_arguments(lens, image):
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        lens.trace_batch([image, image], ["a ?"])
    (one,) = lens.trace_batch([image], "what ?", max_new_tokens=2)  # one question for all
    _assert_same_trace(one, lens.trace(image, "what ?", max_new_tokens=2))


def _rows(out):
    return sorted(sweep.read_rows(out).to_pylist(), key=lambda r: r["id"])


def test_batched_sweep_gives_the_same_rows(llava_dir, tmp_path, capsys):
    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(5)
    for i in range(5):
        Image.fromarray((rng.random((24 + 4 * i, 30, 3)) * 255).astype("uint8")).save(data / f"img_{i}.png")
    (data / "img_2b.png").write_bytes(b"not a png at all")  # corrupt: an error row mid-batch
    (tmp_path / "m.csv").write_text("image,question\n" + "".join(
        f"imgs/{p.name},{q}\n" for p, q in zip(sorted(data.iterdir()), QUESTIONS * 2)))
    results = {}
    for size in (1, 3):
        out = tmp_path / f"out{size}"
        argv = ["sweep", str(tmp_path / "m.csv"), "--question-column", "question", "--out", str(out),
                "--model", str(llava_dir), "--device", "cpu", "--max-new-tokens", "3",
                "--batch-size", str(size), "--no-progress"]
        assert cli.main(argv) == 0
        results[size] = _rows(out)
    assert "6 analysed (1 errors)" in capsys.readouterr().out
    one, three = results[1], results[3]
    assert [r["id"] for r in one] == [r["id"] for r in three] and len(one) == 6
    for a, b in zip(one, three):
        # same error (PIL's message ends with an object address that differs between runs)
        assert (a["error"] or "").split(" at 0x")[0] == (b["error"] or "").split(" at 0x")[0]
        for key in ("answer", "tokens", "n_tokens", "token_ranks", "emergence", "emergence_first", "question"):
            assert a[key] == b[key], key
        for key in ("token_probs", "vision_share"):
            if a[key] is not None:
                np.testing.assert_allclose(np.array(a[key], float), np.array(b[key], float), atol=1e-5, rtol=0)
    assert sum(r["error"] is not None for r in three) == 1
