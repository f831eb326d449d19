"""Real-scale capture sizes: what ``llava-lens trace`` writes, holds and renders at the real geometry.

    nice -n 10 python benchmarks/bench_scale.py                     # both cases, full depth (32 layers)
    python benchmarks/bench_scale.py --cases llava-1.5-7b --layers 8 --keep /tmp/scale

For LLaVA-1.5-7B (a 336x336 image: 576 image tokens) and LLaVA-NeXT-Mistral-7B (640x480: 2,340
image tokens), builds a random-init model with the checkpoint's real geometry at tiny widths
(:func:`llava_lens.toy.geometry.build_real_geometry`; depth, heads, vocabulary and sequence are
real, d_model is 256) and runs the command a user runs, as a subprocess:

    llava-lens trace IMAGE QUESTION --model DIR --out OUT --device cpu

then prints: bytes written under OUT (total and the largest files), the process's peak RSS and
that peak minus the weights' size, the wall time of the command, seconds per generated step
(measured separately in-process with ``LlavaLens.step``, default capture), report.html's size, and
the time headless Chromium takes to load and render report.html, with how many of its canvases
have a zero size. Each number is printed next to its target. A command whose RSS passes
``--mem-limit-gb`` (default 16) is killed, and that is the finding. Everything is built and
written under a temporary folder (``--keep DIR`` to keep it).

Since the widths are tiny, "peak above weights" here is what the *captures* cost: at the real
width the weights are 14 GB (fp16) but the captured tensors have the same shapes as here, except
the residual streams (d_model 4096 instead of 256: x16).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CASES = {"llava-1.5-7b": (336, 336), "llava-next-mistral-7b": (480, 640)}  # image (height, width)
OUT_TARGET = {"llava-1.5-7b": 150e6, "llava-next-mistral-7b": 400e6}
PEAK_TARGET, REPORT_TARGET, RENDER_TARGET = 2e9, 8e6, 10.0
QUESTION = "what color is the circle ?"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-webgl",
                  "--disable-software-rasterizer", "--disable-background-networking", "--disable-sync",
                  "--disable-component-update", "--host-resolver-rules=MAP * ~NOTFOUND"]
# Appended to a copy of report.html: after the page's scripts ran, record every canvas' size in the DOM.
CANVAS_PROBE = """<script>window.addEventListener("load", () => setTimeout(() => {
  const c = [...document.querySelectorAll("canvas")];
  document.body.setAttribute("data-canvases", JSON.stringify(c.map(e => [e.width, e.height])));
}, 2000));</script>"""


@dataclass
class Watched:
    """Outcome of one watched subprocess."""

    rc: int | None = None
    seconds: float = 0.0
    peak_rss: int = 0
    """Largest sum of RSS over the process and its descendants seen while polling (bytes)."""
    maxrss: int = 0
    """The process's own peak RSS from ``wait4`` (bytes; 0 when killed before it could be read)."""
    cpu: float = 0.0
    """The process's user + system CPU seconds from ``wait4`` (0 when killed)."""
    note: str = ""
    output: str = field(default="", repr=False)


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def tree_rss(pid: int) -> int:
    """Sum of the resident set sizes of ``pid`` and all its descendants, in bytes."""
    kids, total, todo = _children_map(), 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
        todo += kids.get(p, [])
    return total


def watch(cmd: list[str], mem_limit: float, timeout: float, env: dict | None = None) -> Watched:
    """Run ``cmd``; poll its process tree's RSS; kill the tree past ``mem_limit`` bytes or ``timeout`` s."""
    w = Watched()
    log = tempfile.TemporaryFile()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        w.seconds = time.perf_counter() - start
        if pid:
            w.rc, w.maxrss = os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024
            w.cpu = usage.ru_utime + usage.ru_stime
            proc.returncode = w.rc
            break
        w.peak_rss = max(w.peak_rss, tree_rss(proc.pid))
        if w.peak_rss > mem_limit or w.seconds > timeout:
            w.note = (f"KILLED: RSS {w.peak_rss / 1e9:.1f} GB > limit {mem_limit / 1e9:.0f} GB"
                      if w.peak_rss > mem_limit else f"KILLED: still running after {timeout:.0f} s")
            os.killpg(proc.pid, signal.SIGKILL)  # the session we started: the command and its children
            proc.wait()
            w.rc = proc.returncode
            break
        time.sleep(0.1)
    log.seek(0)
    w.output = log.read().decode(errors="replace")
    return w


def dir_sizes(root: Path, top: int = 5) -> tuple[int, list[tuple[int, str]]]:
    """Total bytes of the files under ``root`` and the ``top`` largest (size, relative path)."""
    files = [(p.stat().st_size, str(p.relative_to(root))) for p in root.rglob("*") if p.is_file()]
    return sum(s for s, _ in files), sorted(files, reverse=True)[:top]


def step_seconds(model_dir: Path, image: Path, n: int) -> dict[str, float]:
    """Prefill and mean decode-step seconds of ``LlavaLens.step`` (default capture), in-process: wall
    and CPU (user + system of this process, all threads; on a shared machine the wall time mostly
    measures the other processes)."""
    import llava_lens as ll

    lens = ll.load(str(model_dir), device="cpu")
    stamps = [(time.perf_counter(), time.process_time())]
    for _ in lens.step(str(image), QUESTION, max_new_tokens=n):
        stamps.append((time.perf_counter(), time.process_time()))
    wall, cpu = np.diff(np.array(stamps), axis=0).T
    return {"prefill_s": wall[0], "prefill_cpu": cpu[0], "step_s": wall[1:].mean(), "step_cpu": cpu[1:].mean()}


def render(report: Path, mem_limit: float, timeout: float) -> tuple[Watched, str]:
    """Load a copy of ``report`` (+ the canvas probe) in headless Chromium; the watch and a canvas summary."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return Watched(note="chromium not installed"), "-"
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "report.html"
        probe.write_text(report.read_text(encoding="utf-8").replace("</body>", CANVAS_PROBE + "</body>"),
                         encoding="utf-8")
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile", f"--screenshot={tmp}/shot.png",
               "--window-size=1200,1600", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
        w = watch(cmd, mem_limit, timeout)
    marker = 'data-canvases="'
    if marker not in w.output:
        return w, "no canvas record (scripts did not finish)"
    import html
    import json

    sizes = json.loads(html.unescape(w.output.split(marker, 1)[1].split('"', 1)[0]))
    zero = sum(1 for wd, ht in sizes if not (wd and ht))
    return w, f"{len(sizes)} canvases, {zero} of zero size"


def size_formulas(config, n_prompt: int, n_new: int, n_tiles: int) -> list[tuple[str, str, float]]:
    """(tensor, formula, bytes at fp32) of each full capture: per-step rows and residuals, and the
    prefill's patterns and residuals (what ``prefill_cache=True`` stored before the PrefillSummary)."""
    t, v = config.text_config, config.vision_config
    L, H, d, vocab = t.num_hidden_layers, t.num_attention_heads, t.hidden_size, t.vocab_size
    V, Hv, dv, P = v.num_hidden_layers, v.num_attention_heads, v.hidden_size, (v.image_size // v.patch_size) ** 2 + 1
    keys = n_new * n_prompt + n_new * (n_new - 1) // 2  # step i attends over n_prompt + i keys
    T = n_prompt
    return [
        ("step attention rows", f"sum_i L*H*(T+i) = {L}*{H}*{keys}", 4 * L * H * keys),
        ("step resid", f"N*(L+1)*d = {n_new}*{L + 1}*{d}", 4 * n_new * (L + 1) * d),
        ("step logits", f"N*vocab = {n_new}*{vocab}", 4 * n_new * vocab),
        ("prefill LM patterns", f"L*H*T^2 = {L}*{H}*{T}^2", 4 * L * H * T * T),
        ("prefill LM resid pre+post", f"2*L*T*d = 2*{L}*{T}*{d}", 4 * 2 * L * T * d),
        ("prefill ViT patterns", f"tiles*V*Hv*P^2 = {n_tiles}*{V}*{Hv}*{P}^2", 4 * n_tiles * V * Hv * P * P),
        ("prefill ViT resid pre+post", f"2*tiles*V*P*dv = 2*{n_tiles}*{V}*{P}*{dv}", 4 * 2 * n_tiles * V * P * dv),
    ]


def _fmt(n: float) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def _check(value: float | None, target: float) -> str:
    return "?" if value is None else ("ok" if value <= target else f"FAIL x{value / target:.1f}")


def _cli(image: Path, model_dir: Path, out: Path, n_new: int) -> list[str]:
    exe = shutil.which("llava-lens")
    head = [exe] if exe else [sys.executable, "-m", "llava_lens.cli"]
    return [*head, "trace", str(image), QUESTION, "--model", str(model_dir), "--out", str(out),
            "--device", "cpu", "--max-new-tokens", str(n_new)]


def run_case(name: str, args: argparse.Namespace, root: Path) -> dict:
    """Build ``name``'s geometry, run the CLI on it, measure; a dict of the numbers."""
    import llava_lens as ll
    from llava_lens.toy.geometry import build_real_geometry

    model_dir = build_real_geometry(root / name, name, n_layers=args.layers)
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    height, width = CASES[name]
    image = root / f"{name}.png"
    Image.fromarray((np.random.default_rng(0).random((height, width, 3)) * 255).astype("uint8")).save(image)
    lens = ll.load(str(model_dir), device="cpu")
    inputs, span = lens.prepare(str(image), QUESTION)
    n_tiles = inputs.pixel_values.shape[1] if inputs.pixel_values.dim() == 5 else 1
    row = {"name": name, "config": lens.config, "weights": weights, "image": f"{width}x{height}",
           "n_prompt": inputs.input_ids.shape[1], "n_image": len(span), "n_tiles": n_tiles}
    del lens
    out = root / f"{name}-out"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cli = watch(_cli(image, model_dir, out, args.new_tokens), args.mem_limit_gb * 1e9, args.timeout, env)
    row["cli"] = cli
    row["out_total"], row["largest"] = dir_sizes(out) if out.exists() else (0, [])
    report = out / "report.html"
    row["report"] = report.stat().st_size if report.is_file() else None
    row["render"], row["canvases"] = (render(report, args.mem_limit_gb * 1e9, args.timeout) if report.is_file()
                                      else (Watched(note="no report.html"), "-"))
    row.update(step_seconds(model_dir, image, args.new_tokens))
    return row


def print_case(row: dict, n_new: int) -> None:
    """One Markdown table of a case's measurements against the targets, then its stored-tensor sizes."""
    cli, ren, t = row["cli"], row["render"], row["config"].text_config
    peak = cli.maxrss or cli.peak_rss
    above = peak - row["weights"]
    print(f"\n### {row['name']}: {t.num_hidden_layers} layers x {t.num_attention_heads} heads "
          f"({t.num_key_value_heads} KV), d_model {t.hidden_size}, vocab {t.vocab_size}; image {row['image']}: "
          f"{row['n_prompt']} prompt tokens ({row['n_image']} image), {row['n_tiles']} ViT tile(s)\n")
    print("| measure | value | target | |\n|---|---:|---:|---|")
    print(f"| weights (safetensors) | {_fmt(row['weights'])} | | |")
    print(f"| `llava-lens trace` exit | rc {cli.rc} after {cli.seconds:.0f} s wall, {cli.cpu:.0f} s CPU | | "
          f"{cli.note} |")
    written = row["out_total"] if cli.rc == 0 else None  # a killed run's partial output measures nothing
    print(f"| bytes written under OUT | {_fmt(written)} | <= {_fmt(OUT_TARGET[row['name']])} | "
          f"{_check(written, OUT_TARGET[row['name']])} |")
    print(f"| peak RSS of the process | {_fmt(peak)} | | |")
    print(f"| peak above weights | {_fmt(above)} | <= {_fmt(PEAK_TARGET)} | {_check(above, PEAK_TARGET)} |")
    print(f"| prefill / s per generated step (`LlavaLens.step`, default capture), wall | {row['prefill_s']:.2f} s / "
          f"{row['step_s']:.3f} s | | |")
    print(f"| the same, CPU seconds | {row['prefill_cpu']:.2f} s / {row['step_cpu']:.3f} s | | |")
    print(f"| report.html | {_fmt(row['report'])} | <= {_fmt(REPORT_TARGET)} | "
          f"{_check(row['report'], REPORT_TARGET)} |")
    render_s = ren.seconds if ren.rc == 0 else None
    print(f"| Chromium load + render | {ren.seconds:.1f} s (rc {ren.rc}; tree RSS {_fmt(ren.peak_rss)}) | "
          f"<= {RENDER_TARGET:.0f} s | {_check(render_s, RENDER_TARGET)} {ren.note} |")
    print(f"| canvases | {row['canvases']} | none of zero size | |")
    print("\nlargest files: " + ", ".join(f"`{p}` {_fmt(s)}" for s, p in row["largest"]))
    print(f"\nfull captures at fp32 (T = {row['n_prompt']} prompt tokens, N = {n_new} steps; what a trace keeps "
          "with the prefill patterns asked for; the default may keep less: fp16 rows, a prefill summary):\n")
    print("| tensor | formula | bytes |\n|---|---|---:|")
    for tensor, formula, size in size_formulas(row["config"], row["n_prompt"], n_new, row["n_tiles"]):
        print(f"| {tensor} | {formula} | {_fmt(size)} |")
    if cli.rc:
        print("\nlast lines of the command's output:\n```\n" + "\n".join(cli.output.splitlines()[-6:]) + "\n```")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--layers", type=int, default=None, help="LM depth (default: the checkpoint's, 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="--max-new-tokens of the CLI (its default: 32)")
    p.add_argument("--mem-limit-gb", type=float, default=16.0, help="kill a command whose RSS passes this")
    p.add_argument("--timeout", type=float, default=1800.0, help="kill a command running longer (s)")
    p.add_argument("--keep", default=None, help="build and write under this folder and keep it")
    args = p.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_scale-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"# bench_scale {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, CPU fp32, under {root}")
    try:
        for name in args.cases:
            print_case(run_case(name, args, root), args.new_tokens)
            sys.stdout.flush()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
