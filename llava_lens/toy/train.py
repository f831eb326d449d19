r"""Train the embedded ``shapes-tiny`` LLaVA from scratch on procedural shape scenes.

    python -m llava_lens.toy.train --out /tmp/shapes-run --steps 5000

The model (CLIP ViT + Llama + MLP projector, built by :func:`llava_lens.toy.build.build_llava`)
is teacher-forced on ``USER: <image>\n{question} ASSISTANT: {answer}</s>`` with the loss on the
answer tokens only. Batches are a pure function of ``(seed, step)``, so a run resumed with
``--resume`` from its last checkpoint (safetensors + JSON, no pickles) sees the same data.

Options for continuing a run whose vision tower has not learned shapes (answer-word loss on shape
questions stuck at ln 6): ``--schedule-start`` restarts warmup + cosine at a step, ``--qa-weights``
over-samples question types, ``--easy-frac`` mixes in single-object scenes, and ``--aux-weight`` adds
a training-only linear shape classifier on the projected features of the asked-about object's
patches (its weights live in the checkpoint only, never in the saved model).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoProcessor

from llava_lens.toy.build import BASE_WORDS, build_llava, word_tokenizer
from llava_lens.toy.scenes import QTYPES, SHAPES, Style, make_scene

DEFAULT_OUT = Path(__file__).parent / "shapes-tiny"
SIZES = dict(image_size=64, patch_size=8, vision_width=64, vision_layers=4, vision_heads=4,
             d_model=128, n_layers=4, n_heads=4)
TINY_SIZES = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
                  d_model=32, n_layers=2, n_heads=2)
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def scene_seed(seed: int, step: int, index: int, batch_size: int) -> int:
    """The scene seed of sample ``index`` of training step ``step`` (training seeds stay < 2**50)."""
    return (seed % 1024) * 2**40 + step * batch_size + index


def pixels(images: list[np.ndarray]) -> torch.Tensor:
    """CLIP-normalised ``[B, 3, H, W]`` pixels (what the CLIP image processor gives at native size)."""
    arr = (np.stack(images).astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


class Batches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``step`` is the whole training batch of that step."""

    def __init__(self, processor, seed: int, batch_size: int, style: Style,
                 qa_weights: Optional[dict[str, float]] = None, easy_frac: float = 0.0):
        self.tok = processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self.seed, self.batch_size, self.style = seed, batch_size, style
        self.qa_weights, self.easy_frac, self.aux = qa_weights, easy_frac, False
        self.easy = replace(style, max_objects=1)  # single-object scenes: shape is pure recognition
        self.patch = processor.patch_size
        self.n_image = (style.size // self.patch) ** 2

    def __len__(self) -> int:
        return 2**31

    def encode(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """Token ids and labels of one prompt + answer (labels are -100 outside the answer)."""
        prompt = self.tok(f"USER: <image>\n{question} ASSISTANT:")["input_ids"]
        i = prompt.index(self.image_id)
        prompt = prompt[:i] + [self.image_id] * self.n_image + prompt[i + 1:]
        target = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return prompt + target, [-100] * len(prompt) + target

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        ids, labels, images, aux_mask, aux_shape = [], [], [], [], []
        for index in range(self.batch_size):
            seed = scene_seed(self.seed, step, index, self.batch_size)
            rng = np.random.default_rng(seed + 7)
            if self.qa_weights is None and not self.easy_frac:  # the original (uniform) sampling
                scene = make_scene(seed, self.style)
                qa = scene.qas[rng.integers(len(scene.qas))]
            else:
                scene = make_scene(seed, self.easy if rng.random() < self.easy_frac else self.style)
                w = np.array([(self.qa_weights or {}).get(q.qtype, 1.0) for q in scene.qas])
                qa = scene.qas[rng.choice(len(scene.qas), p=w / w.sum())]
            x, y = self.encode(qa.question, qa.answer)
            obj = scene.objects[qa.obj if qa.obj is not None else 0]
            p = self.patch
            aux_mask.append(obj.mask.reshape(self.style.size // p, p, -1, p).mean((1, 3)).reshape(-1))
            aux_shape.append(SHAPES.index(obj.shape))
            ids.append(x)
            labels.append(y)
            images.append(scene.image)
        width = max(map(len, ids))
        pad = self.tok.pad_token_id
        batch = {
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
            "pixel_values": pixels(images),
        }
        if self.aux:  # targets of the auxiliary shape loss: object coverage of each patch, shape index
            batch.update(aux_mask=torch.from_numpy(np.stack(aux_mask)).float(), aux_shape=torch.tensor(aux_shape))
        return batch


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 5% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def _params(model, head=None) -> list:
    return list(model.parameters()) + (list(head.parameters()) if head is not None else [])


def save_checkpoint(ckpt: Path, model, opt, state: dict, head=None) -> None:
    """Model (and training-only aux head) and AdamW moments as safetensors, everything else as JSON."""
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    if head is not None:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(ckpt / "aux_head.safetensors"))
    moments, steps = {}, {}
    for i, p in enumerate(_params(model, head)):
        st = opt.state.get(p)
        if st:
            moments[f"{i}.exp_avg"], moments[f"{i}.exp_avg_sq"] = st["exp_avg"], st["exp_avg_sq"]
            steps[str(i)] = float(st["step"])
    save_file(moments, str(ckpt / "optimizer.safetensors"))
    (ckpt / "state.json").write_text(json.dumps({**state, "adam_steps": steps}, indent=1))


def load_checkpoint(ckpt: Path, model, opt, head=None) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the JSON state."""
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    if head is not None and (ckpt / "aux_head.safetensors").is_file():
        head.load_state_dict(load_file(str(ckpt / "aux_head.safetensors")))
    state = json.loads((ckpt / "state.json").read_text())
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    for i, p in enumerate(_params(model, head)):
        if f"{i}.exp_avg" in moments:
            opt.state[p] = {"step": torch.tensor(state["adam_steps"][str(i)]),
                            "exp_avg": moments[f"{i}.exp_avg"].to(p.device),
                            "exp_avg_sq": moments[f"{i}.exp_avg_sq"].to(p.device)}
    return state


def build(out: Path, sizes: dict, seed: int):
    """A fresh random model and its processor, saved to ``out``."""
    model = build_llava(out, "llava", tokenizer=word_tokenizer(BASE_WORDS), seed=seed, **sizes)
    return model, AutoProcessor.from_pretrained(out)


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) training; writes checkpoints under ``out/checkpoint`` and the final model to ``out``."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out / "checkpoint"
    sizes = TINY_SIZES if args.tiny else SIZES
    model, processor = build(out, sizes, args.seed)
    device = torch.device(args.device)
    model.to(device).train()
    # Training-only auxiliary head: shape of the asked-about object from the projected image
    # features the language model sees (mean over the object's patches). Not part of the saved model.
    head = torch.nn.Linear(sizes["d_model"], len(SHAPES)).to(device) if args.aux_weight else None
    opt = torch.optim.AdamW(_params(model, head), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    state = {"step": 0, "losses": [], "seconds": 0.0}
    if args.resume and (ckpt / "state.json").is_file():
        state = load_checkpoint(ckpt, model, opt, head)
    style = Style(size=sizes["image_size"])
    weights = dict(zip(QTYPES, map(float, args.qa_weights.split(",")))) if args.qa_weights else None
    data = Batches(processor, args.seed, args.batch_size, style, weights, args.easy_frac)
    data.aux = bool(args.aux_weight)
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(state["step"], args.steps),
                                         num_workers=args.workers)
    bar = tqdm(loader, total=args.steps, initial=state["step"], desc="train", mininterval=2)
    start, running = time.time() - state["seconds"], None
    for batch in bar:
        step = state["step"]
        for g in opt.param_groups:
            g["lr"] = lr_at(step - args.schedule_start, args.steps - args.schedule_start, args.lr, args.warmup)
        batch = {k: v.to(device) for k, v in batch.items()}
        mask, shape = batch.pop("aux_mask", None), batch.pop("aux_shape", None)
        output = model(**batch)
        loss = answer_loss = output.loss
        if head is not None:
            feats = output.image_hidden_states.reshape(mask.shape[0], mask.shape[1], -1)
            pooled = (feats * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1e-6)
            loss = loss + args.aux_weight * torch.nn.functional.cross_entropy(head(pooled), shape)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = answer_loss.item() if running is None else 0.95 * running + 0.05 * answer_loss.item()
        state["step"], state["seconds"] = step + 1, time.time() - start
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            state["losses"].append([step + 1, round(running, 5)])
        bar.set_postfix(loss=f"{running:.4f}")
        over_time = args.max_minutes and state["seconds"] > 60 * args.max_minutes
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or over_time:
            save_checkpoint(ckpt, model, opt, {**state, "args": vars(args)}, head)
        if over_time:
            break
    model.eval().to("cpu").save_pretrained(out)
    processor.save_pretrained(out)
    log = {"seed": args.seed, "steps": state["step"], "batch_size": args.batch_size, "lr": args.lr,
           "sizes": sizes, "threads": args.threads,
           "schedule_start": args.schedule_start, "qa_weights": args.qa_weights, "easy_frac": args.easy_frac,
           "aux_weight": args.aux_weight,
           "seconds": round(state["seconds"], 1), "losses": state["losses"]}
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments of ``python -m llava_lens.toy.train``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint, if any")
    p.add_argument("--schedule-start", type=int, default=0,
                   help="step at which warmup + cosine (re)start, e.g. to continue a finished run at a higher lr")
    p.add_argument("--qa-weights", default="",
                   help="sampling weights of the question types " + ",".join(QTYPES) + " (default: uniform)")
    p.add_argument("--aux-weight", type=float, default=0.0,
                   help="weight of the training-only shape loss on the object's projected image features")
    p.add_argument("--easy-frac", type=float, default=0.0, help="fraction of single-object scenes")
    p.add_argument("--checkpoint-dir", default=None, help="default: OUT/checkpoint (not part of the shipped model)")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this long")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (tests/CI smoke runs)")
    return p.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps({k: v for k, v in train(parse_args()).items() if k != "losses"}))
