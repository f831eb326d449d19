"""Score grounding maps of the embedded model against object masks, and measure the seed claims.

    python scripts/eval_grounding.py [--scenes 100] [--seed N] [--out results.md]

Prints markdown tables: pointing game / energy in mask / deletion and insertion AUC per map method
and layer range (with chance levels), single-head pointing, the vision-attention share on content
vs function words, and the layer where the answer first tops the logit lens.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch

import llava_lens as ll
from llava_lens.analysis.contrastive import contrastive_map_fn
from llava_lens.analysis.entropy import image_attention_entropy
from llava_lens.analysis.heads import HeadFocus, head_focus
from llava_lens.analysis.knockout import knockout_windows
from llava_lens.analysis.scoring import evaluate_grounding, occlusion_map, paint_grid, pointing_hit
from llava_lens.analysis.sinks import find_sinks, sink_excluded_map
from llava_lens.grounding import MAPS, image_attention, vision_share
from llava_lens.toy.scenes import COLORS, SHAPES

FUNCTION_WORDS = {"the", "is", ".", "a", "object"}
CONTENT_WORDS = set(COLORS) | set(SHAPES)


def head_pointing(traces) -> torch.Tensor:
    """``[L, H]`` pointing accuracy of every single head's attention map at the answer step."""
    hits = None
    for trace, qa, step in traces:
        att = image_attention(trace)[step]  # [L, H, n]
        grids = trace.vision_span.to_grid(att, 0)
        mask = torch.as_tensor(qa.mask)
        h = torch.tensor([[pointing_hit(paint_grid(g, trace.vision_span, size=tuple(mask.shape)), mask)
                           for g in layer] for layer in grids], dtype=torch.float)
        hits = h if hits is None else hits + h
    return hits / len(traces)


def step_pointing(traces, method: str = "llm_mean") -> dict[str, float]:
    """Pointing accuracy of ``method`` read at other steps than the answer step."""
    out = defaultdict(list)
    for trace, qa, step in traces:
        maps, mask = MAPS[method](trace), torch.as_tensor(qa.mask)
        for label, s in (("step 0 ('the')", 0), ("answer step - 1", step - 1), ("answer step", step),
                         ("answer step + 1", step + 1)):
            if 0 <= s < len(trace.steps):
                out[label].append(pointing_hit(paint_grid(maps[s], trace.vision_span, size=tuple(mask.shape)), mask))
    return {k: float(np.mean(v)) for k, v in out.items()}


def seed_claims(lens, traces) -> tuple[dict, dict]:
    """Vision share by word class; first logit-lens layer where the answer word is top-1."""
    share = defaultdict(list)
    first = defaultdict(int)
    for trace, _qa, step in traces:
        vs = vision_share(trace).mean[:, 0]
        for s, tok in enumerate(trace.tokens):
            word = tok.lstrip("▁")
            cls = ("answer word" if s == step else "content (echoed from question)" if word in CONTENT_WORDS
                   else "function" if word in FUNCTION_WORDS else None)
            if cls:
                share[(cls, word)].append(float(vs[s]))
        ranks = ll.logit_lens(trace, lens).target_ranks[:, step]
        top = (ranks == 0).nonzero().flatten()
        first[int(top[0]) if len(top) else -1] += 1
    return share, dict(first)


def mechanism_lines(lens, traces) -> list[str]:
    """Knockout by layer, image-attention entropy by layer, and the heads most changed by a blank image."""
    ko, ent, change, share = [], [], [], []
    for trace, _qa, step in traces:
        image, prefix, target = np.asarray(trace.image), trace.token_ids[:step], trace.token_ids[step]
        k = knockout_windows(lens, image, trace.question, prefix, target)
        ko.append([k.baseline, *k.probs.tolist(), k.all_layers])
        ent.append(image_attention_entropy(trace, normalized=True)[step])
        focus = head_focus(lens, trace, step)
        change.append(focus.blank_change)
        share.append(focus.image_share)
    ko, n = np.mean(ko, 0), lens.n_layers
    lines = ["", "## Attention knockout (last position -/-> image tokens), mean answer probability", "",
             "| none | " + " | ".join(f"L{i}" for i in range(n)) + " | all layers |", "|---" * (n + 2) + "|",
             "| " + " | ".join(f"{v:.3f}" for v in ko) + " |", "",
             "## Normalised image-attention entropy at the answer step (1 = uniform over patches)", "",
             " | ".join(f"L{i}: {v:.3f}" for i, v in enumerate(torch.stack(ent).mean(0).tolist())), "",
             "## Heads (layer, head): image attention share and output change with a blank image", ""]
    focus = HeadFocus(torch.stack(share).mean(0), torch.stack(change).mean(0))
    for by in ("image_share", "blank_change"):
        top = ", ".join(f"L{la}H{h} {v:.2f}" for la, h, v in focus.ranking(by)[:5])
        lines.append(f"- top 5 by {by}: {top}")
    return lines


def main() -> None:
    """Run the evaluation and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7 * 2**50 + 10_000)
    parser.add_argument("--qtypes", default="color", help="comma-separated question types (color,shape)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    lens = ll.load(device="cpu")
    memo: dict = {}

    def occlusion(trace, layers=None):  # layer-independent: computed once per trace
        if memo.get("trace") is not trace:
            memo.update(trace=trace, map=occlusion_map(lens, trace))
        return memo["map"]

    maps = dict(MAPS, llm_mean_no_sinks=sink_excluded_map(MAPS["llm_mean"]),
                contrastive_llm_mean=contrastive_map_fn(lens, "llm_mean"), occlusion=occlusion)
    n = lens.n_layers
    ranges = {"all": None, "early": "early", "late": "late", **{f"L{i}": [i] for i in range(n)}}
    res = evaluate_grounding(lens, args.scenes, args.seed, ranges, maps, qtypes=args.qtypes.split(","),
                             keep_traces=True)
    lines = [f"## Grounding scores ({res.n_examples} examples scored, {res.n_skipped} wrong answers skipped, "
             f"{args.scenes} held-out scenes)", "", res.table(), ""]
    n_sinks = [len(find_sinks(t).indices) for t, _, _ in res.traces]
    lines += [f"Sinks found (norm > 3x median, layers 1..{n - 1}): mean {np.mean(n_sinks):.2f} per image, "
              f"max {max(n_sinks)}.", ""]
    hp = head_pointing(res.traces)
    lines += ["## Single-head pointing accuracy (llm attention of one head, answer step)", "",
              "| layer | " + " | ".join(f"head {h}" for h in range(hp.shape[1])) + " |",
              "|---" * (hp.shape[1] + 1) + "|"]
    lines += [f"| {layer} | " + " | ".join(f"{v:.1%}" for v in row) + " |" for layer, row in enumerate(hp.tolist())]
    lines += ["", "## llm_mean pointing by step", ""]
    lines += [f"- {k}: {v:.1%}" for k, v in step_pointing(res.traces).items()]
    share, first = seed_claims(lens, res.traces)
    lines += ["", "## Seed claims", "", "| class | word | n | vision share (mean over layers, heads) |",
              "|---|---|---|---|"]
    for cls in ("answer word", "content (echoed from question)", "function"):
        vals = [v for (c, _), vs in share.items() if c == cls for v in vs]
        lines.append(f"| {cls} | (all) | {len(vals)} | {np.mean(vals):.3f} |")
    for (cls, word), vs in sorted(share.items()):
        lines.append(f"| {cls} | {word} | {len(vs)} | {np.mean(vs):.3f} |")
    lines += mechanism_lines(lens, res.traces)
    lines += ["", f"First logit-lens layer (0 = embeddings, {n} = final) where the answer word is top-1, "
              f"over {res.n_examples} examples: {dict(sorted(first.items()))}",
              "", f"Runtime: {time.time() - t0:.0f} s"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
