r"""Train the embedded ``shapes-tiny`` LLaVA from scratch on procedural shape scenes.

    python -m llava_lens.toy.train --out /tmp/shapes-run --steps 5000

The model (CLIP ViT + Llama + MLP projector, built by :func:`llava_lens.toy.build.build_llava`)
is teacher-forced on ``USER: <image>\n{question} ASSISTANT: {answer}</s>`` with the loss on the
answer tokens only. Batches are a pure function of ``(seed, step)``, so a run resumed with
``--resume`` from its last checkpoint (safetensors + JSON, no pickles) sees the same data.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoProcessor

from llava_lens.toy.build import BASE_WORDS, build_llava, word_tokenizer
from llava_lens.toy.scenes import Style, make_scene

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

    def __init__(self, processor, seed: int, batch_size: int, style: Style):
        self.tok = processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self.seed, self.batch_size, self.style = seed, batch_size, style
        self.n_image = (style.size // processor.patch_size) ** 2

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
        ids, labels, images = [], [], []
        for index in range(self.batch_size):
            seed = scene_seed(self.seed, step, index, self.batch_size)
            scene = make_scene(seed, self.style)
            qa = scene.qas[np.random.default_rng(seed + 7).integers(len(scene.qas))]
            x, y = self.encode(qa.question, qa.answer)
            ids.append(x)
            labels.append(y)
            images.append(scene.image)
        width = max(map(len, ids))
        pad = self.tok.pad_token_id
        return {
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
            "pixel_values": pixels(images),
        }


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 5% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def save_checkpoint(ckpt: Path, model, opt, state: dict) -> None:
    """Model and AdamW moments as safetensors, everything else as JSON."""
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    moments, steps = {}, {}
    for i, p in enumerate(model.parameters()):
        st = opt.state.get(p)
        if st:
            moments[f"{i}.exp_avg"], moments[f"{i}.exp_avg_sq"] = st["exp_avg"], st["exp_avg_sq"]
            steps[str(i)] = float(st["step"])
    save_file(moments, str(ckpt / "optimizer.safetensors"))
    (ckpt / "state.json").write_text(json.dumps({**state, "adam_steps": steps}, indent=1))


def load_checkpoint(ckpt: Path, model, opt) -> dict:
    """Restore what :func:`save_checkpoint` wrote; returns the JSON state."""
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    state = json.loads((ckpt / "state.json").read_text())
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    for i, p in enumerate(model.parameters()):
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
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    state = {"step": 0, "losses": [], "seconds": 0.0}
    if args.resume and (ckpt / "state.json").is_file():
        state = load_checkpoint(ckpt, model, opt)
    style = Style(size=sizes["image_size"])
    data = Batches(processor, args.seed, args.batch_size, style)
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(state["step"], args.steps),
                                         num_workers=args.workers)
    bar = tqdm(loader, total=args.steps, initial=state["step"], desc="train", mininterval=2)
    start, running = time.time() - state["seconds"], None
    for batch in bar:
        step = state["step"]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        state["step"], state["seconds"] = step + 1, time.time() - start
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            state["losses"].append([step + 1, round(running, 5)])
        bar.set_postfix(loss=f"{running:.4f}")
        over_time = args.max_minutes and state["seconds"] > 60 * args.max_minutes
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or over_time:
            save_checkpoint(ckpt, model, opt, {**state, "args": vars(args)})
        if over_time:
            break
    model.eval().to("cpu").save_pretrained(out)
    processor.save_pretrained(out)
    log = {"seed": args.seed, "steps": state["step"], "batch_size": args.batch_size, "lr": args.lr,
           "sizes": sizes, "threads": args.threads, "seconds": round(state["seconds"], 1), "losses": state["losses"]}
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
