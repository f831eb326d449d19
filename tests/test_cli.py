"""The ``llava-lens`` CLI end to end on a tiny random model: help, errors, trace, demo, sweep, summary."""

import json

import numpy as np
import pytest
from PIL import Image

from llava_lens import cli, sweep

COMMANDS = ("demo", "trace", "sweep", "summary", "report", "eval-grounding")


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """Run in an empty folder, so 'nothing written outside --out' can be checked."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "cat photo.png"
    Image.fromarray((np.random.default_rng(5).random((36, 48, 3)) * 255).astype("uint8")).save(path)
    return path


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", (None, *COMMANDS))
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: llava-lens" in text
    if command in ("demo", "trace", "sweep"):
        assert "--device" in text and "--dtype" in text and "--model" in text


@pytest.mark.parametrize("argv, message", [
    (["trace", "missing.png", "what ?"], "image file not found"),
    (["sweep", "nowhere", "--question", "q", "--out", "o"], "data not found"),
    (["summary", "."], "no sweep rows"),
    (["report", "."], "no saved trace"),
    (["trace", "{image}", "what ?", "--model", "no/such/dir/x"], "model not found"),
])
def test_bad_input_is_one_line_and_nonzero(argv, message, cwd, image_file, capsys):
    code, out, err = _run(capsys, *[a.replace("{image}", str(image_file)) for a in argv])
    assert code == 2 and message in err
    assert err.count("\n") == 1 and err.startswith("llava-lens: error:")
    assert list(cwd.iterdir()) == []  # nothing written


@pytest.mark.parametrize("argv", [
    ["sweep", "data", "--out", "o"],  # neither --question nor --question-column
    ["sweep", "data", "--question", "q", "--question-column", "c", "--out", "o"],
    ["trace", "image.png"],
    ["trace", "a.png", "q", "--dtype", "float64"],
    ["nope"],
])
def test_usage_errors_exit_2_in_one_line(argv, cwd, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "error:" in err
    assert list(cwd.iterdir()) == []


def test_trace_writes_views_and_report(llava_dir, image_file, cwd, capsys):
    out = cwd / "run"
    code, stdout, err = _run(capsys, "trace", image_file, "what color is the circle ?", "--model", llava_dir,
                             "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "3",
                             "--layers", "-1", "--out", out)
    assert code == 0 and str(out) in err
    for name in ("report.html", "trace.json", "logit_lens.png", "vision_share.png", "heatmaps/step_00.png",
                 "attention/layer_01.html"):
        assert (out / name).is_file(), name
    assert not (out / "attention/layer_00.html").exists()  # --layers -1: the last layer only
    meta = json.loads((out / "trace.json").read_text())
    assert stdout.strip() == meta["text"].strip() and len(meta["steps"]) <= 3
    assert any(k.startswith("summary.") for k in _safetensor_keys(out / "trace.safetensors"))
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]
    report = (out / "report.html").read_text()
    assert 'id="layer-1"' in report and 'id="layer-0"' not in report
    code, stdout, _ = _run(capsys, "report", out)  # regenerate from the saved views only
    assert code == 0 and stdout.strip() == str(out / "report.html")


def _safetensor_keys(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return list(f.keys())


def test_trace_default_out_is_under_analysis_results(llava_dir, image_file, cwd, capsys):
    code, _, err = _run(capsys, "trace", image_file, "what ?", "--model", llava_dir, "--max-new-tokens", "1")
    assert code == 0
    (run,) = (cwd / "analysis_results").iterdir()
    assert run.name.startswith("cat-photo-") and (run / "report.html").is_file()
    assert sorted(p.name for p in cwd.iterdir()) == ["analysis_results"]


def test_demo(llava_dir, cwd, capsys):
    code, stdout, _ = _run(capsys, "demo", "--model", llava_dir, "--scenes", "1", "--max-new-tokens", "2",
                           "--out", "d")
    assert code == 0 and "demo written to d" in stdout
    names = sorted(p.name for p in (cwd / "d").iterdir() if p.is_dir())
    assert names == ["grace_hopper", "scene_0_color"]
    for name in names:
        assert (cwd / "d" / name / "report.html").is_file()
        assert (cwd / "d" / name / "logit_lens.png").is_file()
    assert 'href="grace_hopper/report.html"' in (cwd / "d" / "index.html").read_text()
    assert sorted(p.name for p in cwd.iterdir()) == ["d"]


def test_sweep_and_summary(llava_dir, cwd, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = cwd / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    rows = []
    for i in range(3):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8")).save(data / f"{i}.png")
        rows.append({"id": f"ex{i}", "image": f"{i}.png", "q": f"what {i} ?", "answer": "circle"})
    rows.append({"id": "broken", "image": "missing.png", "q": "what ?", "answer": "x"})
    pq.write_table(pa.Table.from_pylist(rows), data / "manifest.parquet")
    argv = ["sweep", data / "manifest.parquet", "--question-column", "q", "--out", cwd / "sw",
            "--model", llava_dir, "--max-new-tokens", "2", "--shard-size", "2", "--no-progress"]
    code, stdout, _ = _run(capsys, *argv)
    assert code == 0 and "4 analysed (1 errors), 0 already done" in stdout
    table = sweep.read_rows(cwd / "sw")
    assert sorted(table.column("id").to_pylist()) == ["broken", "ex0", "ex1", "ex2"]
    assert len(list((cwd / "sw").glob("part-*.parquet"))) == 2
    code, stdout, _ = _run(capsys, *argv)
    assert code == 0 and "0 analysed (0 errors), 4 already done" in stdout
    code, stdout, _ = _run(capsys, "summary", cwd / "sw")
    assert code == 0 and "accuracy" in stdout and "errors                         1" in stdout
    for name in ("summary_emergence.png", "summary_vision_share.png", "summary.json"):
        assert (cwd / "sw" / name).is_file()
    assert sorted(p.name for p in cwd.iterdir()) == ["data", "sw"]


def test_eval_grounding_prints_and_writes_the_table(tmp_path, capsys):
    """On the embedded model: a table with every map method and a chance column."""
    assert cli.main(["eval-grounding", "--scenes", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for method in ("llm_mean", "llm_max", "vlm_visualizer", "vit_rollout", "random"):
        assert f"| {method} |" in out
    assert "chance" in out
    assert (tmp_path / "grounding.md").read_text().strip() == out.strip()
