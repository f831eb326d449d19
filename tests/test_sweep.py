"""Sweeps: data sources and stable ids, rank split, error rows, atomic shards, resume after SIGKILL."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from llava_lens import cli, sweep


def _images(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"sub/img_{i:02d}.png" if i % 2 else f"img_{i:02d}.png"
        Image.fromarray((rng.random((24, 30, 3)) * 255).astype("uint8")).save(folder / name)
        names.append(name)
    return names


def test_emergence_layers():
    ranks = torch.tensor([[0, 3, 1, 0], [2, 0, 0, 1], [0, 0, 0, 0]])  # [L=3, S=4]
    assert sweep.emergence_layers(ranks) == [2, 1, 1, 2]
    assert sweep.emergence_layers(torch.tensor([[0], [1]])) == [-1]


def test_is_mine_partitions_stably():
    ids = [f"images/{i}.png" for i in range(200)]
    owners = [[r for r in range(3) if sweep.is_mine(i, r, 3)] for i in ids]
    assert all(len(o) == 1 for o in owners)  # every id on exactly one rank
    assert 40 < sum(o == [0] for o in owners) < 95  # roughly balanced
    # golden values: the split must not depend on the process (PYTHONHASHSEED) or the run
    assert [o[0] for o in owners[:12]] == [2, 2, 2, 1, 1, 2, 0, 1, 2, 1, 0, 2]


def test_sources_give_stable_ids(tmp_path):
    names = _images(tmp_path / "imgs", 3)
    folder = list(sweep.iter_examples(tmp_path / "imgs", question="q ?"))
    assert [e.id for e in folder] == sorted(names) and all(e.question == "q ?" for e in folder)
    rows = [{"image": f"imgs/{n}", "question": f"what {i} ?", "answer": f"a{i}"} for i, n in enumerate(names)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    man = list(sweep.iter_examples(tmp_path / "m.parquet", question_column="question"))
    assert [e.id for e in man] == [f"imgs/{n}#{i}" for i, n in enumerate(names)]
    assert [e.target for e in man] == ["a0", "a1", "a2"] and man[1].question == "what 1 ?"
    assert man[0].image == tmp_path / "imgs" / names[0]
    (tmp_path / "m.csv").write_text(f"id,image,question\nx1,imgs/{names[0]},hi ?\n")
    (csv_ex,) = sweep.iter_examples(tmp_path / "m.csv", question_column="question")
    assert (csv_ex.id, csv_ex.question, csv_ex.target) == ("x1", "hi ?", None)
    with pytest.raises(sweep.SweepError, match="question column 'nope'"):
        list(sweep.iter_examples(tmp_path / "m.csv", question_column="nope"))


def test_saved_dataset_source(tmp_path):
    from datasets import DatasetDict

    from llava_lens.toy.data import to_dataset

    DatasetDict(train=to_dataset(1)).save_to_disk(str(tmp_path / "dd"))
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    examples = list(sweep.iter_examples(tmp_path / "dd" / "train", question_column="question"))
    assert [e.id for e in examples] == [str(i) for i in range(len(examples))]
    assert examples[0].target and isinstance(examples[0].image(), bytes)  # read lazily
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == files  # no cache files written
    with pytest.raises(sweep.SweepError, match="several splits \\(train\\)"):
        sweep.iter_examples(tmp_path / "dd", question_column="question")


def test_bad_examples_become_error_rows(lens, tmp_path):
    data = tmp_path / "imgs"
    _images(data, 2)
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (data / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    counts = sweep.run_sweep(lens, sweep.iter_examples(data, "what color ?"), out, max_new_tokens=2,
                             shard_size=3, progress=False)
    assert counts == {"done": 4, "skipped": 0, "errors": 2, "quarantined": 0}
    rows = {r["id"]: r for r in sweep.read_rows(out).to_pylist()}
    for bad in ("corrupt.png", "empty.jpg"):
        assert rows[bad]["error"].startswith("ImageError: ") and "\n" not in rows[bad]["error"]
        assert rows[bad]["answer"] is None
    good = rows["img_00.png"]
    n_layers = lens.n_layers
    assert good["error"] is None and good["n_tokens"] == len(good["tokens"]) == 2
    assert [len(p) for p in good["token_probs"]] == [n_layers + 1] * 2
    assert [len(r) for r in good["token_ranks"]] == [n_layers + 1] * 2
    assert all(r[-1] == 0 for r in good["token_ranks"])  # greedy: the last layer's top-1 is the token
    assert good["emergence_first"] == good["emergence"][0] and len(good["vision_share"]) == n_layers
    assert all(0 <= v <= 1 for v in good["vision_share"])


def test_limit_stale_tmp_and_duplicate_ids(lens, tmp_path):
    data = tmp_path / "imgs"
    _images(data, 4)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".part-0-00000.tmp").write_bytes(b"half a shard")  # as left by a kill during a write
    sweep.run_sweep(lens, sweep.iter_examples(data, "q"), out, limit=2, max_new_tokens=1, progress=False)
    assert not list(out.glob("*.tmp")) and len(sweep.read_rows(out)) == 2
    again = sweep.run_sweep(lens, sweep.iter_examples(data, "q"), out, limit=3, max_new_tokens=1,
                            progress=False)
    assert again == {"done": 1, "skipped": 2, "errors": 0, "quarantined": 0}
    dup = [sweep.Example("same", data / "img_00.png", "q"), sweep.Example("same", data / "img_02.png", "q")]
    sweep.run_sweep(lens, iter(dup), out, max_new_tokens=1, progress=False)
    ids = sweep.read_rows(out).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 4


def test_summary_with_targets(lens, tmp_path):
    names = _images(tmp_path / "imgs", 3)
    first = lens.trace(tmp_path / "imgs" / names[0], "what ?", max_new_tokens=2).text
    rows = [{"image": f"imgs/{n}", "answer": first if i == 0 else "definitely wrong"}
            for i, n in enumerate(names)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    out = tmp_path / "out"
    sweep.run_sweep(lens, sweep.iter_examples(tmp_path / "m.parquet", "what ?"), out, max_new_tokens=2,
                    progress=False)
    summary = sweep.summarize(out)
    assert summary["examples"] == 3 and summary["errors"] == 0
    assert summary["accuracy_n"] == 3 and summary["accuracy"] >= 1 / 3
    assert len(summary["vision_share_by_layer"]) == lens.n_layers
    assert "mean_emergence_first" in sweep.format_summary(summary)
    from llava_lens.views.summary_plot import emergence_figure, plot_summary, vision_share_figure

    assert emergence_figure(summary).axes[0].patches and vision_share_figure(summary).axes[0].lines
    assert all(p.stat().st_size > 0 for p in plot_summary(summary, out))
    assert sweep.normalize_answer("The  Circle is RED.") == "circle is red"


def _sweep_cmd(data, out, model):
    return [sys.executable, "-m", "llava_lens.cli", "sweep", str(data), "--question", "what color ?",
            "--out", str(out), "--model", str(model), "--device", "cpu", "--shard-size", "1",
            "--max-new-tokens", "2", "--no-progress"]


def _interrupt_after_new_shard(cmd, out, sig, env):
    """Start ``cmd``; send ``sig`` as soon as a shard beyond those present appears; return (rc, ids)."""
    before = len(list(out.glob("part-*.parquet")))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list(out.glob("part-*.parquet"))) <= before and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    return proc.wait(), sweep.read_rows(out).column("id").to_pylist()


def test_resume_after_sigkill_and_ctrl_c(llava_dir, tmp_path, capsys):
    data = tmp_path / "imgs"
    names = _images(data, 16)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = _sweep_cmd(data, out, llava_dir)
    rc, killed = _interrupt_after_new_shard(cmd, out, signal.SIGKILL, env)
    assert rc == -signal.SIGKILL and 1 <= len(killed) < len(names), "the kill should land mid-sweep"
    rc, interrupted = _interrupt_after_new_shard(cmd, out, signal.SIGINT, env)  # Ctrl-C
    assert rc == 130 and len(killed) < len(interrupted) < len(names)
    assert len(interrupted) == len(set(interrupted))
    # the final re-run in-process: same command line, and it spares a third interpreter start-up
    assert cli.main(cmd[3:]) == 0
    assert f"{len(interrupted)} already done" in capsys.readouterr().out
    ids = sweep.read_rows(out).column("id").to_pylist()
    assert Counter(ids) == Counter(names)  # complete, no duplicates
    assert not list(out.glob("*.tmp"))


def test_sweep_over_saved_dataset_with_a_corrupt_image(lens, tmp_path):
    import io

    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    good = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), dtype="uint8")).save(good, format="PNG")
    features = Features({"id": Value("string"), "image": ImageFeature(), "question": Value("string")})
    rows = [{"id": "good", "image": {"bytes": good.getvalue(), "path": None}, "question": "what ?"},
            {"id": "bad", "image": {"bytes": b"not an image", "path": None}, "question": "what ?"}]
    Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    examples = sweep.iter_examples(tmp_path / "ds", question_column="question")
    counts = sweep.run_sweep(lens, examples, tmp_path / "out", max_new_tokens=1, progress=False)
    assert counts == {"done": 2, "skipped": 0, "errors": 1, "quarantined": 0}
    errors = {r["id"]: r["error"] for r in sweep.read_rows(tmp_path / "out").to_pylist()}
    assert errors["good"] is None and errors["bad"].startswith("ImageError: cannot read the image data")


def test_concurrent_sweeps_into_one_folder(llava_dir, lens, tmp_path, capsys):
    data = tmp_path / "imgs"
    names = _images(data, 6)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_sweep_cmd(data, out, llava_dir), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not sweep.shard_files(out) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the first sweep should still be running"
        with pytest.raises(sweep.SweepError) as err:  # a second run into the same folder
            sweep.run_sweep(lens, sweep.iter_examples(data, "what color ?"), out, max_new_tokens=2,
                            shard_size=1, progress=False)
        assert "in use by another sweep" in str(err.value) and f"pid {proc.pid}" in str(err.value)
    finally:
        assert proc.wait(timeout=120) == 0
    assert Counter(sweep.read_rows(out).column("id").to_pylist()) == Counter(names)  # none lost or doubled
    # the CLI path: one line, exit status 2, while another run holds the folder
    with sweep.lock.joining(out):
        other = sweep.lock.claim(out, 0, 1, "another-run")
    try:
        assert cli.main(_sweep_cmd(data, out, llava_dir)[3:]) == 2
        err_lines = [line for line in capsys.readouterr().err.splitlines() if "in use" in line]
        assert len(err_lines) == 1 and "another-run" in err_lines[0]
    finally:
        other.release()


def test_batched_sweep_equals_one_at_a_time(lens, tmp_path):
    data = tmp_path / "imgs"
    _images(data, 3)
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = {}
    for batch in (1, 2):
        out = tmp_path / f"b{batch}"
        sweep.run_sweep(lens, sweep.iter_examples(data, "what color ?"), out, max_new_tokens=2, batch_size=batch,
                        progress=False)
        rows[batch] = {r["id"]: r for r in sweep.read_rows(out).to_pylist()}
    assert rows[1].keys() == rows[2].keys() and len(rows[1]) == 4
    for ex_id, one in rows[1].items():
        two = rows[2][ex_id]
        assert (one["answer"], one["tokens"], one["error"]) == (two["answer"], two["tokens"], two["error"])
        if one["error"] is None:
            np.testing.assert_allclose(one["token_probs"], two["token_probs"], atol=1e-4)
    assert rows[2]["corrupt.png"]["error"].startswith("ImageError: ")
