"""Held-out accuracy of the embedded ``shapes-tiny`` model, per question type.

    python -m llava_lens.toy.evaluate [--model DIR] [--scenes 500]

Conditions: the original renderer's distribution (held-out seeds), a blank image (the model must
need the image: accuracy should stay near chance), and scenes drawn differently (other canvas sizes,
outlines instead of fills, a textured, light or coloured background, large objects, soft edges).
An answer is right when its words and punctuation equal the expected answer's (the word-level
decoder may glue punctuation onto words). The issue-#19 targets are printed as met or missed.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from llava_lens.toy.scenes import COLORS, NUMBERS, QTYPES, SHAPES, Style, blank_image, make_scene

DEFAULT_MODEL = Path(__file__).parent / "shapes-tiny"
HELD_OUT_BASE = 7 * 2**50  # training scene seeds stay below 2**50
CONDITIONS = {
    "held-out": Style(),
    "blank image": Style(),
    "canvas 96px": Style(size=96),
    "canvas 48px": Style(size=48),
    "outlines": Style(outline=True),
    "textured bg": Style(texture=True),
    "canvas 128px": Style(size=128),
    "light bg": Style(background="light"),
    "coloured bg": Style(background="colour"),
    "large objects": Style(radius=(0.18, 0.25)),
    "soft edges": Style(antialias=True),
}
# The conditions drawn unlike the original renderer, on which colour must reach the 85%.
OFF_DISTRIBUTION = tuple(c for c in CONDITIONS if c not in ("held-out", "blank image"))
# Accuracy of a guess that ignores the image, per question type (answers are balanced).
CHANCE = {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "count": 1 / 4, "position": 1 / 2,
          "exists": 1 / 2}


def normalize(text: str) -> list[str]:
    """Lower-cased words and punctuation marks of an answer."""
    return re.findall(r"[a-z]+|[^\sa-z]", text.lower())


def held_out_qas(n_scenes: int, style: Style = Style(), base: int = HELD_OUT_BASE):
    """``(image, question, answer, qtype)`` for every QA of ``n_scenes`` held-out scenes."""
    rows = []
    for k in range(n_scenes):
        scene = make_scene(base + k, style)
        rows.extend((scene.image, qa.question, qa.answer, qa.qtype) for qa in scene.qas)
    return rows


@torch.no_grad()
def answer_batch(model, processor, images: list[np.ndarray], questions: list[str],
                 max_new_tokens: int = 12) -> list[str]:
    """Greedy answers of ``model`` to ``questions`` about ``images`` (one batch, left-padded)."""
    tok = processor.tokenizer
    prompts = [f"USER: <image>\n{q} ASSISTANT:" for q in questions]
    tok.padding_side = "left"
    pil = [Image.fromarray(im, "RGB") for im in images]
    enc = processor(images=pil, text=prompts, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def accuracy(model, processor, rows, batch_size: int = 100, blank: bool = False) -> dict[str, float]:
    """Fraction of exactly right answers per question type, plus ``overall``."""
    right, total = defaultdict(int), defaultdict(int)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        images = [blank_image(r[0].shape[0]) if blank else r[0] for r in chunk]
        answers = answer_batch(model, processor, images, [r[1] for r in chunk])
        for (_, _, expected, qtype), got in zip(chunk, answers):
            ok = normalize(got) == normalize(expected)
            for key in (qtype, "overall"):
                right[key] += ok
                total[key] += 1
    return {k: right[k] / total[k] for k in (*QTYPES, "overall") if total[k]}


def chance_overall(rows) -> float:
    """Expected accuracy of image-blind guessing on ``rows`` (question-type mix weighted)."""
    return float(np.mean([CHANCE[r[3]] for r in rows]))


def table(results: dict[str, dict[str, float]], chance: float) -> str:
    """A Markdown table: one row per condition, one column per question type."""
    cols = (*QTYPES, "overall")
    lines = ["| condition | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines.append("| chance | " + " | ".join(f"{100 * CHANCE[c]:.1f}" for c in QTYPES) + f" | {100 * chance:.1f} |")
    for name, acc in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * acc.get(c, float('nan')):.1f}" for c in cols) + " |")
    return "\n".join(lines)


def target_report(results: dict[str, dict[str, float]]) -> list[str]:
    """Each accuracy target of the embedded model (issue #19) that ``results`` covers: met or missed, by how much."""
    goals = [("held-out", "color", 0.97), ("held-out", "shape", 0.95), ("held-out", "overall", 0.92)]
    goals += [(name, "color", 0.85) for name in OFF_DISTRIBUTION]
    lines = []
    for name, qtype, goal in goals:
        if name in results and qtype in results[name]:
            got = results[name][qtype]
            verdict = "met" if got >= goal else f"MISSED by {100 * (goal - got):.1f} points"
            lines.append(f"{name} {qtype} {100 * got:.1f} >= {100 * goal:.0f}: {verdict}")
    if "blank image" in results:
        got, goal = results["blank image"]["overall"], results.get("_chance", {}).get("overall", 0.0) + 0.10
        verdict = "met" if got <= goal else f"MISSED by {100 * (got - goal):.1f} points"
        lines.append(f"blank image overall {100 * got:.1f} <= chance + 10 = {100 * goal:.1f}: {verdict}")
    return lines


def evaluate(model_dir: str | Path, n_scenes: int = 500, n_ood: int = 200, device: str = "cpu",
             only: tuple[str, ...] = ()) -> str:
    """Run every condition (or those named in ``only``) and return the Markdown accuracy table (percent)."""
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    results, chance = {}, None
    for name, style in CONDITIONS.items():
        if only and name not in only:
            continue
        rows = held_out_qas(n_scenes if name in ("held-out", "blank image") else n_ood, style)
        chance = chance if chance is not None else chance_overall(rows)
        results[name] = accuracy(model, processor, rows, blank=name == "blank image")
        print(name, {k: round(100 * v, 1) for k, v in results[name].items()}, flush=True)
    print("\n".join(target_report({**results, "_chance": {"overall": chance}})), flush=True)
    return table(results, chance)


def card_vocabulary(model_dir: str | Path) -> list[str]:
    """Every word (and punctuation mark) the model's tokenizer knows, special tokens left out."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    return sorted(w for w in tok.get_vocab() if w not in tok.all_special_tokens)


def write_card(model_dir: str | Path, results_table: str, n_scenes: int, n_ood: int) -> Path:
    """Write the model card ``README.md`` from ``train_log.json`` and a measured accuracy table."""
    model_dir = Path(model_dir)
    log = json.loads((model_dir / "train_log.json").read_text())
    losses = log["losses"]
    picks = [losses[i] for i in sorted({0, *range(0, len(losses), max(1, len(losses) // 12)), len(losses) - 1})]
    curve = "\n".join(f"| {step} | {stage} | {loss:.4f} |" for step, stage, loss in picks)
    sizes = ", ".join(f"{k}={v}" for k, v in log["sizes"].items())
    qa_steps = log["steps"] - log["vision_steps"]
    styles, weight = log.get("styles", "fixed"), log.get("answer_weight", 1.0)
    workers = log.get("vision_workers", 0)
    command = (f"python -m llava_lens.toy.train --vision-steps {log['vision_steps']} --vision-batch-size "
               f"{log['vision_batch_size']} --vision-lr {log['vision_lr']} --vision-workers {workers} --steps "
               f"{qa_steps} --batch-size {log['batch_size']} --lr {log['lr']} --extra-qtypes "
               f"'{log['extra_qtypes']}' --answer-weight {weight:g} --styles {styles}"
               + (f" --lm-heads {log['sizes']['n_heads']}" if "n_heads" in log["sizes"] else ""))
    cpu = f" ({log['cpu_seconds'] / 60:.1f} CPU minutes in the training process)" if log.get("cpu_seconds") else ""
    threads = (f"stage 1: {log['threads'] - workers} torch thread(s) + {workers} scene-drawing worker(s); "
               f"stage 2: {log['threads']} torch threads" if workers else f"{log['threads']} torch threads")
    text = CARD.format(command=command, cpu=cpu, styles=STYLES_NOTE[styles],
                       vocabulary=" ".join(card_vocabulary(model_dir)), seed=log["seed"],
                       vision_steps=log["vision_steps"], vision_batch=log["vision_batch_size"],
                       vision_lr=log["vision_lr"], qa_steps=qa_steps, extra=extra_phrase(log["extra_qtypes"]),
                       weighting=WEIGHTING_NOTE if weight == 1 else f"{WEIGHTING_NOTE}, {weight:g}x on {ATTRIBUTES}",
                       batch=log["batch_size"], lr=log["lr"],
                       minutes=log["seconds"] / 60, sizes=sizes, curve=curve, table=results_table,
                       n_scenes=n_scenes, n_ood=n_ood, base=HELD_OUT_BASE, threads=threads)
    (model_dir / "README.md").write_text(text)
    return model_dir / "README.md"


WEIGHTING_NOTE = "loss on the answer\n     tokens only"
ATTRIBUTES = "the words naming a colour, shape,\n     number, yes/no or side (`batches.ATTRIBUTE_WORDS`)"


def extra_phrase(extra_qtypes: str) -> str:
    """``"position,position,exists"`` -> ``"two more position and one more exists question"``."""
    counts = Counter(t for t in extra_qtypes.split(",") if t)  # as QABatches counts them; first-seen order
    parts = [f"{NUMBERS[n] if n < len(NUMBERS) else n} more {t}" for t, n in counts.items()]
    if not parts:
        return "no extra question"
    return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + " question"


STYLES_NOTE = {
    "fixed": ("Every training scene is drawn\n  the same way: dark noisy 64-px canvas, filled shapes of "
              "radius 10-16% of the canvas."),
    "random": ("Every training scene is drawn\n  in its own random style (`scenes.random_style`): dark, "
               "light or coloured background,\n  fills or outlines, radius 8-25% of the canvas, canvas "
               "48-128 px, texture, noise, soft or hard edges."),
}

CARD = """# shapes-tiny

A tiny LLaVA-1.5-architecture model (CLIP ViT vision tower + 2-layer MLP projector + Llama language
model) trained from scratch, in this repository, on procedural scenes of coloured shapes
(`llava_lens.toy.scenes`). It is the default model of `llava_lens.load()`. Every scene has
ground-truth per-object masks, so attributions can be checked against the true answer region.

- Sizes: {sizes}
- Tokenizer: word level (`llava_lens.toy.build.word_tokenizer`), lower-cases its input and splits
  punctuation from words, so "What color is the square?" reads as "what color is the square ?";
  prompt `USER: <image>\\n{{question}} ASSISTANT:`. Any other word is read as `<unk>` (llava-lens
  warns, naming it).
- Training, seed {seed}, {minutes:.1f} minutes of wall-clock time{cpu} on a shared 2-core CPU
  ({threads}):
  `{command}`
  in two stages:
  1. vision tower: {vision_steps} steps of {vision_batch} images, AdamW lr {vision_lr}; linear heads on the
     projector's input layer predict each patch's shape and colour (or background), row and column.
     The heads are training-only and not part of this model.
  2. projector + language model, vision tower frozen: {qa_steps} steps of {batch} scenes with all their
     question/answer pairs plus {extra} each, AdamW lr {lr}, {weighting}.
  Both stages warm up then decay on a cosine; training scenes use seeds below 2**50. {styles}
- Answers are short sentences: "the triangle is red .", "there are three objects .",
  "yes , there is a red circle .", "the star is on the left .", "the red object is a circle .".

## What it can answer

Exactly the five question forms it was trained on, about pictures of one to four simple flat shapes
(circle, square, triangle, star, diamond, cross) in eight colours (red, green, blue, yellow, purple,
orange, white, cyan): "what color is the circle ?", "what shape is the red object ?",
"how many objects are there ?", "is the star on the left or the right ?" / "is the star at the top
or the bottom ?", "is there a red circle ?". Anything else (photos, other objects, other questions)
gets an answer in one of these forms that means nothing.

Vocabulary (every word the tokenizer knows; the model was trained on the subset above):
{vocabulary}

## Training loss (running mean; vision: summed patch-label cross-entropy, language: answer tokens)

| step | stage | loss |
|---|---|---|
{curve}

## Held-out accuracy (percent, exact answer match), `python -m llava_lens.toy.evaluate`

Held-out scenes use seeds {base} + k; {n_scenes} scenes for "held-out" and "blank image",
{n_ood} scenes for each differently drawn condition (each scene gives one question per type).
"blank image" asks the held-out questions about an empty canvas: the model must need the image.

{table}

Measured numbers only; rerun the evaluate command to reproduce (`--write-card` rewrites this file).
Position and yes/no existence questions (the answer needs a conjunction of shape and colour, or the
object's column) are learned last: in an earlier run they were still at chance after 1600 stage-2
steps while colour, shape and count were learned (probes of 40 held-out scenes), which is why stage 2
asks them again (`--extra-qtypes`) and can weight the answer words. Every row below "blank image" is
drawn unlike the original renderer (`Style()`): for a model trained with `--styles fixed` it is off the
training distribution; `--styles random` trains on all of them.
"""


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--scenes", type=int, default=500)
    p.add_argument("--ood-scenes", type=int, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-card", action="store_true", help="write the model card README.md")
    p.add_argument("--only", default="", help="comma-separated conditions to run (default: all)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    result = evaluate(a.model, a.scenes, a.ood_scenes, a.device, tuple(filter(None, a.only.split(","))))
    print(result)
    if a.write_card:
        print("wrote", write_card(a.model, result, a.scenes, a.ood_scenes))
