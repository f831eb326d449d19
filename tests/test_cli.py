"""The ``llava-lens`` CLI end to end on a tiny random model: help, errors, trace, demo, sweep, summary."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import llava_lens as ll
from llava_lens import cli, sweep
from llava_lens.defaults import DEFAULT_MAX_NEW_TOKENS

COMMANDS = ("demo", "trace", "sweep", "summary", "report", "eval-grounding", "heads")
MODEL_COMMANDS = ("demo", "trace", "sweep", "eval-grounding", "heads")
HEAVY = ("torch", "transformers", "transformer_lens", "matplotlib", "circuitsvis", "pandas", "pyarrow", "datasets")


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
    if command in MODEL_COMMANDS:
        assert "--device" in text and "--dtype" in text and "--model" in text
    if command:
        assert "--debug" in text
    if command in ("demo", "trace", "sweep"):
        assert f"(default: {DEFAULT_MAX_NEW_TOKENS})" in text


def test_import_and_help_load_no_heavy_module():
    """``import llava_lens.cli`` + building the parser + ``--help`` import none of the heavy libraries."""
    code = f"""
import contextlib, io, sys
import llava_lens.cli as cli
for argv in (["--help"], ["trace", "--help"], ["sweep", "--help"], ["eval-grounding", "--help"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        cli.main(argv)
print(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_lazy_package_exports_every_public_name():
    for name in ll.__all__:
        assert getattr(ll, name) is not None, name
    assert set(ll.__all__) <= set(dir(ll))
    assert ll.analyse_to_dir.__module__ == "llava_lens.run"
    with pytest.raises(AttributeError, match="no_such_name"):
        ll.no_such_name  # noqa: B018


def test_one_max_new_tokens_default_for_api_and_cli():
    from llava_lens.options import GenerateOptions

    assert GenerateOptions().max_new_tokens == DEFAULT_MAX_NEW_TOKENS  # what LlavaLens.trace/step use
    parser = cli.build_parser()
    for argv in (["demo"], ["trace", "a.png", "q"], ["sweep", "d", "--question", "q", "--out", "o"]):
        args = parser.parse_args(argv)
        assert args.options(args).max_new_tokens == DEFAULT_MAX_NEW_TOKENS, argv


def test_each_command_parses_into_its_options_dataclass():
    from llava_lens.cli.grounding import GroundingOptions
    from llava_lens.cli.sweep import SweepOptions
    from llava_lens.cli.trace import TraceOptions

    parser = cli.build_parser()

    def options(*argv):
        args = parser.parse_args(argv)
        return args.options(args)

    positional = options("trace", "a.png", "what ?", "--layers", "-1", "0", "--dtype", "float32")
    assert positional == options("trace", "a.png", "--question", "what ?", "--layers", "-1", "0", "--dtype",
                                 "float32")
    assert isinstance(positional, TraceOptions) and positional.layers == [-1, 0] and positional.question == "what ?"
    grounding = options("eval-grounding", "--qtypes", "color,shape", "--scenes", "5")
    assert grounding == GroundingOptions(qtypes=("color", "shape"), scenes=5)
    swept = options("sweep", "d", "--question", "q", "--out", "o", "--limit", "3", "--batch-size", "2", "--force")
    assert swept == SweepOptions(data="d", question="q", out="o", limit=3, batch_size=2, force=True)


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


def _must_not_run(*args, **kwargs):
    raise AssertionError("must not be called")


@pytest.mark.parametrize("argv, message", [
    (["trace", "a.png", "q", "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    (["demo", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be >= 1, got -1"),
    (["demo", "--max-new-tokens", "many"], "expected an integer, got 'many'"),
    (["sweep", "d", "--question", "q", "--out", "o", "--limit", "-1"], "argument --limit: must be >= 0"),
    (["sweep", "d", "--question", "q", "--out", "o", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["sweep", "d", "--question", "q", "--out", "o", "--n-devices", "0"], "argument --n-devices: must be >= 1"),
    (["demo", "--scenes", "-1"], "argument --scenes: must be >= 0, got -1"),
    (["eval-grounding", "--scenes", "-1"], "argument --scenes: must be >= 1, got -1"),
    (["eval-grounding", "--qtypes", "bogus"], "unknown question type(s) bogus; choose from color,shape"),
    (["eval-grounding", "--qtypes", "color,count"], "unknown question type(s) count"),
    (["demo", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["trace", "a.png", "q", "--question", "again"], "give the question once"),
])
def test_bad_flags_are_refused_in_one_line_before_loading(argv, message, cwd, monkeypatch, capsys):
    monkeypatch.setattr(ll, "load", _must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["demo", "--device", "nonsense"], "--device 'nonsense' is not a torch device"),
    (["trace", "{image}", "q", "--device", "cuda"], "--device cuda: no CUDA GPU"),
    (["eval-grounding", "--device", "cuda:99"], "--device cuda:99: "),
    (["sweep", "nowhere", "--question", "q", "--out", "o", "--device", "cuda"], "--device cuda: no CUDA GPU"),
])
def test_bad_device_is_refused_in_one_line_before_loading(argv, message, cwd, image_file, monkeypatch, capsys):
    import torch

    if "no CUDA GPU" in message and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr(ll, "load", _must_not_run)
    code, _, err = _run(capsys, *[a.replace("{image}", str(image_file)) for a in argv])
    assert code == 2 and err.startswith(f"llava-lens: error: {message}") and err.count("\n") == 1, err
    assert list(cwd.iterdir()) == []


def test_layers_out_of_range_name_the_valid_range_before_tracing(image_file, cwd, monkeypatch, capsys):
    """On the embedded 4-layer model: checked once the model is known, before anything is traced."""
    import llava_lens.run

    monkeypatch.setattr(llava_lens.run, "analyse_to_dir", _must_not_run)
    for argv in (["trace", image_file, "q", "--layers", "1", "99"], ["demo", "--layers", "-5"]):
        code, _, err = _run(capsys, *argv, "--device", "cpu")
        bad = argv[-1]
        assert code == 2 and "Traceback" not in err
        assert err.splitlines()[-1] == (f"llava-lens: error: --layers {bad}: the model has 4 layers "
                                        "(valid: 0..3, or -4..-1 from the end)")
    assert list(cwd.iterdir()) == []


def test_library_errors_are_one_line_unless_debug(cwd, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ValueError("bad weights\nsecond line of detail")

    monkeypatch.setattr(ll, "load", broken)
    code, _, err = _run(capsys, "demo", "--device", "cpu")
    assert code == 2 and err == "llava-lens: error: bad weights\n"
    with pytest.raises(ValueError, match="second line"):  # --debug: the exception (and traceback) itself
        cli.main(["demo", "--device", "cpu", "--debug"])


def test_interrupt_exits_130_in_one_line(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ll, "load", interrupted)
    code, _, err = _run(capsys, "eval-grounding", "--device", "cpu")
    assert code == 130 and err == "llava-lens: interrupted\n"


@pytest.mark.parametrize("flag", [[], ["--force"]])
def test_sweep_force_reaches_run_sweep(flag, cwd, monkeypatch, capsys):
    seen = {}

    def fake_run_sweep(lens, examples, out, **kwargs):
        seen.update(kwargs, lens=lens)
        return {"done": 0, "errors": 0, "skipped": 0}

    monkeypatch.setattr(ll, "load", lambda *args, **kwargs: "the lens")
    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    (cwd / "data").mkdir()
    Image.new("RGB", (8, 8)).save(cwd / "data" / "a.png")
    code, _, _ = _run(capsys, "sweep", "data", "--question", "q", "--out", "o", "--device", "cpu", *flag)
    assert code == 0 and seen["lens"] == "the lens"
    assert seen["force"] is bool(flag) and seen["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS
    assert seen["options"] == {"data": "data", "out": "o", "question": "q", "device": "cpu", "dtype": "auto",
                               "max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "shard_size": 8, "batch_size": 1,
                               "world_size": 1}


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
    code, _, err = _run(capsys, "report", out, "--layers", "-1", "99")  # the saved trace knows the layer count
    assert code == 2 and err.startswith("llava-lens: error: --layers 99: the model has 2 layers")


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
    for i, word in enumerate(("color", "shape", "object")):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8")).save(data / f"{i}.png")
        rows.append({"id": f"ex{i}", "image": f"{i}.png", "q": f"what {word} ?", "answer": "circle"})
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
    """On the embedded model: a table with every asked map method and a chance column."""
    methods = ("llm_mean", "llm_max", "vlm_visualizer", "vit_rollout", "random")
    assert cli.main(["eval-grounding", "--scenes", "2", "--calibration", "0", "--no-deletion", "--no-progress",
                     "--methods", ",".join(methods), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for method in methods:
        assert f"| {method} |" in out
    assert "chance" in out
    assert (tmp_path / "grounding.md").read_text().strip() == out.strip()


def test_mmap_threshold_is_fixed_on_glibc():
    import platform

    from llava_lens.cli.main import fix_mmap_threshold

    assert fix_mmap_threshold() is (platform.libc_ver()[0] == "glibc")
