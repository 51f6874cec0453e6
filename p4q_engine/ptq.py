"""Post-training quantization of a CLIP model, end to end: quantize, calibrate, evaluate zero-shot."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader

from p4q_engine.clip.calibrate import calibrate
from p4q_engine.clip.qmodel import QuantCLIP, quantize_clip
from p4q_engine.clip.recipe import QuantRecipe
from p4q_engine.eval.zeroshot import evaluate, prompt_texts, text_classifier


@dataclass
class PTQSettings:
    """Calibration and evaluation sizes (the paper: 10 calibration batches of 128 training images)."""

    calib_batches: int = 10
    batch_size: int = 128
    device: str = "cpu"
    workers: int = 0
    progress: bool = True
    seed: int = 0


def resolve_device(device: str) -> str:
    """``auto`` picks CUDA when present."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def loader(dataset, settings: PTQSettings, shuffle: bool = False) -> DataLoader:
    gen = torch.Generator().manual_seed(settings.seed)
    return DataLoader(
        dataset, batch_size=settings.batch_size, shuffle=shuffle, generator=gen, num_workers=settings.workers
    )


def build_quantized(model, tokenizer, recipe: QuantRecipe, calib_data, settings: PTQSettings) -> QuantCLIP:
    """Quantize ``model`` with ``recipe`` and calibrate it on ``calib_data`` images plus its class prompts."""
    qmodel = quantize_clip(model, recipe).to(settings.device)
    if qmodel.is_float:
        return qmodel
    tokens = tokenizer(prompt_texts(calib_data.classnames, calib_data.templates))
    calibrate(
        qmodel,
        loader(calib_data.dataset, settings, shuffle=True),
        tokens,
        settings.device,
        num_batches=settings.calib_batches,
        progress=settings.progress,
    )
    return qmodel


def zero_shot_accuracy(qmodel: QuantCLIP, tokenizer, eval_data, settings: PTQSettings) -> dict[str, float]:
    """Top-1/top-5 of ``qmodel`` (its own quantized text tower builds the classifier)."""
    with torch.no_grad():
        classifier = text_classifier(
            qmodel.encode_text,
            tokenizer,
            eval_data.classnames,
            eval_data.templates,
            settings.device,
            progress=settings.progress,
        )
        dl = loader(eval_data.dataset, settings)
        return evaluate(qmodel.encode_image, classifier, dl, settings.device, progress=settings.progress, total=len(dl))


def run_ptq(
    model,
    tokenizer,
    recipe: QuantRecipe,
    calib_data,
    eval_data,
    settings: PTQSettings,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Quantize, calibrate and evaluate; returns a JSON-ready report row."""
    t0 = time.perf_counter()
    qmodel = build_quantized(model, tokenizer, recipe, calib_data, settings)
    t_cal = time.perf_counter() - t0
    acc = zero_shot_accuracy(qmodel, tokenizer, eval_data, settings)
    row = {
        "bits": recipe.bits.name,
        "scope": recipe.scope,
        "observer": recipe.observer,
        **acc,
        "calib_seconds": round(t_cal, 2),
        "eval_seconds": round(time.perf_counter() - t0 - t_cal, 2),
    }
    if log:
        log(
            f"{recipe.bits.name:>6} {recipe.scope:>7} {recipe.observer:>10}: top1 {acc['top1']:.2f} "
            f"top5 {acc['top5']:.2f}"
        )
    return row


def environment() -> dict[str, str]:
    """Versions recorded next to every result."""
    import open_clip

    return {
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": str(torch.get_num_threads()),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def settings_dict(settings: PTQSettings) -> dict:
    return {k: v for k, v in asdict(settings).items() if k != "progress"}
