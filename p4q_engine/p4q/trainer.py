"""P4Q training loop (Sec. 3.3, 4.1): a learnable prompt in the quantized text tower and a QAdapter on the
quantized image features, trained with ``L_c + lambda * L_dist`` against a full-precision teacher.

Both image towers are frozen and there is no augmentation, so the loop runs on cached features
(:mod:`p4q_engine.p4q.features`): a step costs one pass of the C class prompts through the quantized text tower
plus the adapter on a batch of features. Data order is a pure function of ``(seed, epoch)`` and the adapter
initialisation of ``seed``, so a run resumed from its per-epoch checkpoint computes exactly what an uninterrupted
run computes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from p4q_engine.clip.qmodel import QuantCLIP
from p4q_engine.errors import ConfigError
from p4q_engine.eval.zeroshot import topk_correct
from p4q_engine.p4q.adapter import QAdapter
from p4q_engine.p4q.features import AdaptationData, FeatureSet
from p4q_engine.p4q.losses import P4QLoss, similarity_logits
from p4q_engine.p4q.prompt import PromptLearner

STATE_FILE = "train_state.pt"
MODEL_FILE = "p4q.pt"
METRICS_FILE = "metrics.json"
CHECKPOINT_FORMAT = "p4q-train-v1"


@dataclass
class P4QConfig:
    """Hyper-parameters of one run (defaults: the paper's Sec. 4.1, except where noted)."""

    prompt: bool = True
    n_ctx: int = 16
    ctx_init: Optional[str] = None
    class_position: str = "end"
    class_specific: bool = False
    adapter: bool = True
    alpha: float = 0.2
    reduction: int = 4
    adapter_bits: str = "8"  # "8" (the paper) or "model" (the model's W and A bits)
    adapter_qat: bool = True  # False: train the adapter in float, then quantize it (PTQ) - an ablation
    loss: str = "both"
    lam: float = 1.0
    temperature: float = 1.0
    epochs: int = 50
    batch_size: int = 128
    prompt_lr: float = 2e-3
    prompt_momentum: float = 0.9
    adapter_lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        if not (self.prompt or self.adapter):
            raise ConfigError("nothing to train: both the prompt and the adapter are off")
        if self.adapter_bits not in ("8", "model"):
            raise ConfigError(f"--adapter-bits must be 8 or model, got {self.adapter_bits!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("epochs and batch size must be positive")
        if self.prompt_lr <= 0 or self.adapter_lr <= 0:
            raise ConfigError("learning rates must be positive")
        P4QLoss(self.loss, self.lam, self.temperature)  # validates the loss settings


@dataclass
class TrainResult:
    """A trained prompt/adapter pair and what it measured."""

    config: P4QConfig
    prompt: Optional[PromptLearner]
    adapter: Optional[QAdapter]
    text_features: torch.Tensor  # [C, D] unit-norm class features used at test time
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)


# ---------------------------------------------------------------- building blocks
def make_adapter(qmodel: QuantCLIP, data: AdaptationData, cfg: P4QConfig, quantized: bool = True) -> QAdapter:
    """A seeded QAdapter at 8 bits or the model's bits, activation ranges calibrated on the training features."""
    bits = qmodel.recipe.bits
    if bits.is_float or not quantized:
        w, a = None, None
    else:
        w, a = (8, 8) if cfg.adapter_bits == "8" else (bits.w_bits, bits.a_bits)
    adapter = QAdapter(
        data.train.student.shape[1], cfg.reduction, cfg.alpha, w, a, observer="minmax", seed=cfg.seed
    ).to(data.train.student.device)
    calibrate_adapter(adapter, data.train.student)
    return adapter


@torch.no_grad()
def calibrate_adapter(adapter: QAdapter, features: torch.Tensor, chunk: int = 1024) -> None:
    """Set the adapter's activation ranges from its current weights on the (student) training features."""
    sites = [m for m in (adapter.in_quant, adapter.fc2.input_quant) if m.enabled]
    for q in sites:
        q.start_calibration()
    if sites:
        for x in features.split(chunk):
            adapter(x)
        for q in sites:
            q.freeze()


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))  # CPU: portable


def class_features(qmodel: QuantCLIP, prompt: Optional[PromptLearner], data: AdaptationData) -> torch.Tensor:
    """Unit-norm class text features: the learned prompt through the quantized tower, or the fixed templates."""
    return prompt(qmodel) if prompt is not None else data.student_text


def image_features(adapter: Optional[QAdapter], z: torch.Tensor) -> torch.Tensor:
    return adapter(z) if adapter is not None else z


@torch.no_grad()
def evaluate_features(
    qmodel: QuantCLIP, prompt, adapter, feats: FeatureSet, data: AdaptationData, batch_size: int = 1024
) -> dict:
    """Top-1/top-5 of the (adapted) student features against the (prompted) class features."""
    text = class_features(qmodel, prompt, data)
    correct, n = {1: 0, 5: 0}, 0
    for z, y in zip(feats.student.split(batch_size), feats.labels.split(batch_size)):
        logits = similarity_logits(image_features(adapter, z), text, data.logit_scale)
        for k, c in topk_correct(logits, y).items():
            correct[k] += c
        n += y.numel()
    return {"top1": 100.0 * correct[1] / n, "top5": 100.0 * correct[5] / n, "n": n}


# ---------------------------------------------------------------- checkpoints
def _state(epoch, prompt, adapter, optims, history, cfg) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "config": asdict(cfg),
        "history": history,
        "prompt": None if prompt is None else {"ctx": prompt.ctx.detach().clone()},
        "adapter": None if adapter is None else adapter.state_dict(),
        "optimizers": [o.state_dict() for o in optims],
    }


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _try_resume(out_dir: Optional[Path], cfg: P4QConfig, prompt, adapter, optims) -> tuple[int, list]:
    """Restore the last finished epoch from ``out_dir`` if a state with the same config is there."""
    if out_dir is None or not (out_dir / STATE_FILE).is_file():
        return 0, []
    try:
        st = torch.load(out_dir / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"cannot resume from {out_dir / STATE_FILE}: {e}") from None
    if st.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{out_dir / STATE_FILE} is not a {CHECKPOINT_FORMAT} training state")
    saved = {k: v for k, v in st["config"].items() if k != "epochs"}
    if saved != {k: v for k, v in asdict(cfg).items() if k != "epochs"}:
        raise ConfigError(f"{out_dir} holds a run with a different configuration; use a new --out directory")
    with torch.no_grad():
        if prompt is not None:
            prompt.ctx.copy_(st["prompt"]["ctx"])
        if adapter is not None:
            adapter.load_state_dict(st["adapter"])
    for o, s in zip(optims, st["optimizers"]):
        o.load_state_dict(s)
    return int(st["epoch"]), list(st["history"])


# ---------------------------------------------------------------- the loop
def train(
    qmodel: QuantCLIP,
    tokenizer,
    data: AdaptationData,
    cfg: P4QConfig,
    out_dir: Optional[str | Path] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    stop_after_epoch: Optional[int] = None,
    device: str = "cpu",
) -> TrainResult:
    """Train the prompt and/or adapter of ``cfg`` on ``data``; resumes from ``out_dir`` when it holds a state.

    ``stop_after_epoch`` ends the run early after that epoch (its state saved) - it is how tests interrupt a run.
    ``device`` (``cpu`` or ``cuda``) holds the model, the cached features and the trained parameters; results
    come back on the CPU.
    """
    cfg.validate()
    torch.manual_seed(cfg.seed)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    qmodel.cpu().eval()  # build and calibrate on the CPU, then move everything to ``device``
    prompt = (
        PromptLearner(
            qmodel,
            tokenizer,
            data.classnames,
            cfg.n_ctx,
            cfg.ctx_init,
            cfg.class_position,
            cfg.class_specific,
            seed=cfg.seed,
        )
        if cfg.prompt
        else None
    )
    adapter = make_adapter(qmodel, data, cfg, quantized=cfg.adapter_qat) if cfg.adapter else None
    qmodel.to(device)
    data = _data_to(data, device)
    prompt = prompt.to(device) if prompt is not None else None
    adapter = adapter.to(device) if adapter is not None else None
    optims, lrs = [], []
    if prompt is not None:
        optims.append(
            torch.optim.SGD([prompt.ctx], lr=cfg.prompt_lr, momentum=cfg.prompt_momentum, weight_decay=cfg.weight_decay)
        )
        lrs.append(cfg.prompt_lr)
    if adapter is not None:
        optims.append(
            torch.optim.AdamW(
                [p for p in adapter.parameters() if p.requires_grad], lr=cfg.adapter_lr, weight_decay=cfg.weight_decay
            )
        )
        lrs.append(cfg.adapter_lr)
    start, history = _try_resume(out, cfg, prompt, adapter, optims)
    loss_fn = P4QLoss(cfg.loss, cfg.lam, cfg.temperature)
    n = len(data.train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    teacher_logits_all = similarity_logits(data.train.teacher, data.teacher_text, data.logit_scale)
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.epochs), desc="p4q train", disable=not progress, initial=start, total=cfg.epochs)
    for epoch in bar:
        order = _epoch_order(n, cfg.seed, epoch)
        sums: dict[str, float] = {}
        for i, idx in enumerate(order.to(device).split(cfg.batch_size)):
            step = epoch * steps_per_epoch + i
            for o, lr in zip(optims, lrs):
                for g in o.param_groups:
                    g["lr"] = lr * _cosine(step, total)
            text = class_features(qmodel, prompt, data)
            logits = similarity_logits(image_features(adapter, data.train.student[idx]), text, data.logit_scale)
            loss, parts = loss_fn(logits, data.train.labels[idx], teacher_logits_all[idx])
            for o in optims:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in optims:
                o.step()
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v
        record = {"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()}}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if log:
            log(
                f"epoch {epoch + 1}/{cfg.epochs}: "
                + " ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch")
            )
        if out is not None:
            _save_atomic(_state(epoch + 1, prompt, adapter, optims, history, cfg), out / STATE_FILE)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    if adapter is not None and not cfg.adapter_qat and not qmodel.recipe.bits.is_float:
        adapter = _quantize_float_adapter(qmodel, data, cfg, adapter)
    with torch.no_grad():
        text = class_features(qmodel, prompt, data).detach()
    metrics = {
        "test": evaluate_features(qmodel, prompt, adapter, data.test, data),
        "train": evaluate_features(qmodel, prompt, adapter, data.train, data),
        "train_seconds": round(time.perf_counter() - t0, 2),
        "epochs_run": len(history),
        "device": str(device),
    }
    qmodel.cpu()
    return TrainResult(
        cfg,
        None if prompt is None else prompt.cpu(),
        None if adapter is None else adapter.cpu(),
        text.cpu(),
        metrics,
        history,
    )


def _data_to(data: AdaptationData, device: str) -> AdaptationData:
    def fs(f: FeatureSet) -> FeatureSet:
        return FeatureSet(f.student.to(device), f.teacher.to(device), f.labels.to(device))

    return replace(
        data,
        train=fs(data.train),
        test=fs(data.test),
        teacher_text=data.teacher_text.to(device),
        student_text=data.student_text.to(device),
    )


def _quantize_float_adapter(qmodel, data, cfg, float_adapter: QAdapter) -> QAdapter:
    """Post-training-quantize an adapter trained in float (the ``adapter_qat=False`` ablation)."""
    q = make_adapter(qmodel, data, cfg, quantized=True)
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            getattr(q, name).weight.copy_(getattr(float_adapter, name).weight)
            getattr(q, name).bias.copy_(getattr(float_adapter, name).bias)
    calibrate_adapter(q, data.train.student)
    return q


# ---------------------------------------------------------------- the trained model on disk
def act_qparams(qmodel: QuantCLIP) -> dict[str, torch.Tensor]:
    """Every calibrated activation site's scale and zero point (what a checkpoint needs besides the weights)."""
    out = {}
    for name, q in qmodel.act_quantizers():
        if q.calibrated:
            out[f"{name}.scale"], out[f"{name}.zero_point"] = q.scale.clone(), q.zero_point.clone()
    return out


def save_trained(
    result: TrainResult, qmodel: QuantCLIP, data: AdaptationData, out_dir: str | Path, source: dict
) -> Path:
    """Write ``p4q.pt`` (everything :func:`p4q_engine.p4q.pipeline.load_trained` needs to rebuild the model
    from its source weights) and ``metrics.json``. Loads with ``torch.load(weights_only=True)``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = qmodel.recipe
    obj = {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(result.config),
        "recipe": {
            "bits": r.bits.name,
            "scope": r.scope,
            "observer": r.observer,
            "edge_bits": r.edge_bits,
            "observer_kwargs": dict(r.observer_kwargs),
        },
        "source": source,
        "act_qparams": act_qparams(qmodel),
        "prompt": None if result.prompt is None else {"ctx": result.prompt.ctx.detach().cpu().clone()},
        "adapter": None if result.adapter is None else {k: v.cpu() for k, v in result.adapter.state_dict().items()},
        "classnames": list(data.classnames),
        "templates": list(data.templates),
        "metrics": result.metrics,
    }
    _save_atomic(obj, out / MODEL_FILE)
    (out / METRICS_FILE).write_text(
        json.dumps(
            {
                "config": obj["config"],
                "recipe": obj["recipe"],
                "source": source,
                "metrics": result.metrics,
                "history": result.history,
            },
            indent=2,
        )
        + "\n"
    )
    return out / MODEL_FILE
