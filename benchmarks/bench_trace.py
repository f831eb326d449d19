"""Tracer speed and memory against what users would run instead, measured side by side.

    python benchmarks/bench_trace.py --shape small --pairs 15        # CPU, LLaVA-1.5-shaped random model
    python benchmarks/bench_trace.py --model llava_lens/toy/shapes-tiny --pairs 15   # the embedded model
    python benchmarks/bench_trace.py --shape 7b --device cuda --dtype bfloat16

Rows: HF generate (sdpa, the 1.00x baseline), HF generate with output_attentions (eager;
VLM-Visualizer's method), the original notebook's method (run_with_cache over the whole sequence at
every step), LlavaLens.trace with the library's defaults, and trace + logit lens on every step.
All use the same model weights, prompt and forced number of new tokens (EOS is suppressed).

The rows are interleaved: each round runs every row once (A B C ..., the order rotated each
round), so machine drift (other jobs on a shared CPU, GPU clocks) hits all rows alike. Besides the
best and median time per row, the table gives the median over rounds of each row's time divided
by the baseline's time in the same round (the paired ratio), with its interquartile range: on a
noisy machine that ratio is far steadier than a ratio of two separately timed rows.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

import llava_lens as ll
from llava_lens.toy.build import ModelSizes, build_llava

SHAPES = {
    # 8 layers, d_model 512, 13x13 patches -> 169 image tokens + ~16 text tokens (~185 prompt)
    "small": dict(image_size=208, patch_size=16, vision_width=256, vision_layers=4, vision_heads=4,
                  d_model=512, n_layers=8, n_heads=8),
    "tiny": dict(image_size=64, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                 d_model=128, n_layers=4, n_heads=4),
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 (24x24 = 576 image tokens) + Llama-2-7B
    "7b": dict(image_size=336, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
               d_model=4096, n_layers=32, n_heads=32),
}
QUESTION = "what color is the circle in the top left of the image ?"
BASELINE = "HF generate (sdpa)"
TRACE = "LlavaLens.trace (defaults)"


def timed_once(fn, device):
    """Seconds one call takes, its CUDA peak memory (None on CPU), and its result."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, (torch.cuda.max_memory_allocated() if cuda else None), out


def interleaved(candidates, device, rounds):
    """Run every candidate once per round, rotating the order; returns name -> (times, peak, last output)."""
    results = {name: ([], None, None) for name, _ in candidates}
    for r in range(rounds):
        order = candidates[r % len(candidates):] + candidates[:r % len(candidates)]
        for name, fn in order:
            seconds, peak, out = timed_once(fn, device)
            times, best_peak, _ = results[name]
            times.append(seconds)
            peaks = [p for p in (best_peak, peak) if p is not None]
            results[name] = (times, max(peaks) if peaks else None, out)
    return results


def main() -> None:
    """Build (or load) the model, run the rows interleaved, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--model", default=None, help="benchmark this model directory instead of a random --shape "
                   "(e.g. llava_lens/toy/shapes-tiny, the embedded model)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--pairs", type=int, default=15, help="interleaved rounds (each row runs once per round)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--only", choices=["trace"], default=None,
                   help="'trace': only the baseline and trace rows (more rounds in the same time)")
    p.add_argument("--skip-notebook", action="store_true", help="skip the slow full-recompute row")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is steadier on a CPU shared with other jobs")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else Path(tmp) / "model"
        if not args.model:
            build_llava(model_dir, "llava", sizes=ModelSizes(**SHAPES[args.shape]), dtype=dtype)
        rows, notebook = run_rows(model_dir, args, dtype)
    print_table(rows, notebook, args)


def make_rows(model_dir, args, dtype):
    """The benchmarked callables (name, fn), the baseline first, and the notebook method (or None)."""
    n, dev = args.new_tokens, args.device
    lens = ll.load(str(model_dir), device=dev, dtype=dtype)
    image = (np.random.default_rng(0).random((240, 320, 3)) * 255).astype("uint8")
    inputs, _ = lens.prepare(image, QUESTION)
    ids, pix = inputs.input_ids.to(dev), inputs.pixel_values.to(dev, dtype)
    eos = lens.tokenizer.eos_token_id
    sdpa = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype,
                                                        attn_implementation="sdpa").to(dev).eval()
    gen_kwargs = dict(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids),
                      max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def hf_sdpa():
        with torch.inference_mode():
            return sdpa.generate(**gen_kwargs)

    # Force exactly n tokens by not treating EOS as a stop (a hook suppressing it would attach a
    # TransformerLens hook, which rightly sends the tracer down the slower every-hook-fires path).
    lens.eos_token_ids = set()

    def trace():
        return lens.trace(image, QUESTION, max_new_tokens=n)

    rows = [(BASELINE, hf_sdpa), (TRACE, trace)]
    if args.only != "trace":
        eager = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype,
                                                             attn_implementation="eager").to(dev).eval()

        def hf_attn():
            with torch.inference_mode():
                return eager.generate(**gen_kwargs, output_attentions=True, return_dict_in_generate=True)

        def trace_and_lens():
            from llava_lens.lens import logit_lens
            return logit_lens(trace(), lens, prompt=False)

        rows[1:1] = [("HF generate + output_attentions (eager)", hf_attn)]
        rows.append(("trace + logit lens", trace_and_lens))

    def notebook():
        seq = ids
        with torch.inference_mode():
            for _ in range(n):
                logits, cache = lens.bridge.run_with_cache(seq, pixel_values=pix)
                logits[0, -1, eos] = -float("inf")
                seq = torch.cat([seq, logits[0, -1].argmax().view(1, 1)], 1)
        return seq

    return rows, (None if args.skip_notebook or args.only else notebook)


def run_rows(model_dir, args, dtype):
    """Warm up, then the interleaved rounds; the notebook row (minutes at 7B) runs once, alone."""
    candidates, notebook = make_rows(model_dir, args, dtype)
    for _, fn in candidates:
        fn()  # warm-up
    results = interleaved(candidates, args.device, args.pairs)
    if notebook is not None:
        seconds, peak, out = timed_once(notebook, args.device)
        notebook = ([seconds], peak, out)
    return results, notebook


def _quartiles(values):
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[0], q[1], q[2]


def print_table(results, notebook, args):
    """One line per row: best and median ms/token, paired ratio to the baseline (median [IQR])."""
    n = args.new_tokens
    base = results[BASELINE][0]
    print(f"\nmodel={args.model or args.shape} device={args.device} dtype={args.dtype} new_tokens={n} "
          f"rounds={args.pairs} (interleaved) threads={torch.get_num_threads()}")
    print(f"{'method':42s} {'best ms/tok':>11s} {'median':>7s} {'best/best':>9s} "
          f"{'paired ratio: median [IQR]':>27s} {'peak MB':>8s} {'KB/step':>8s}")
    rows = list(results.items()) + ([("notebook: run_with_cache every step", notebook)] if notebook else [])
    for name, (times, peak, out) in rows:
        best, med = min(times) / n * 1e3, statistics.median(times) / n * 1e3
        ratio = min(times) / min(base)
        paired = ""
        if len(times) == len(base):
            lo, mid, hi = _quartiles([t / b for t, b in zip(times, base)])
            paired = f"{mid:.3f} [{lo:.3f}, {hi:.3f}]"
        per_step = ""
        if isinstance(out, ll.Trace):
            kept = [t for s in out.steps for t in (s.attention, s.resid, s.logits) if t is not None]
            per_step = f"{sum(t.numel() * t.element_size() for t in kept) / len(out.steps) / 1024:.0f}"
        peak_s = f"{peak / 2**20:.0f}" if peak else "-"
        print(f"{name:42s} {best:11.2f} {med:7.2f} {ratio:9.3f} {paired:>27s} {peak_s:>8s} {per_step:>8s}")


if __name__ == "__main__":
    main()
