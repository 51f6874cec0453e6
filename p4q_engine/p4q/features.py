"""Frozen image features, computed once and cached.

P4Q freezes both image encoders and uses no augmentation by default, so the quantized student's image features
``z`` (before the QAdapter) and the full-precision teacher's image features are the same every epoch. Computing
them once turns an epoch into "text tower + adapter" only. The cache key is a hash of everything the features
depend on - the student's weights and calibrated quantizer parameters, the teacher's weights, the dataset, split,
size and preprocessing - so a stale cache cannot be read by mistake. Files are safetensors (no pickle).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from p4q_engine.clip.qmodel import QuantCLIP
from p4q_engine.eval.zeroshot import text_classifier


@dataclass
class FeatureSet:
    """Image features of one split: the quantized student's, the FP teacher's, and the labels."""

    student: torch.Tensor  # [N, D] float32, unnormalised output of the quantized image tower
    teacher: torch.Tensor  # [N, D] float32, unnormalised output of the FP image tower
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return self.labels.numel()


@dataclass
class AdaptationData:
    """What training on a dataset needs that never changes during training."""

    classnames: list[str]
    templates: tuple[str, ...]
    train: FeatureSet
    test: FeatureSet
    teacher_text: torch.Tensor  # [C, D] unit-norm FP template-ensemble class features
    student_text: torch.Tensor  # [C, D] unit-norm template-ensemble class features through the quantized tower
    logit_scale: float  # CLIP's learned temperature, exp'd (Eq. 12)


def fingerprint(*modules: nn.Module, extra: str = "") -> str:
    """sha256 over every parameter and buffer (names, shapes, bytes) of ``modules`` plus ``extra``."""
    h = hashlib.sha256(extra.encode())
    for m in modules:
        for name, t in sorted({**dict(m.named_parameters()), **dict(m.named_buffers())}.items()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def weight_quant_fingerprint(model: nn.Module) -> str:
    """Every quantized weight's grid and calibrated per-channel scales: weight qparams are computed from the weights
    by the observer (not stored as buffers), so a changed weight calibrator or grid must change the cache key."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        spec = getattr(m, "w_spec", None)
        if spec is not None and hasattr(m, "weight_qparams"):
            h.update(f"{name}:{spec.grid}:{spec.bits}".encode())
            h.update(m.weight_qparams().scale.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def cache_root() -> Path:
    return Path(os.environ.get("P4Q_CACHE") or Path.home() / ".cache" / "p4q_engine") / "features"


@torch.no_grad()
def _encode(encode, dataset, batch_size: int, device: str, desc: str, progress: bool) -> tuple[torch.Tensor, ...]:
    feats, labels = [], []
    dl = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for images, y in tqdm(dl, desc=desc, disable=not progress):
        feats.append(encode(images.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels).long()


def compute_features(
    student: QuantCLIP,
    teacher: QuantCLIP,
    dataset,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "features",
) -> FeatureSet:
    """Encode ``dataset`` with both image towers (no cache)."""
    s, labels = _encode(student.encode_image, dataset, batch_size, device, f"{desc} (student)", progress)
    same = student is teacher
    t = (
        s.clone()
        if same
        else _encode(teacher.encode_image, dataset, batch_size, device, f"{desc} (teacher)", progress)[0]
    )
    return FeatureSet(s, t, labels)


def cached_features(
    student: QuantCLIP,
    teacher: QuantCLIP,
    dataset,
    key: str,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = True,
    use_cache: bool = True,
    desc: str = "features",
) -> FeatureSet:
    """:func:`compute_features`, read from / written to ``cache_root()/<hash>.safetensors``."""
    path = cache_root() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
    if use_cache and path.is_file():
        try:
            z = load_file(str(path))
            if z["labels"].numel() == len(dataset):
                return FeatureSet(z["student"], z["teacher"], z["labels"])
        except Exception:  # noqa: BLE001 - an unreadable cache entry is recomputed
            pass
    fs = compute_features(student, teacher, dataset, batch_size, device, progress, desc)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            save_file(
                {
                    "student": fs.student.contiguous(),
                    "teacher": fs.teacher.contiguous(),
                    "labels": fs.labels.contiguous(),
                },
                str(tmp),
            )
            os.replace(tmp, path)
        except OSError:
            pass
    return fs


def build_adaptation_data(
    student: QuantCLIP,
    teacher: QuantCLIP,
    tokenizer,
    train_data,
    test_data,
    device: str = "cpu",
    batch_size: int = 256,
    progress: bool = True,
    use_cache: bool = True,
    cache_tag: str = "",
) -> AdaptationData:
    """Features of both splits plus the FP and quantized template-ensemble class features.

    ``train_data``/``test_data`` are :class:`~p4q_engine.data.datasets.ZeroShotData`. The cache key includes
    ``cache_tag`` (e.g. dataset name, split and size) and fingerprints of both models."""
    models_fp = (
        (fingerprint(student, extra=student.recipe.name + weight_quant_fingerprint(student)) + fingerprint(teacher))
        if use_cache
        else ""
    )
    feats = {}
    for name, data in (("train", train_data), ("test", test_data)):
        key = f"{cache_tag}|{name}|{len(data.dataset)}|{models_fp}|{getattr(data.dataset, 'transform', None)!r}"
        feats[name] = cached_features(
            student, teacher, data.dataset, key, batch_size, device, progress, use_cache, desc=f"{name} features"
        )
    with torch.no_grad():
        t_text = text_classifier(teacher.encode_text, tokenizer, test_data.classnames, test_data.templates, device)
        s_text = text_classifier(student.encode_text, tokenizer, test_data.classnames, test_data.templates, device)
    return AdaptationData(
        list(test_data.classnames),
        tuple(test_data.templates),
        feats["train"],
        feats["test"],
        F.normalize(t_text.float().cpu(), dim=-1),
        F.normalize(s_text.float().cpu(), dim=-1),
        float(student.logit_scale.exp()),
    )
