"""Train the embedded reference CLIP ("P4Q-Ref-Tiny") from scratch on the reference task's train split.

    python -m p4q_engine.reference.train --out DIR [--seed 0] [--steps 600]

Contrastive CLIP training with a label-aware symmetric InfoNCE: an image/caption pair of the same class elsewhere
in the batch is a positive too (soft targets), so the 80 seen classes' many duplicates are not false negatives.
AdamW, linear warmup + cosine decay, learnable logit scale, fixed data order - fully deterministic given
``seed`` and ``threads``. Writes ``DIR/p4q_ref_tiny.safetensors`` and ``DIR/p4q_ref_tiny.json`` (zero-shot
top-1/top-5 on the held-out ``test`` split and on ``test_seen``, the command, wall time, versions).

Runs in well under 10 minutes on 2 CPU cores (the train images are rendered once and cached under
``$P4Q_CACHE`` / ``~/.cache/p4q_engine``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from p4q_engine.data import reference as ref
from p4q_engine.errors import ConfigError

__all__ = ["train_reference", "zero_shot_eval", "text_classifier", "clip_label_loss", "main"]

CHECKPOINT_NAME = "p4q_ref_tiny.safetensors"
METRICS_NAME = "p4q_ref_tiny.json"
DEFAULTS = dict(steps=600, batch_size=256, lr=1e-3, weight_decay=0.1, warmup=60, train_size=60000, eval_size=2000)


def clip_label_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor):
    """Symmetric InfoNCE with every same-label pair as a positive (targets uniform over the positives)."""
    logits = logit_scale * img @ txt.T
    pos = (labels[:, None] == labels[None, :]).float()
    targets = pos / pos.sum(dim=1, keepdim=True)
    li = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    lt = -(targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return 0.5 * (li + lt)


@torch.no_grad()
def text_classifier(
    model, tokenizer, classnames=ref.REFERENCE_CLASSNAMES, templates=ref.REFERENCE_TEMPLATES
) -> torch.Tensor:
    """``[C, D]``: per class, the mean of the normalised template embeddings, renormalised."""
    texts = [t.format(c) for c in classnames for t in templates]
    device = next(model.parameters()).device
    feats = F.normalize(model.encode_text(tokenizer(texts).to(device)).float(), dim=-1)
    return F.normalize(feats.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)


@torch.no_grad()
def zero_shot_eval(
    model,
    tokenizer,
    split: str = "test",
    size: int = 2000,
    batch_size: int = 500,
    images: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> dict[str, float]:
    """100-way zero-shot top-1 / top-5 (%) of ``model`` on ``split`` with the template ensemble."""
    was_training = model.training
    model.eval()
    cls = text_classifier(model, tokenizer)
    device = cls.device
    if images is None:
        x, y, _ = ref.cached_split(split, size)
    else:
        x, y = images
    top1 = top5 = 0
    for s in range(0, len(y), batch_size):
        f = F.normalize(model.encode_image(ref.normalize_uint8(x[s : s + batch_size]).to(device)).float(), dim=-1)
        top = (f @ cls.T).topk(5, dim=1).indices.cpu()
        hit = top == y[s : s + batch_size, None]
        top1 += int(hit[:, 0].sum())
        top5 += int(hit.any(dim=1).sum())
    model.train(was_training)
    return {"top1": 100.0 * top1 / len(y), "top5": 100.0 * top5 / len(y), "n": int(len(y))}


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embedding" in n or "logit_scale" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_reference(
    out: str,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    warmup: int = DEFAULTS["warmup"],
    train_size: int = DEFAULTS["train_size"],
    eval_size: int = DEFAULTS["eval_size"],
    seed: int = 0,
    threads: int = 2,
    use_cache: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    command: Optional[str] = None,
    device: str = "cpu",
) -> dict:
    """Train P4Q-Ref-Tiny from scratch; write ``out/p4q_ref_tiny.safetensors`` + ``out/p4q_ref_tiny.json``;
    return the metrics dict (also the JSON's content)."""
    from p4q_engine.reference.model import (
        REFERENCE_MODEL_NAME,
        build_reference_model,
        reference_model_config,
        save_reference_checkpoint,
    )
    from p4q_engine.reference.tokenizer import ReferenceTokenizer

    if steps <= 0 or batch_size <= 1 or train_size < batch_size:
        raise ConfigError("need steps > 0, batch_size > 1 and train_size >= batch_size")
    t_start = time.time()
    torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    log(f"rendering/loading {train_size} train images (cache: {ref.cache_dir()})")
    bar = tqdm(total=train_size, desc="render train", disable=not progress, leave=False)
    images, labels, captions = ref.cached_split("train", train_size, use_cache=use_cache, progress=bar.update)
    bar.close()
    tokenizer = ReferenceTokenizer()
    tokens = tokenizer(captions)
    t_data = time.time() - t_start

    model = build_reference_model(device=device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * t))

    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    loss_ema = None
    pbar = tqdm(range(steps), desc="train P4Q-Ref-Tiny", disable=not progress)
    for step in pbar:
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(train_size, generator=gen)])
        idx, order = order[:batch_size], order[batch_size:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        img_f, txt_f, scale = model(ref.normalize_uint8(images[idx]).to(device), tokens[idx].to(device))[:3]
        loss = clip_label_loss(img_f, txt_f, labels[idx].to(device), scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        lv = float(loss.detach())
        loss_ema = lv if loss_ema is None else 0.98 * loss_ema + 0.02 * lv
        if step % 10 == 0 or step == steps - 1:
            pbar.set_postfix(loss=f"{loss_ema:.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
        if not progress and (step % 100 == 0 or step == steps - 1):
            log(f"step {step}/{steps} loss {loss_ema:.4f} ({time.time() - t_start:.0f}s)")
    t_train = time.time() - t_start - t_data

    model.eval()
    held = zero_shot_eval(model, tokenizer, "test", eval_size)
    seen = zero_shot_eval(model, tokenizer, "test_seen", eval_size)
    wall = time.time() - t_start
    log(
        f"zero-shot top-1: held-out test {held['top1']:.2f}%  test_seen {seen['top1']:.2f}%  "
        f"(top-5 {held['top5']:.2f}% / {seen['top5']:.2f}%)  wall {wall:.0f}s"
    )

    model = model.cpu()
    ckpt = save_reference_checkpoint(
        model, out_dir / CHECKPOINT_NAME, metadata={"seed": seed, "steps": steps, "render_version": ref.RENDER_VERSION}
    )
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    metrics = {
        "model": REFERENCE_MODEL_NAME,
        "checkpoint": CHECKPOINT_NAME,
        "checkpoint_sha256": sha,
        "checkpoint_bytes": ckpt.stat().st_size,
        "params": n_params,
        "zero_shot": {"test": held, "test_seen": seen},
        "test_top1": held["top1"],
        "test_top5": held["top5"],
        "test_seen_top1": seen["top1"],
        "test_seen_top5": seen["top5"],
        "final_train_loss_ema": loss_ema,
        "hparams": {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup": warmup,
            "train_size": train_size,
            "eval_size": eval_size,
            "seed": seed,
            "threads": threads,
        },
        "model_config": reference_model_config(),
        "render_version": ref.RENDER_VERSION,
        "held_out_classes": list(ref.HELD_OUT_CLASSES),
        "command": command or f"python -m p4q_engine.reference.train --out {shlex.quote(str(out))} --seed {seed}",
        "wall_time_s": round(wall, 1),
        "data_time_s": round(t_data, 1),
        "train_time_s": round(t_train, 1),
        "device": str(device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        import open_clip

        metrics["open_clip_version"] = open_clip.__version__
    except Exception:  # noqa: BLE001
        pass
    (out_dir / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {ckpt} ({metrics['checkpoint_bytes'] / 2**20:.2f} MiB) and {out_dir / METRICS_NAME}")
    return metrics


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m p4q_engine.reference.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--train-size", type=int, default=DEFAULTS["train_size"])
    p.add_argument("--eval-size", type=int, default=DEFAULTS["eval_size"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-cache", action="store_true", help="render the train split without the disk cache")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu (the committed checkpoint) or e.g. cuda for quick tuning")
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    a = p.parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else argv
    train_reference(
        a.out,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        train_size=a.train_size,
        eval_size=a.eval_size,
        seed=a.seed,
        threads=a.threads,
        use_cache=not a.no_cache,
        progress=not a.no_progress,
        device=a.device,
        warmup=a.warmup,
        weight_decay=a.weight_decay,
        log=lambda m: print(m, flush=True),
        command="python -m p4q_engine.reference.train " + " ".join(shlex.quote(x) for x in argv_used),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
