"""Sweep throughput: images per second of batched tracing at batch 1, 4 and 16, side by side.

    python benchmarks/bench_batch.py --threads 1                      # embedded model, CPU
    python benchmarks/bench_batch.py --model DIR --device cuda --dtype bfloat16

Each batch size traces the same images and questions (greedy, ``--new-tokens`` tokens, EOS not a
stop) with ``LlavaLens.trace_batch``. The batch sizes are interleaved: each round runs every batch
size once over all images (the order rotated each round), and the table gives the median images/s
and the median over rounds of (rate / batch-1 rate in the same round), with its interquartile range.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import llava_lens as ll
from llava_lens.toy.scenes import make_scene


def _quartiles(values):
    return statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3


def main() -> None:
    """Trace the images at every batch size, interleaved, and print images/s and paired ratios."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory or hub id (default: embedded model)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (every batch size once per round)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is steadier on a CPU shared with other jobs")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lens = ll.load(args.model, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    lens.eos_token_ids = set()  # every example generates exactly --new-tokens tokens
    scenes = [make_scene(seed) for seed in range(args.images)]
    images = [s.image for s in scenes]
    questions = [s.qas[0].question for s in scenes]
    lens.trace_batch(images[:2], questions[:2], max_new_tokens=2)  # warm-up (both paths)
    lens.trace(images[0], questions[0], max_new_tokens=2)
    batches = [int(b) for b in args.batches.split(",")]
    rates: dict[int, list[float]] = {b: [] for b in batches}
    for r in range(args.rounds):
        for batch in batches[r % len(batches):] + batches[:r % len(batches)]:
            start = time.perf_counter()
            for i in range(0, len(images), batch):
                lens.trace_batch(images[i:i + batch], questions[i:i + batch], max_new_tokens=args.new_tokens)
            if str(lens.device).startswith("cuda"):
                torch.cuda.synchronize()
            rates[batch].append(len(images) / (time.perf_counter() - start))
    base = rates[min(rates)]
    print(f"\nmodel={args.model or 'shapes-tiny'} device={lens.device} dtype={lens.dtype} images={args.images} "
          f"new_tokens={args.new_tokens} rounds={args.rounds} (interleaved) threads={torch.get_num_threads()}")
    print(f"{'batch':>5s} {'images/s (median)':>17s} {'x batch 1: median [IQR]':>25s}")
    for batch, values in rates.items():
        lo, mid, hi = _quartiles([v / b for v, b in zip(values, base)])
        print(f"{batch:5d} {statistics.median(values):17.2f} {f'{mid:.2f} [{lo:.2f}, {hi:.2f}]':>25s}")


if __name__ == "__main__":
    main()
