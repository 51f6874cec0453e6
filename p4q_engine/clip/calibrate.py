"""Post-training calibration: run a few batches through the model and freeze every activation quantizer."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from tqdm.auto import tqdm

from p4q_engine.clip.qmodel import QuantCLIP
from p4q_engine.errors import CalibrationError


def _images(batch: object) -> torch.Tensor:
    """Accept plain image tensors or ``(images, labels)`` batches from a DataLoader."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch  # type: ignore[index]


@torch.no_grad()
def calibrate(
    qmodel: QuantCLIP,
    image_batches: Iterable[object],
    text_tokens: Optional[torch.Tensor] = None,
    device: torch.device | str = "cpu",
    text_batch_size: int = 256,
    num_batches: Optional[int] = None,
    progress: bool = True,
) -> QuantCLIP:
    """Observe activations on calibration images and class prompts, then freeze all quantizers.

    Every layer observes *float* inputs (all quantizers are in calibration mode at once), the usual PTQ protocol
    (FQ-ViT, PTQ4ViT). The text tower is calibrated on ``text_tokens`` - normally every class name under every
    template. A site that calibration never reached raises :class:`CalibrationError` rather than staying float.
    """
    sites = list(qmodel.act_quantizers())
    if not sites:
        return qmodel
    for _, q in sites:
        q.start_calibration()
    qmodel.to(device).eval()
    seen = 0
    for i, batch in enumerate(tqdm(image_batches, total=num_batches, desc="calibrate images", disable=not progress)):
        if num_batches is not None and i >= num_batches:
            break
        qmodel.encode_image(_images(batch).to(device))
        seen += 1
    if seen == 0:
        raise CalibrationError("calibration got no image batches")
    if text_tokens is not None:
        chunks = text_tokens.split(text_batch_size)
        for chunk in tqdm(chunks, desc="calibrate text", disable=not progress):
            qmodel.encode_text(chunk.to(device))
    missing = [name for name, q in sites if q.observer is None or q.observer.batches == 0]
    if missing:
        raise CalibrationError(
            f"{len(missing)} quantization sites were not reached (e.g. {missing[0]}); "
            "pass text_tokens to calibrate the text tower"
        )
    for _, q in sites:
        q.freeze()
    return qmodel
