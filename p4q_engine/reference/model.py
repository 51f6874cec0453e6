"""The embedded reference CLIP, "P4Q-Ref-Tiny": open_clip's standard ``CLIP`` (``VisionTransformer`` +
``TextTransformer``, stock ``ResidualAttentionBlock`` with ``nn.MultiheadAttention``), registered with open_clip
from ``p4q_engine/assets/model_configs/P4Q-Ref-Tiny.json`` and trained by :mod:`p4q_engine.reference.train`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch

from p4q_engine.errors import ModelLoadError
from p4q_engine.reference.tokenizer import ReferenceTokenizer

__all__ = [
    "REFERENCE_MODEL_NAME",
    "ASSETS_DIR",
    "MODEL_CONFIG_DIR",
    "MODEL_CONFIG_PATH",
    "DEFAULT_CHECKPOINT",
    "DEFAULT_METRICS",
    "register_reference_config",
    "reference_model_config",
    "build_reference_model",
    "load_reference_model",
    "save_reference_checkpoint",
]

REFERENCE_MODEL_NAME = "P4Q-Ref-Tiny"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
MODEL_CONFIG_DIR = ASSETS_DIR / "model_configs"
MODEL_CONFIG_PATH = MODEL_CONFIG_DIR / f"{REFERENCE_MODEL_NAME}.json"
DEFAULT_CHECKPOINT = ASSETS_DIR / "p4q_ref_tiny.safetensors"
DEFAULT_METRICS = ASSETS_DIR / "p4q_ref_tiny.json"

_registered = False


def register_reference_config() -> None:
    """Add ``assets/model_configs`` to open_clip's config search path (idempotent)."""
    global _registered
    import open_clip

    if _registered and REFERENCE_MODEL_NAME in open_clip.list_models():
        return
    if not MODEL_CONFIG_PATH.is_file():
        raise ModelLoadError(f"reference model config missing: {MODEL_CONFIG_PATH}")
    from open_clip import factory

    if MODEL_CONFIG_DIR not in [Path(p) for p in factory._MODEL_CONFIG_PATHS]:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    else:
        factory._rescan_model_configs()
    if REFERENCE_MODEL_NAME not in open_clip.list_models():
        raise ModelLoadError(f"open_clip did not register {REFERENCE_MODEL_NAME} from {MODEL_CONFIG_DIR}")
    _registered = True


def reference_model_config() -> dict:
    """The JSON model config (embed_dim, vision_cfg, text_cfg)."""
    try:
        return json.loads(MODEL_CONFIG_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read reference model config {MODEL_CONFIG_PATH}: {e}") from e


def build_reference_model(device: Union[str, torch.device] = "cpu"):
    """A freshly initialised P4Q-Ref-Tiny built through ``open_clip.create_model`` (no weights loaded)."""
    import open_clip

    register_reference_config()
    cfg = reference_model_config()
    tok_vocab = ReferenceTokenizer().vocab_size
    if cfg["text_cfg"]["vocab_size"] != tok_vocab:
        raise ModelLoadError(
            f"{MODEL_CONFIG_PATH.name} has vocab_size {cfg['text_cfg']['vocab_size']} but the "
            f"ReferenceTokenizer has {tok_vocab} tokens"
        )
    import logging

    class _Quiet(logging.Filter):  # the "No pretrained weights loaded" warning is expected here
        def filter(self, record: logging.LogRecord) -> bool:
            return "No pretrained weights loaded" not in record.getMessage()

    quiet, root = _Quiet(), logging.getLogger()
    root.addFilter(quiet)
    try:
        return open_clip.create_model(REFERENCE_MODEL_NAME, pretrained=None, device=device)
    finally:
        root.removeFilter(quiet)


def save_reference_checkpoint(
    model: torch.nn.Module, path: Union[str, Path], metadata: Optional[dict] = None, dtype: torch.dtype = torch.float32
) -> Path:
    """Write the model's state dict as safetensors (``metadata``: str -> str)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    meta = {"model": REFERENCE_MODEL_NAME, **{str(k): str(v) for k, v in (metadata or {}).items()}}
    save_file(sd, str(path), metadata=meta)
    return path


def load_reference_model(checkpoint: Optional[Union[str, Path]] = None, device: Union[str, torch.device] = "cpu"):
    """``(model, preprocess, tokenizer)``: P4Q-Ref-Tiny with the committed (or given) safetensors weights, in
    eval mode, float32. ``preprocess`` is :func:`p4q_engine.data.reference.reference_transform` (identical to
    open_clip's eval transform for this config). Raises :class:`ModelLoadError` on a missing/corrupt file."""
    from p4q_engine.data.reference import reference_transform

    path = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    if not path.is_file():
        raise ModelLoadError(f"reference checkpoint not found: {path}")
    try:
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise ModelLoadError(f"cannot read reference checkpoint {path}: {e}") from e
    model = build_reference_model(device="cpu")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"checkpoint {path} does not match {REFERENCE_MODEL_NAME}: {e}") from e
    model = model.to(device).eval()
    tokenizer = ReferenceTokenizer(context_length=model.context_length)
    return model, reference_transform(), tokenizer
