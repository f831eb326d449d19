r"""Train the embedded ``shapes-tiny`` LLaVA from scratch on procedural shape scenes.

    python -m llava_lens.toy.train --out /tmp/shapes-run

The defaults are the recipe of the shipped checkpoint (its model card states it flag by flag).

Two stages, as a real LLaVA is made (a pretrained CLIP encoder, then the language side):

1. ``--vision-steps``: the CLIP vision tower learns to say, for every patch, the shape and colour of
   the object covering it (or background) and where the patch is, through small linear heads on
   the feature layer the projector reads. These heads are training-only and never saved with the
   model. Learning shapes from the answer loss alone is far slower: an earlier run trained that
   way for 4350 steps and its vision tower still could not tell shapes apart (15% on shape questions).
2. ``--steps``: the vision tower is frozen (as in LLaVA-1.5); the projector and the Llama language
   model learn to answer, teacher-forced with the loss on the answer tokens only, on every QA pair
   of each scene with the scene's image encoded once. ``--answer-weight`` weighs the words that
   name a colour, shape, number, yes/no or side above the rest of the sentence, and
   ``--extra-qtypes`` asks the slow types again (a type named twice is asked twice more).

Batches are a pure function of ``(seed, step)``, so a run resumed with ``--resume`` from its last
checkpoint (safetensors + JSON, no pickles) sees the same data and ends with the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoProcessor

from llava_lens.toy.batches import COLOR_NAMES, PatchBatches, QABatches, StyleLike
from llava_lens.toy.build import BASE_WORDS, ModelSizes, build_llava, word_tokenizer
from llava_lens.toy.scenes import SHAPES, Style, random_style

DEFAULT_OUT = Path(__file__).parent / "shapes-tiny"
SIZES = ModelSizes(image_size=64, patch_size=8, vision_width=64, vision_layers=4, vision_heads=4,
                   d_model=128, n_layers=4, n_heads=8)
TINY_SIZES = ModelSizes(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
                        d_model=32, n_layers=2, n_heads=2)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 5% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


class PatchHeads(torch.nn.Module):
    """Training-only linear read-outs of patch features: shape, colour (each + background), row, column."""

    def __init__(self, width: int, grid: int):
        super().__init__()
        sizes = (len(SHAPES) + 1, len(COLOR_NAMES) + 1, grid, grid)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, n) for n in sizes)

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of ``features [B, P, width]`` against ``labels [B, 4, P]``."""
        return sum(torch.nn.functional.cross_entropy(head(features).flatten(0, 1), labels[:, i].flatten())
                   for i, head in enumerate(self.heads))


def patch_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[B, P, width]`` vision-tower features at the layer the projector reads (CLS dropped)."""
    layer = model.config.vision_feature_layer
    return model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[layer][:, 1:]


def shared_prefix_length(ids: torch.Tensor) -> int:
    """How many leading columns of ``ids [N, T]`` are equal in every row (at least one column is left)."""
    same = (ids == ids[:1]).all(0)
    return int(same.long().cumprod(0).sum().clamp(max=ids.shape[1] - 1))


def qa_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Answer-token loss of a :class:`QABatches` batch: each image encoded once, frozen tower.

    Every prompt starts ``USER: <image>...``, so a scene's 4-7 sequences share their first ~66
    positions: those run once per scene and their keys/values are copied to each of the scene's
    sequences (~2.5x fewer positions through the language model). Labels there are all -100.
    The loss is :func:`weighted_loss` with the batch's ``weights``; with every weight 1 it equals
    ``model(input_ids, pixel_values=pixel_values[scene_index], ...).loss`` (tested).
    """
    with torch.no_grad():
        hidden = patch_features(model, batch["pixel_values"])
    features = model.model.multi_modal_projector(hidden)
    ids, index = batch["input_ids"], batch["scene_index"]
    n = shared_prefix_length(ids)
    if (batch["labels"][:, : n + 1] != -100).any():  # the prediction made at position n - 1 is dropped
        raise ValueError("qa_loss: an answer token lies in the prompt prefix shared by every sequence")
    prefix = ids[:1, :n].expand(len(features), n)  # equal in every row by definition: one per scene
    embeds = model.get_input_embeddings()(prefix)
    embeds = embeds.masked_scatter((prefix == model.config.image_token_id)[..., None], features.to(embeds.dtype))
    cache = model(inputs_embeds=embeds, use_cache=True).past_key_values
    cache.reorder_cache(index)  # scene rows -> sequence rows (differentiable indexing)
    suffix = model.get_input_embeddings()(ids[:, n:])
    logits = model(inputs_embeds=suffix, past_key_values=cache, attention_mask=batch["attention_mask"]).logits
    return weighted_loss(logits, batch["labels"][:, n:], batch["weights"][:, n:])


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``logits [N, T, V]``, each label weighted (``weights [N, T]``, 0 = unscored).

    With every answer token weighted 1 this is the mean that ``model(..., labels=labels).loss`` gives.
    """
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                            ignore_index=-100, reduction="none")
    w = weights[:, 1:].flatten().to(nll.dtype)
    return (nll * w).sum() / w.sum()


@dataclass
class Stage:
    """One training stage: global steps ``[start, end)``, what it trains and how."""

    name: str
    start: int
    end: int
    params: list
    lr: float
    warmup: int
    data: torch.utils.data.Dataset
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    workers: int = 0


def qa_batches(processor, args: argparse.Namespace, style: StyleLike) -> QABatches:
    """Stage 2's batches as ``args`` (from :func:`parse_args`) configure them."""
    extra = tuple(filter(None, args.extra_qtypes.split(",")))
    return QABatches(processor, args.seed, args.batch_size, style, extra, args.answer_weight)


def stages(model, heads: PatchHeads, processor, args: argparse.Namespace, style: StyleLike) -> list[Stage]:
    """The vision-pretraining stage then the question-answering stage."""
    vision = list(model.model.vision_tower.parameters())
    language = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    v = args.vision_steps
    return [
        Stage("vision", 0, v, vision + list(heads.parameters()), args.vision_lr, args.warmup,
              PatchBatches(args.seed, args.vision_batch_size, style, processor.patch_size,
                           processor.image_processor.crop_size["height"]),
              lambda b: heads.loss(patch_features(model, b["pixel_values"]), b["labels"]), args.vision_workers),
        Stage("language", v, v + args.steps, language, args.lr, args.warmup,
              qa_batches(processor, args, style),
              lambda b: qa_loss(model, b), args.workers),
    ]


def save_checkpoint(ckpt: Path, model, heads, opt, params: list, state: dict) -> None:
    """Model, training-only heads and the stage's AdamW moments as safetensors; the rest as JSON."""
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    save_file(heads.state_dict(), str(ckpt / "heads.safetensors"))
    moments, steps = {}, {}
    for i, p in enumerate(params):
        if opt.state.get(p):
            st = opt.state[p]
            moments[f"{i}.exp_avg"], moments[f"{i}.exp_avg_sq"] = st["exp_avg"], st["exp_avg_sq"]
            steps[str(i)] = float(st["step"])
    save_file(moments, str(ckpt / "optimizer.safetensors"))
    (ckpt / "state.json").write_text(json.dumps({**state, "adam_steps": steps}, indent=1))


def load_checkpoint(ckpt: Path, model, heads) -> dict:
    """Restore weights from :func:`save_checkpoint`; returns the JSON state (moments: see ``restore_moments``)."""
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    heads.load_state_dict(load_file(str(ckpt / "heads.safetensors")))
    return json.loads((ckpt / "state.json").read_text())


def restore_moments(ckpt: Path, opt, params: list, state: dict) -> None:
    """Put the saved AdamW moments back on ``params`` (the stage that was running when saved)."""
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    for i, p in enumerate(params):
        if f"{i}.exp_avg" in moments:
            opt.state[p] = {"step": torch.tensor(state["adam_steps"][str(i)]),
                            "exp_avg": moments[f"{i}.exp_avg"].to(p.device),
                            "exp_avg_sq": moments[f"{i}.exp_avg_sq"].to(p.device)}


def run_stage(stage: Stage, model, heads, state: dict, args: argparse.Namespace, ckpt: Path, resumed: bool) -> bool:
    """Train ``stage`` from ``state["step"]``; returns False when the time limit stopped it."""
    model.model.vision_tower.requires_grad_(stage.name == "vision")
    # A data-loading worker takes a core: the vision stage spends as long drawing scenes as computing,
    # so there one worker + one torch thread beats two threads (0.22 vs 0.32 s/step on 2 cores).
    torch.set_num_threads(max(1, args.threads - stage.workers))
    opt = torch.optim.AdamW(stage.params, lr=stage.lr, weight_decay=0.01, betas=(0.9, 0.98))
    if resumed:
        restore_moments(ckpt, opt, stage.params, state)
    loader = torch.utils.data.DataLoader(stage.data, batch_size=None, sampler=range(state["step"], stage.end),
                                         num_workers=stage.workers)
    bar = tqdm(loader, total=stage.end - stage.start, initial=state["step"] - stage.start,
               desc=stage.name, mininterval=2)
    start, running = time.time() - state["seconds"], None
    cpu_start = time.process_time() - state.get("cpu_seconds", 0.0)  # this process's threads, not workers
    for batch in bar:
        step = state["step"]
        for g in opt.param_groups:
            g["lr"] = lr_at(step - stage.start, stage.end - stage.start, stage.lr, stage.warmup)
        loss = stage.loss({k: v.to(args.device) for k, v in batch.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.params, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        state["step"], state["seconds"] = step + 1, time.time() - start
        state["cpu_seconds"] = time.process_time() - cpu_start
        if (step + 1) % 50 == 0 or step + 1 == stage.end:
            state["losses"].append([step + 1, stage.name, round(running, 5)])
        bar.set_postfix(loss=f"{running:.4f}")
        over_time = bool(args.max_minutes) and state["seconds"] > 60 * args.max_minutes
        if (step + 1) % args.save_every == 0 or step + 1 == stage.end or over_time:
            save_checkpoint(ckpt, model, heads, opt, stage.params, {**state, "args": vars(args)})
        if over_time:
            return False
    return True


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) training; writes checkpoints under ``out/checkpoint`` and the final model to ``out``."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out / "checkpoint"
    sizes = TINY_SIZES if args.tiny else SIZES
    if args.lm_heads:  # head count changes no parameter shape: the same seed gives the same initial weights
        sizes = replace(sizes, n_heads=args.lm_heads)
    model = build_llava(out, "llava", tokenizer=word_tokenizer(BASE_WORDS), sizes=sizes, seed=args.seed)
    processor = AutoProcessor.from_pretrained(out)
    heads = PatchHeads(sizes.vision_width, sizes.image_size // sizes.patch_size)
    model.to(args.device).train()
    heads.to(args.device)
    state = {"step": 0, "losses": [], "seconds": 0.0, "cpu_seconds": 0.0}
    resumed = args.resume and (ckpt / "state.json").is_file()
    if resumed:
        state = load_checkpoint(ckpt, model, heads)
    style = random_style if args.styles == "random" else Style(size=sizes.image_size)
    for stage in stages(model, heads, processor, args, style):
        if state["step"] >= stage.end:
            continue
        # Moments on disk belong to the stage that was running when the checkpoint was written.
        if not run_stage(stage, model, heads, state, args, ckpt, resumed and state["step"] > stage.start):
            break
        resumed = False
    model.eval().to("cpu").save_pretrained(out)
    processor.save_pretrained(out)
    log = {"seed": args.seed, "steps": state["step"], "vision_steps": args.vision_steps,
           "vision_batch_size": args.vision_batch_size, "vision_lr": args.vision_lr,
           "batch_size": args.batch_size, "extra_qtypes": args.extra_qtypes,
           "answer_weight": args.answer_weight, "lr": args.lr,
           "styles": args.styles, "warmup": args.warmup,
           "sizes": {k: v for k, v in asdict(sizes).items() if v is not None},
           "threads": args.threads, "vision_workers": args.vision_workers,
           "seconds": round(state["seconds"], 1), "cpu_seconds": round(state.get("cpu_seconds", 0.0), 1),
           "losses": state["losses"]}
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments of ``python -m llava_lens.toy.train``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--vision-steps", type=int, default=3200, help="stage 1: patch-label pretraining steps")
    p.add_argument("--vision-batch-size", type=int, default=64, help="images per stage-1 step")
    p.add_argument("--vision-lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=3000, help="stage 2: question-answering steps")
    p.add_argument("--batch-size", type=int, default=12, help="scenes per stage-2 step (all their QA pairs)")
    p.add_argument("--extra-qtypes", default="shape,position,position,exists,exists",
                   help="question types asked again per scene in stage 2, once per mention (comma-separated; "
                        "'' for none)")
    p.add_argument("--answer-weight", type=float, default=4.0,
                   help="stage 2 loss weight of the answer words naming a colour, shape, number, yes/no or side "
                        "(batches.ATTRIBUTE_WORDS; other answer tokens weigh 1)")
    p.add_argument("--styles", choices=("random", "fixed"), default="random",
                   help="random: every scene drawn in its own style (scenes.random_style); fixed: the original "
                        "dark 64-px renderer")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint, if any")
    p.add_argument("--checkpoint-dir", default=None, help="default: OUT/checkpoint (not part of the shipped model)")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--vision-workers", type=int, default=0,
                   help="stage 1 data-loading processes (each takes one of --threads; faster, but a different "
                        "thread layout gives a different vision tower than the shipped one)")
    p.add_argument("--workers", type=int, default=0, help="stage 2 data-loading processes")
    p.add_argument("--threads", type=int, default=2, help="CPU cores to use (torch threads + data workers)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-minutes", type=float, default=0, help="stop (and save) after this long")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (tests/CI smoke runs)")
    p.add_argument("--lm-heads", type=int, default=0,
                   help="language-model attention heads (default: the model size's own; 8 for the shipped size, "
                        "head dim 16)")
    return p.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps({k: v for k, v in train(parse_args()).items() if k != "losses"}))
