"""Tracer speed and memory against what users would run instead, measured side by side.

    python benchmarks/bench_trace.py --shape small          # CPU, LLaVA-1.5-shaped random model
    python benchmarks/bench_trace.py --shape 7b --device cuda --dtype bfloat16

Rows: HF generate (sdpa, the 1.00x baseline), HF generate with output_attentions (eager;
VLM-Visualizer's method), the original notebook's method (run_with_cache over the whole sequence at
every step), LlavaLens.trace with the default capture, and trace + logit lens on every step.
All use the same model weights, prompt and forced number of new tokens (EOS is suppressed).
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
from llava_lens.toy.build import build_llava

SHAPES = {
    # 8 layers, d_model 512, 13x13 patches -> 169 image tokens + ~12 text tokens (~180 prompt)
    "small": dict(image_size=208, patch_size=16, vision_width=256, vision_layers=4, vision_heads=4,
                  d_model=512, n_layers=8, n_heads=8),
    "tiny": dict(image_size=64, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                 d_model=128, n_layers=4, n_heads=4),
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 (24x24 = 576 image tokens) + Llama-2-7B
    "7b": dict(image_size=336, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
               d_model=4096, n_layers=32, n_heads=32),
}
QUESTION = "what color is the circle in the top left of the image ?"


class NoEos:
    """Forces exactly N new tokens everywhere: the EOS logit is pushed to -inf."""

    def __init__(self, eos: int):
        self.eos = eos

    def __call__(self, input_ids, scores):
        scores[:, self.eos] = -float("inf")
        return scores


def timed(fn, device, repeats):
    times, peaks = [], []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
        times.append(time.perf_counter() - t0)
    return times, (max(peaks) if peaks else None), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--model", default=None, help="benchmark this model directory instead of a random --shape "
                   "(e.g. llava_lens/toy/shapes-tiny, the embedded model)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--skip-notebook", action="store_true", help="skip the slow full-recompute row")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else Path(tmp) / "model"
        if not args.model:
            build_llava(model_dir, "llava", dtype=dtype, **SHAPES[args.shape])
        rows = run_rows(model_dir, args, dtype)
    print_table(rows, args)


def run_rows(model_dir, args, dtype):
    n, dev = args.new_tokens, args.device
    lens = ll.load(str(model_dir), device=dev, dtype=dtype)
    image = (np.random.default_rng(0).random((240, 320, 3)) * 255).astype("uint8")
    inputs, _ = lens.prepare(image, QUESTION)
    ids, pix = inputs.input_ids.to(dev), inputs.pixel_values.to(dev, dtype)
    eos = lens.tokenizer.eos_token_id
    sdpa = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype,
                                                        attn_implementation="sdpa").to(dev).eval()
    eager = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype,
                                                         attn_implementation="eager").to(dev).eval()
    gen_kwargs = dict(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids),
                      max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def hf_sdpa():
        with torch.inference_mode():
            return sdpa.generate(**gen_kwargs)

    def hf_attn():
        with torch.inference_mode():
            return eager.generate(**gen_kwargs, output_attentions=True, return_dict_in_generate=True)

    def notebook():
        seq = ids
        with torch.inference_mode():
            for _ in range(n):
                logits, cache = lens.bridge.run_with_cache(seq, pixel_values=pix)
                logits[0, -1, eos] = -float("inf")
                seq = torch.cat([seq, logits[0, -1].argmax().view(1, 1)], 1)
        return seq

    # Force exactly n tokens by not treating EOS as a stop (a hook suppressing it would attach a
    # TransformerLens hook, which rightly sends the tracer down the slower every-hook-fires path).
    lens.eos_token_ids = set()

    def trace():
        return lens.trace(image, QUESTION, max_new_tokens=n)

    def trace_and_lens():
        from llava_lens.lens import logit_lens
        t = trace()
        return logit_lens(t, lens, prompt=False)

    candidates = [("HF generate (sdpa)", hf_sdpa), ("HF generate + output_attentions (eager)", hf_attn)]
    if not args.skip_notebook:
        candidates.append(("notebook: run_with_cache every step", notebook))
    candidates += [("LlavaLens.trace (default capture)", trace), ("trace + logit lens", trace_and_lens)]
    rows = []
    for name, fn in candidates:
        fn()  # warm-up
        repeats = 1 if name.startswith("notebook") else args.repeats
        times, peak, out = timed(fn, dev, repeats)
        rows.append((name, times, peak, out))
    return rows


def print_table(rows, args):
    n = args.new_tokens
    base = min(rows[0][1]) / n
    print(f"\nmodel={args.model or args.shape} device={args.device} dtype={args.dtype} new_tokens={n} "
          f"repeats={args.repeats}")
    print(f"{'method':44s} {'best ms/tok':>11s} {'median':>8s} {'x base':>7s} {'peak MB':>8s} {'KB/step':>8s}")
    for name, times, peak, out in rows:
        best, med = min(times) / n * 1e3, statistics.median(times) / n * 1e3
        per_step = ""
        if isinstance(out, ll.Trace):
            captured = sum(t.numel() * t.element_size() for s in out.steps for t in (s.attention, s.resid, s.logits))
            per_step = f"{captured / len(out.steps) / 1024:.0f}"
        peak_s = f"{peak / 2**20:.0f}" if peak else "-"
        print(f"{name:44s} {best:11.2f} {med:8.2f} {best / base / 1e3:7.2f} {peak_s:>8s} {per_step:>8s}")


if __name__ == "__main__":
    main()
