"""Sweep faults (issue #16): concurrent runs, shard names, corrupt shards, changed options, crashes, bad manifests.

Each gives a correct result or a one-line SweepError, and no case loses or duplicates a finished row.
"""

import json
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from llava_lens import sweep
from llava_lens.errors import SweepError
from llava_lens.sweep import lock, state

Q = "what color ?"


def _one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, msg
    return msg


# ---- 6 + 8. sweep arguments and changed options on resume ------------------------------------

def _folder(tmp_path, n=3):
    data = tmp_path / "imgs"
    data.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((16, 20, 3)) * 255).astype("uint8")).save(data / f"img_{i}.png")
    return data


@pytest.mark.parametrize("kwargs, match", [
    ({"limit": -1}, "limit must be >= 0"), ({"batch_size": 0}, "batch size must be >= 1"),
    ({"max_new_tokens": 0}, "max new tokens must be >= 1"), ({"max_new_tokens": -1}, "max new tokens"),
    ({"max_new_tokens": 2.5}, "must be an integer"), ({"shard_size": 0}, "shard size"),
    ({"rank": 2, "world_size": 2}, "outside a world of 2"), ({"limit": "3"}, "must be an integer"),
])
def test_impossible_sweep_arguments(lens, tmp_path, kwargs, match):
    data = _folder(tmp_path, 1)
    with pytest.raises(SweepError) as err:
        sweep.run_sweep(lens, sweep.iter_examples(data, Q), tmp_path / "o", progress=False, **kwargs)
    assert match in _one_line(err)
    assert not (tmp_path / "o").exists()  # refused before touching the output folder


def test_changed_question_or_options_on_resume_are_refused(lens, tmp_path):
    data, out = _folder(tmp_path), tmp_path / "out"
    sweep.run_sweep(lens, sweep.iter_examples(data, Q), out, max_new_tokens=1, limit=2, progress=False,
                    options={"question": Q})
    with pytest.raises(SweepError) as err:  # a different question, caught from the rows themselves
        sweep.run_sweep(lens, sweep.iter_examples(data, "how many ?"), out, max_new_tokens=1, progress=False)
    assert "how many ?" in _one_line(err) and "--force" in str(err.value)
    with pytest.raises(SweepError) as err:  # ... and from the stored options
        sweep.run_sweep(lens, sweep.iter_examples(data, Q), out, max_new_tokens=3, progress=False)
    assert "max_new_tokens=1" in _one_line(err)
    with pytest.raises(SweepError):
        sweep.run_sweep(lens, sweep.iter_examples(data, Q), out, max_new_tokens=1, progress=False,
                        options={"question": "other"})
    assert len(sweep.read_rows(out)) == 2  # nothing written by the refused runs
    counts = sweep.run_sweep(lens, sweep.iter_examples(data, "how many ?"), out, max_new_tokens=1,
                             progress=False, force=True, options={"question": "how many ?"})
    assert counts["done"] == 1 and counts["skipped"] == 2
    assert json.loads((out / "sweep.json").read_text())["options"]["question"] == "how many ?"


def test_null_question_and_id_in_a_manifest(lens, tmp_path):
    _folder(tmp_path, 2)
    rows = [{"image": "imgs/img_0.png", "question": None}, {"image": "imgs/img_1.png", "question": Q}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    out = tmp_path / "out"
    counts = sweep.run_sweep(lens, sweep.iter_examples(tmp_path / "m.parquet", question_column="question"), out,
                             max_new_tokens=1, progress=False)
    assert counts["errors"] == 1
    by_id = {r["id"]: r for r in sweep.read_rows(out).to_pylist()}
    assert by_id["imgs/img_0.png#0"]["error"] == "PromptError: no question for this example (missing in the data)"
    assert by_id["imgs/img_0.png#0"]["question"] is None and by_id["imgs/img_1.png#1"]["error"] is None
    (tmp_path / "m.csv").write_text("id,image,question\n,imgs/img_0.png,hi ?\n")
    with pytest.raises(SweepError, match="row 0 of the data has no 'id'"):
        list(sweep.iter_examples(tmp_path / "m.csv", question_column="question"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SweepError, match="cannot read the manifest"):
        sweep.iter_examples(tmp_path / "bad.parquet", question_column="question")


# ---- 1. data loss: one run per folder, unique shard names ------------------------------------

def test_second_run_on_a_folder_is_refused_naming_the_owner(lens, tmp_path):
    data, out = _folder(tmp_path), tmp_path / "out"
    out.mkdir()
    with lock.joining(out):  # another run (its own run id) is sweeping into out
        other = lock.claim(out, 0, 1, "someone-else:1")
    (out / ".part-0-deadbeef-00000.tmp").write_bytes(b"being written by the other run")
    try:
        with pytest.raises(SweepError) as err:
            sweep.run_sweep(lens, sweep.iter_examples(data, Q), out, max_new_tokens=1, progress=False)
        msg = _one_line(err)
        assert "in use by another sweep" in msg and "someone-else:1" in msg and f"pid {os.getpid()}" in msg
        assert (out / ".part-0-deadbeef-00000.tmp").exists()  # its temp file is left alone
    finally:
        other.release()
    counts = sweep.run_sweep(lens, sweep.iter_examples(data, Q), out, max_new_tokens=1, progress=False)
    assert counts["done"] == 3 and not list(out.glob("*.tmp"))  # the owner is gone: leftovers cleaned


def test_shard_names_never_collide(tmp_path):
    rows = [dict.fromkeys(sweep.SCHEMA.names) | {"id": f"x{i}"} for i in range(4)]
    writers = [sweep.ShardWriter(tmp_path, rank=0, shard_size=1) for _ in range(2)]
    for i, row in enumerate(rows):
        writers[i % 2].add(row)  # two processes' writers, same rank, same shard numbers
    assert len(sweep.shard_files(tmp_path)) == 4
    assert Counter(sweep.read_rows(tmp_path).column("id").to_pylist()) == Counter(r["id"] for r in rows)


# ---- 2. corrupt shards: quarantined and redone on resume; skipped by summary -----------------

@pytest.mark.parametrize("corrupt", [
    lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),    # truncated
    lambda p: p.write_bytes(b""),                                           # empty
    lambda p: pq.write_table(pa.table({"x": [1, 2]}), p),                   # foreign parquet
    lambda p: pq.write_table(pa.table({"id": [1], "question": [2]}), p),    # foreign, with an id column
    lambda p: p.write_bytes(os.urandom(300)),                               # random
])
def test_corrupt_shard_is_quarantined_and_redone(lens, tmp_path, corrupt):
    data, out = _folder(tmp_path), tmp_path / "out"
    sweep.run_sweep(lens, sweep.iter_examples(data, Q), out, max_new_tokens=1, shard_size=2, progress=False)
    victim = sweep.shard_files(out)[0]
    lost = len(pq.read_table(victim))
    corrupt(victim)
    summary = sweep.summarize(out)  # reports the bad shard instead of failing
    assert summary["examples"] == 3 - lost and summary["unreadable_shards"][0].startswith(victim.name)
    with pytest.warns(sweep.SweepWarning, match=victim.name):
        assert len(sweep.read_rows(out)) == 3 - lost
    assert "unreadable shard" in sweep.format_summary(summary)
    counts = sweep.run_sweep(lens, sweep.iter_examples(data, Q), out, max_new_tokens=1, progress=False)
    assert counts["quarantined"] == 1 and counts["done"] == lost
    assert (out / "quarantine" / victim.name).exists()
    assert Counter(sweep.read_rows(out).column("id").to_pylist()) == Counter(f"img_{i}.png" for i in range(3))


def test_summary_counts_each_id_once(tmp_path):
    rows = [dict.fromkeys(sweep.SCHEMA.names) | {"id": i, "seconds": 1.0} for i in ("a", "b", "a")]
    pq.write_table(pa.Table.from_pylist(rows, schema=sweep.SCHEMA), tmp_path / "part-0-00000.parquet")
    summary = sweep.summarize(tmp_path)
    assert summary["examples"] == 2 and summary["duplicate_rows"] == 1


def test_no_rows_at_all(tmp_path):
    (tmp_path / "part-0-x.parquet").write_bytes(b"")
    with pytest.raises(SweepError, match="1 unreadable"):
        sweep.summarize(tmp_path)


# ---- 1. a row that crashes the process twice becomes an error row ----------------------------

def test_example_that_crashed_twice_is_an_error_row(lens, tmp_path, monkeypatch):
    data, out = _folder(tmp_path), tmp_path / "out"
    out.mkdir()
    journal = state.Journal(out)
    journal.record(["img_1.png", "img_1.png", "img_2.png"], "s")  # two deaths on img_1, one on img_2
    journal.record(["img_0.png"], "s")
    journal.record(["img_0.png"], "a")  # img_0 was interrupted by Ctrl-C: not a crash
    counts = sweep.run_sweep(lens, sweep.iter_examples(data, Q), out, max_new_tokens=1, batch_size=3,
                             progress=False)
    assert counts["done"] == 3 and counts["errors"] == 1
    rows = {r["id"]: r for r in sweep.read_rows(out).to_pylist()}
    assert rows["img_1.png"]["error"].startswith("ProcessCrash: the process died 2 times")
    assert rows["img_0.png"]["error"] is None and rows["img_2.png"]["error"] is None  # retried, alone


def test_ctrl_c_is_not_counted_as_a_crash(lens, tmp_path, monkeypatch):
    data, out = _folder(tmp_path, 1), tmp_path / "out"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("llava_lens.sweep.run.analyse", interrupted)
    for _ in range(3):
        with pytest.raises(KeyboardInterrupt):
            sweep.run_sweep(lens, sweep.iter_examples(data, Q), out, max_new_tokens=1, progress=False)
    assert state.Journal(out).crashes({"img_0.png"})["img_0.png"] == 0
    monkeypatch.undo()
    sweep.run_sweep(lens, sweep.iter_examples(data, Q), out, max_new_tokens=1, progress=False)
    assert sweep.read_rows(out).column("error").to_pylist() == [None]


def test_unwritable_output_folder(lens, tmp_path):
    data = _folder(tmp_path, 1)
    (tmp_path / "afile").write_text("a file, not a folder")
    with pytest.raises(SweepError) as err:
        sweep.run_sweep(lens, sweep.iter_examples(data, Q), tmp_path / "afile" / "out", progress=False)
    assert "cannot create the sweep folder" in _one_line(err)


def test_undecodable_file_name_and_question(lens, tmp_path):
    data, out = tmp_path / "imgs", tmp_path / "out"
    data.mkdir()
    Image.new("RGB", (16, 16), (0, 90, 0)).save(os.fsdecode(bytes(data) + b"/caf\xe9.png"))  # Latin-1 name
    question = os.fsdecode(b"what \xff ?")  # an argv that is not UTF-8 holds a lone surrogate
    for _ in range(2):  # the resume compares the stored question with the same text
        sweep.run_sweep(lens, sweep.iter_examples(data, question), out, max_new_tokens=1, progress=False)
    (row,) = sweep.read_rows(out).to_pylist()
    assert row["id"] == "caf\\udce9.png" and row["question"] == "what \\udcff ?"
    assert row["error"].startswith("PromptError: the question is not valid text")
