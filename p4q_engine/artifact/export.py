"""Export: a PTQ model (or, later, a trained P4Q checkpoint) -> calibrated fake-quant model -> ``.p4q`` artifact."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from p4q_engine.artifact.fold import fold
from p4q_engine.artifact.format import Artifact
from p4q_engine.clip.qmodel import QuantCLIP
from p4q_engine.clip.recipe import QuantRecipe
from p4q_engine.eval.zeroshot import text_classifier
from p4q_engine.ptq import PTQSettings, build_quantized


def preprocess_config(model: nn.Module) -> dict[str, Any]:
    """The eval preprocessing of an open_clip model as JSON-ready values (stored in the artifact)."""
    import open_clip

    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    size = cfg.get("size", model.visual.image_size)
    return {
        "size": list(size) if isinstance(size, (tuple, list)) else [int(size), int(size)],
        "mean": [float(v) for v in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)],
        "std": [float(v) for v in cfg.get("std", open_clip.OPENAI_DATASET_STD)],
        "interpolation": cfg.get("interpolation", "bicubic"),
        "resize_mode": cfg.get("resize_mode", "shortest"),
    }


def class_features(qmodel: QuantCLIP, tokenizer, classnames, templates, device: str = "cpu") -> torch.Tensor:
    """Class embeddings through the *quantized* text tower with template ensembling."""
    return text_classifier(qmodel.encode_text, tokenizer, classnames, templates, device)


def export_ptq(
    model: nn.Module,
    tokenizer,
    recipe: QuantRecipe,
    calib_data,
    class_data,
    settings: PTQSettings,
    meta: Optional[dict[str, Any]] = None,
) -> Artifact:
    """Calibrate ``model`` with ``recipe`` and fold it with the classes of ``class_data``."""
    qmodel = build_quantized(model, tokenizer, recipe, calib_data, settings)
    feats = class_features(qmodel, tokenizer, class_data.classnames, class_data.templates, settings.device)
    return fold(qmodel, feats, class_data.classnames, preprocess_config(model), meta={**(meta or {}), "source": "ptq"})
