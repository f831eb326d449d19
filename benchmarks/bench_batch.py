"""Sweep throughput: images per second of batched tracing at batch 1, 4 and 16, side by side.

    python benchmarks/bench_batch.py                                  # embedded model, CPU
    python benchmarks/bench_batch.py --model DIR --device cuda --dtype bfloat16

Each batch size traces the same images and questions (greedy, ``--new-tokens`` tokens, EOS not a
stop) with ``LlavaLens.trace_batch``; the table gives images/s and the ratio to batch 1.
"""

from __future__ import annotations

import argparse
import time

import torch

import llava_lens as ll
from llava_lens.toy.scenes import make_scene


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory or hub id (default: embedded model)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    args = p.parse_args()
    lens = ll.load(args.model, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    lens.eos_token_ids = set()  # every example generates exactly --new-tokens tokens
    scenes = [make_scene(seed) for seed in range(args.images)]
    images = [s.image for s in scenes]
    questions = [s.qas[0].question for s in scenes]
    lens.trace_batch(images[:2], questions[:2], max_new_tokens=2)  # warm-up
    rates = {}
    for batch in (int(b) for b in args.batches.split(",")):
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            lens.trace_batch(images[i:i + batch], questions[i:i + batch], max_new_tokens=args.new_tokens)
        if str(lens.device).startswith("cuda"):
            torch.cuda.synchronize()
        rates[batch] = len(images) / (time.perf_counter() - start)
    base = rates[min(rates)]
    print(f"\nmodel={args.model or 'shapes-tiny'} device={lens.device} dtype={lens.dtype} "
          f"images={args.images} new_tokens={args.new_tokens}")
    print(f"{'batch':>5s} {'images/s':>9s} {'x batch 1':>9s}")
    for batch, rate in rates.items():
        print(f"{batch:5d} {rate:9.2f} {rate / base:9.2f}")


if __name__ == "__main__":
    main()
