"""Zero-shot classification: class-name x template text classifiers and top-k accuracy (Eq. 7)."""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from p4q_engine.errors import ConfigError

Encoder = Callable[[torch.Tensor], torch.Tensor]


def prompt_texts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every class under every template, class-major (``C * T`` strings)."""
    if not classnames or not templates:
        raise ConfigError("zero-shot needs at least one class name and one template")
    return [t.format(c) for c in classnames for t in templates]


@torch.no_grad()
def text_classifier(
    encode_text: Encoder,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """``[C, D]`` unit-norm class embeddings: the mean of each class's normalised template embeddings (CLIP's
    prompt ensembling), normalised again."""
    tokens = tokenizer(prompt_texts(classnames, templates))
    feats = [
        F.normalize(encode_text(chunk.to(device)).float(), dim=-1)
        for chunk in tqdm(tokens.split(batch_size), desc="text classifier", disable=not progress)
    ]
    per_template = torch.cat(feats).view(len(classnames), len(templates), -1)
    return F.normalize(per_template.mean(dim=1), dim=-1)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the ``k`` largest logits, for each ``k`` (capped at #classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels[:, None]
    return {k: int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks}


@torch.no_grad()
def evaluate(
    encode_image: Encoder,
    classifier: torch.Tensor,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str = "cpu",
    ks: Sequence[int] = (1, 5),
    progress: bool = False,
    total: Optional[int] = None,
) -> dict[str, float]:
    """Top-k accuracy (percent) of ``argmax_c <image_c, class_c>`` over ``batches`` of ``(images, labels)``."""
    correct = {k: 0 for k in ks}
    n = 0
    cls = classifier.to(device)
    for images, labels in tqdm(batches, desc="evaluate", total=total, disable=not progress):
        feats = F.normalize(encode_image(images.to(device)).float(), dim=-1)
        for k, c in topk_correct(feats @ cls.T, labels.to(device), ks).items():
            correct[k] += c
        n += labels.numel()
    if n == 0:
        raise ConfigError("evaluation got no images")
    out = {f"top{k}": 100.0 * correct[k] / n for k in ks}
    out["n"] = n
    return out
