"""Data-parallel sweeps: torchrun with 2 CPU processes equals 1 process; a killed rank recovers on re-run.

The torchrun tests start real worker processes (``python -m torch.distributed.run --standalone``,
a free rendezvous port each time) on a tiny random model and 8 small images.
"""

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import llava_lens as ll
from llava_lens import cli, sweep
from llava_lens.errors import UnsupportedModelError

N_IMAGES = 8
FLOAT_COLUMNS = ("token_probs", "vision_share")
EXACT_COLUMNS = ("id", "question", "answer", "tokens", "token_ranks", "emergence", "emergence_first",
                 "n_tokens", "error")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp") / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(N_IMAGES):
        Image.fromarray((rng.random((24, 30, 3)) * 255).astype("uint8")).save(folder / f"img_{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def reference(lens, data, tmp_path_factory):
    """Rows of the 1-process sweep, by id."""
    out = tmp_path_factory.mktemp("ddp") / "one"
    sweep.run_sweep(lens, sweep.iter_examples(data, "what color ?"), out, max_new_tokens=2, progress=False)
    return {r["id"]: r for r in sweep.read_rows(out).to_pylist()}


def _torchrun(data, out, model):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "llava_lens.cli", "sweep", str(data), "--question", "what color ?", "--out", str(out),
            "--model", str(model), "--device", "cpu", "--max-new-tokens", "2", "--shard-size", "1",
            "--no-progress"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _assert_same_rows(out, reference):
    rows = sweep.read_rows(out).to_pylist()
    ids = [r["id"] for r in rows]
    assert Counter(ids) == Counter(list(reference))  # same ids, none lost, none duplicated
    for row in rows:
        ref = reference[row["id"]]
        assert {k: row[k] for k in EXACT_COLUMNS} == {k: ref[k] for k in EXACT_COLUMNS}
        for key in FLOAT_COLUMNS:
            np.testing.assert_allclose(np.array(row[key]), np.array(ref[key]), atol=1e-5, rtol=0)


def test_torchrun_two_processes_equal_one(llava_dir, data, reference, tmp_path, capsys):
    out = tmp_path / "two"
    done = subprocess.run(_torchrun(data, out, llava_dir), env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for rank in (0, 1):
        assert f"sweep [rank {rank}/2]: " in done.stdout
    assert {p.name.split("-")[1] for p in sweep.shard_files(out)} == {"0", "1"}  # both ranks wrote
    _assert_same_rows(out, reference)
    assert cli.main(["summary", str(out)]) == 0  # summary reads every rank's shards
    assert f"examples                       {N_IMAGES}" in capsys.readouterr().out


def _workers(parent):
    """``{rank: pid}`` of torchrun's worker processes (children of ``parent``), from /proc."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != parent:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = next((e[5:] for e in environ if e.startswith(b"RANK=")), None)
        if rank is not None:
            found[int(rank)] = int(stat.parent.name)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker pids in /proc")
def test_killed_rank_recovers_on_rerun(llava_dir, data, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = _torchrun(data, out, llava_dir)
    # kill the rank with more examples, as soon as its first shard is written
    share = Counter(int(not sweep.is_mine(p.name, 0, 2)) for p in data.iterdir())
    victim = share.most_common(1)[0][0]
    agent = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while not list(out.glob(f"part-{victim}-*.parquet")) and agent.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    workers = _workers(agent.pid)
    os.kill(workers[victim], signal.SIGKILL)
    assert agent.wait(timeout=60) != 0  # torchrun reports the failure and stops the other rank
    for pid in workers.values():
        with pytest.raises(ProcessLookupError):  # no worker left behind
            os.kill(pid, 0)
    partial = sweep.read_rows(out).column("id").to_pylist()
    assert 1 <= len(partial) < N_IMAGES and len(partial) == len(set(partial)), "kill should land mid-run"
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sum(int(n) for n in re.findall(r"(\d+) already done", done.stdout)) == len(partial)
    _assert_same_rows(out, reference)
    assert not list(out.glob("*.tmp"))


def test_resume_with_another_world_size(lens, data, reference, tmp_path):
    out = tmp_path / "mixed"
    examples = lambda: sweep.iter_examples(data, "what color ?")  # noqa: E731
    first = sweep.run_sweep(lens, examples(), out, max_new_tokens=2, rank=1, world_size=2, progress=False)
    assert first["done"] == sum(sweep.is_mine(p.name, 1, 2) for p in data.iterdir())
    counts = [sweep.run_sweep(lens, examples(), out, max_new_tokens=2, rank=r, world_size=3, progress=False)
              for r in range(3)]
    assert sum(c["done"] for c in counts) == N_IMAGES - first["done"]
    assert sum(c["skipped"] for c in counts) == first["done"]  # done ids of any rank are skipped
    _assert_same_rows(out, reference)


def test_limit_is_global_across_ranks(lens, data, tmp_path):
    out = tmp_path / "limited"
    for rank in (0, 1):
        sweep.run_sweep(lens, sweep.iter_examples(data, "q"), out, limit=3, max_new_tokens=1, rank=rank,
                        world_size=2, progress=False)
    assert sorted(sweep.read_rows(out).column("id").to_pylist()) == [f"img_{i:02d}.png" for i in range(3)]


def test_launch_context():
    assert sweep.launch_context({}) == sweep.LaunchContext(0, 1, 0)
    ctx = sweep.launch_context({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.tag()) == (5, 8, 1, "rank 5/8")
    assert sweep.launch_context({"RANK": "2", "WORLD_SIZE": "4"}).local_rank == 2
    for bad in ({"RANK": "4", "WORLD_SIZE": "4"}, {"WORLD_SIZE": "two"}):
        with pytest.raises(sweep.SweepError):
            sweep.launch_context(bad)


@pytest.mark.parametrize("extra, expected", [
    (["--device-map", "auto"], {"device": None, "device_map": "auto"}),
    (["--n-devices", "2"], {"device": None, "n_devices": 2}),
    (["--device", "cpu"], {"device": "cpu"}),
])
def test_sharding_options_reach_load(extra, expected, monkeypatch, tmp_path, data):
    seen = {}

    def fake_load(model, device=None, dtype=None, **kwargs):
        seen.update(device=device, **kwargs)
        raise UnsupportedModelError("stop here")

    monkeypatch.setattr(ll, "load", fake_load)
    assert cli.main(["sweep", str(data), "--question", "q", "--out", str(tmp_path / "o"), *extra]) == 2
    assert seen == expected


def test_device_and_device_map_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sweep", "d", "--question", "q", "--out", "o", "--device", "cpu", "--device-map", "auto"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
