"""The long form of ``llava-lens eval-grounding --details``: why the maps point where they do.

Single-head pointing, pointing by step, vision share by word class, the emergence layer of the
answer word, attention knockout by layer, image-attention entropy, and the heads a blank image
changes most. Each reads the ``(trace, qa, step)`` triples an evaluation kept
(``EvalOptions(keep_traces=True)``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from llava_lens.analysis.emergence import emergence_layers
from llava_lens.analysis.entropy import image_attention_entropy
from llava_lens.analysis.heads import HeadFocus, head_focus
from llava_lens.analysis.knockout import knockout_windows
from llava_lens.analysis.metrics import pointing_hit
from llava_lens.grounding import MAPS, image_attention, paint_grid, vision_share

FUNCTION_WORDS = {"the", "is", ".", "a", "object"}
"""Words of the embedded model's answers that carry no content (for the vision-share claim)."""


def _hit(grid: torch.Tensor, trace: Any, qa: Any) -> bool:
    mask = torch.as_tensor(qa.mask)
    return pointing_hit(paint_grid(grid, trace.vision_span, size=tuple(mask.shape)), mask)


def head_pointing(kept: Sequence[tuple]) -> torch.Tensor:
    """``[L, H]`` pointing accuracy of every single head's attention map at the answer step."""
    hits = []
    for trace, qa, step in kept:
        grids = trace.vision_span.to_grid(image_attention(trace, steps=[step])[0], 0)  # [L, H, rows, cols]
        hits.append(torch.tensor([[_hit(g, trace, qa) for g in layer] for layer in grids], dtype=torch.float))
    return torch.stack(hits).mean(0)


def step_pointing(kept: Sequence[tuple], method: str = "llm_mean") -> dict[str, float]:
    """Pointing accuracy of ``method`` read at other steps than the answer step."""
    out = defaultdict(list)
    for trace, qa, step in kept:
        maps = MAPS[method](trace)
        for label, s in (("step 0", 0), ("answer step - 1", step - 1), ("answer step", step),
                         ("answer step + 1", step + 1)):
            if 0 <= s < len(trace.steps):
                out[label].append(_hit(maps[s], trace, qa))
    return {k: float(np.mean(v)) for k, v in out.items()}


def word_classes(lens: Any, kept: Sequence[tuple]) -> tuple[dict, dict]:
    """Vision share per (word class, word); histogram of the answer word's emergence layer."""
    import llava_lens as ll
    from llava_lens.toy.scenes import COLORS, SHAPES

    content = set(COLORS) | set(SHAPES)
    share, emergence = defaultdict(list), defaultdict(int)
    for trace, _qa, step in kept:
        vs = vision_share(trace).mean[:, 0]
        for s, tok in enumerate(trace.tokens):
            word = tok.lstrip("▁Ġ ")
            cls = ("answer word" if s == step else "content (echoed from question)" if word in content
                   else "function" if word in FUNCTION_WORDS else None)
            if cls:
                share[(cls, word)].append(float(vs[s]))
        emergence[emergence_layers(ll.logit_lens(trace, lens).target_ranks)[step]] += 1
    return share, dict(emergence)


def _head_lines(kept: Sequence[tuple]) -> list[str]:
    hp = head_pointing(kept)
    lines = ["## Single-head pointing (one head's attention at the answer step)", "",
             "| layer | " + " | ".join(f"head {h}" for h in range(hp.shape[1])) + " |",
             "|---" * (hp.shape[1] + 1) + "|"]
    lines += [f"| {layer} | " + " | ".join(f"{v:.1%}" for v in row) + " |" for layer, row in enumerate(hp.tolist())]
    lines += ["", "## llm_mean pointing by step", ""]
    return lines + [f"- {k}: {v:.1%}" for k, v in step_pointing(kept).items()]


def _claim_lines(lens: Any, kept: Sequence[tuple]) -> list[str]:
    share, emergence = word_classes(lens, kept)
    lines = ["", "## Vision share by word class", "", "| class | word | n | vision share (mean over layers, heads) |",
             "|---|---|---|---|"]
    for cls in ("answer word", "content (echoed from question)", "function"):
        vals = [v for (c, _), vs in share.items() if c == cls for v in vs]
        if vals:
            lines.append(f"| {cls} | (all) | {len(vals)} | {np.mean(vals):.3f} |")
    lines += [f"| {cls} | {word} | {len(vs)} | {np.mean(vs):.3f} |" for (cls, word), vs in sorted(share.items())]
    return lines + ["", f"Emergence layer of the answer word (first logit-lens row from which it stays top-1; "
                        f"0 = embeddings, {lens.n_layers} = output; -1 never): {dict(sorted(emergence.items()))}"]


def _mechanism_lines(lens: Any, kept: Sequence[tuple]) -> list[str]:
    ko, ent, change, share = [], [], [], []
    for trace, _qa, step in kept:
        k = knockout_windows(lens, np.asarray(trace.image), trace.question, trace.token_ids[:step],
                             trace.token_ids[step])
        ko.append([k.baseline, *k.probs.tolist(), k.all_layers])
        ent.append(image_attention_entropy(trace, normalized=True)[step])
        focus = head_focus(lens, trace, step)
        change.append(focus.blank_change)
        share.append(focus.image_share)
    ko, n = np.mean(ko, 0), lens.n_layers
    lines = ["", "## Attention knockout (answer position -/-> image tokens), mean answer probability", "",
             "| none | " + " | ".join(f"L{i}" for i in range(n)) + " | all layers |", "|---" * (n + 2) + "|",
             "| " + " | ".join(f"{v:.3f}" for v in ko) + " |", "",
             "## Normalised image-attention entropy at the answer step (1 = uniform over patches)", "",
             " | ".join(f"L{i}: {v:.3f}" for i, v in enumerate(torch.stack(ent).mean(0).tolist())), "",
             "## Heads (layer, head): image attention share and output change with a blank image", ""]
    focus = HeadFocus(torch.stack(share).mean(0), torch.stack(change).mean(0))
    for by in ("image_share", "blank_change"):
        lines.append(f"- top 5 by {by}: " + ", ".join(f"L{la}H{h} {v:.2f}" for la, h, v in focus.ranking(by)[:5]))
    return lines


def details_report(lens: Any, kept: Sequence[tuple]) -> str:
    """Markdown of every analysis above over the kept ``(trace, qa, step)`` triples."""
    if not kept:
        return "no correctly answered example to analyse"
    return "\n".join(_head_lines(kept) + _claim_lines(lens, kept) + _mechanism_lines(lens, kept))
