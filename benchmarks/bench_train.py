"""Training speed of the embedded model: seconds per step of each stage under each CPU layout, side by side.

    python benchmarks/bench_train.py                 # 2 rounds, ~8 minutes on 2 cores

A layout is ``--threads`` (CPU cores used) and the stage's data-loading workers; torch gets
``threads - workers`` threads (``llava_lens.toy.train.run_stage``). Each round runs every layout of
both stages once, for a few steps of the shipped recipe from a fresh model (order rotated each
round); the table gives the median s/step and the median over rounds of (layout / shipped layout in
the same round). The last table times stage-2 batch drawing alone, with and without
``QABatches``' tokenization cache. Layouts with fewer torch threads compute in another summation
order, so they train a different (not worse, not the shipped) model; the cache changes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoProcessor

from llava_lens.toy.scenes import random_style
from llava_lens.toy.train import DEFAULT_OUT, parse_args, qa_batches, train

# (label, stage, threads, workers); the first of each stage is the shipped layout (the baseline)
LAYOUTS = [
    ("vision, 2 torch threads (shipped)", "vision", 2, 0),
    ("vision, 1 worker + 1 torch thread", "vision", 2, 1),
    ("vision, 1 worker + 2 torch threads", "vision", 3, 1),
    ("language, 2 torch threads (shipped)", "language", 2, 0),
    ("language, 1 worker + 2 torch threads", "language", 3, 1),
]


def seconds_per_step(stage: str, threads: int, workers: int, steps: int) -> float:
    """Train ``steps`` steps of one stage from scratch with this layout; wall seconds per step."""
    with tempfile.TemporaryDirectory() as out:
        flag = "--vision-workers" if stage == "vision" else "--workers"
        counts = ["--vision-steps", str(steps), "--steps", "0"] if stage == "vision" else \
            ["--vision-steps", "0", "--steps", str(steps)]
        log = train(parse_args(["--out", out, "--save-every", "100000", "--threads", str(threads),
                                flag, str(workers), *counts]))
    return log["seconds"] / steps


def drawing_seconds(cached: bool, steps: int) -> float:
    """Seconds per stage-2 batch drawn (shipped recipe), tokenizing through the cache or every time.

    One torch thread, as in a data-loading worker (the batch's pixels are resized with torch).
    """
    torch.set_num_threads(1)
    data = qa_batches(AutoProcessor.from_pretrained(DEFAULT_OUT), parse_args([]), random_style)
    if not cached:
        data.encode = data._encode
    start = time.perf_counter()
    for step in range(steps):
        data[step]
    return (time.perf_counter() - start) / steps


def _row(label: str, times: list[float], ratios: list[float]) -> str:
    return f"| {label} | {statistics.median(times):.3f} | {statistics.median(ratios):.2f}x |"


def main() -> None:
    """Time every layout, interleaved over rounds, and print s/step with paired ratios."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--vision-steps", type=int, default=120, help="stage-1 steps per measurement")
    p.add_argument("--steps", type=int, default=60, help="stage-2 steps per measurement")
    args = p.parse_args()
    times = {layout: [] for layout in LAYOUTS}
    draw = {True: [], False: []}
    for r in range(args.rounds):
        for layout in LAYOUTS[r % len(LAYOUTS):] + LAYOUTS[:r % len(LAYOUTS)]:
            label, stage, threads, workers = layout
            n = args.vision_steps if stage == "vision" else args.steps
            times[layout].append(seconds_per_step(stage, threads, workers, n))
            print(f"round {r + 1}: {label}: {times[layout][-1]:.3f} s/step", flush=True)
        for cached in (r % 2 == 0, r % 2 == 1):
            draw[cached].append(drawing_seconds(cached, 200))
    print("\n| layout | s/step (median) | vs shipped layout (paired median) |\n|---|---:|---:|")
    for layout in LAYOUTS:
        base = next(b for b in LAYOUTS if b[1] == layout[1])
        print(_row(layout[0], times[layout], [t / b for t, b in zip(times[layout], times[base])]))
    print("\n| stage-2 batch drawing | s/batch (median) | vs uncached (paired median) |\n|---|---:|---:|")
    for cached in (False, True):
        print(_row("cached tokenization" if cached else "tokenized every time", draw[cached],
                   [c / u for c, u in zip(draw[cached], draw[False])]))


if __name__ == "__main__":
    main()
