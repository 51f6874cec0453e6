"""From a model and a dataset to a trained P4Q checkpoint and back: what ``p4q train / eval / export`` run.

:func:`prepare` loads the CLIP, calibrates the quantized student (PTQ, as for Table 1), wraps the same weights as
the full-precision teacher and caches both towers' image features. :func:`load_trained` rebuilds a trained model
from ``p4q.pt`` (which stores only the source of the weights, the recipe, the calibrated activation ranges, the
prompt and the adapter - not a copy of the CLIP), and :func:`export_trained` folds it into a ``.p4q`` artifact with
the learned prompt's class features precomputed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from p4q_engine.clip.qmodel import QuantCLIP, quantize_clip
from p4q_engine.clip.recipe import QuantRecipe
from p4q_engine.errors import ConfigError
from p4q_engine.p4q.adapter import QAdapter
from p4q_engine.p4q.features import AdaptationData, build_adaptation_data
from p4q_engine.p4q.prompt import PromptLearner
from p4q_engine.p4q.trainer import CHECKPOINT_FORMAT, MODEL_FILE, P4QConfig
from p4q_engine.ptq import PTQSettings, build_quantized
from p4q_engine.quant.quantizer import QParams


@dataclass
class Source:
    """Where the weights and the data come from (stored in the checkpoint so it can be rebuilt)."""

    model: str = "P4Q-Ref-Tiny"
    pretrained: Optional[str] = None
    checkpoint: Optional[str] = None
    quick_gelu: Optional[bool] = None
    dataset: str = "reference"
    data_root: Optional[str] = None
    train_size: Optional[int] = None
    eval_size: Optional[int] = None


@dataclass
class Prepared:
    loaded: object  # LoadedModel
    student: QuantCLIP
    teacher: QuantCLIP
    data: AdaptationData


def load_source_model(src: Source, device: str = "cpu"):
    from p4q_engine.clip.loading import load_clip

    return load_clip(
        src.model, pretrained=src.pretrained, checkpoint=src.checkpoint, quick_gelu=src.quick_gelu, device=device
    )


def prepare(src: Source, recipe: QuantRecipe, settings: PTQSettings, use_cache: bool = True, loaded=None) -> Prepared:
    """Load, calibrate (PTQ) and cache features for training on ``src.dataset``."""
    from p4q_engine.data.datasets import adaptation_splits, load_dataset

    loaded = loaded or load_source_model(src, settings.device)
    train_split, eval_split = adaptation_splits(src.dataset)

    def data(split, size=None):
        return load_dataset(src.dataset, split=split, data_root=src.data_root, transform=loaded.preprocess, size=size)

    calib, train, test = data("calib"), data(train_split, src.train_size), data(eval_split, src.eval_size)
    student = build_quantized(loaded.model, loaded.tokenizer, recipe, calib, settings)
    teacher = quantize_clip(loaded.model, QuantRecipe("fp32")).to(settings.device)
    tag = f"{src.model}|{src.pretrained}|{src.checkpoint}|{src.dataset}|{train_split}|{eval_split}|{settings.seed}"
    ad = build_adaptation_data(
        student,
        teacher,
        loaded.tokenizer,
        train,
        test,
        settings.device,
        progress=settings.progress,
        use_cache=use_cache,
        cache_tag=tag,
    )
    return Prepared(loaded, student.cpu(), teacher.cpu(), ad)


def install_act_qparams(qmodel: QuantCLIP, qparams: dict[str, torch.Tensor]) -> None:
    """Put saved activation ranges back into an uncalibrated :class:`QuantCLIP` (every site must be covered)."""
    for name, q in qmodel.act_quantizers():
        if f"{name}.scale" not in qparams:
            raise ConfigError(f"checkpoint has no activation range for site {name}")
        q.set_qparams(QParams(qparams[f"{name}.scale"], qparams[f"{name}.zero_point"], q.spec))


@dataclass
class Trained:
    qmodel: QuantCLIP
    prompt: Optional[PromptLearner]
    adapter: Optional[QAdapter]
    config: P4QConfig
    source: Source
    classnames: list[str]
    templates: list[str]
    loaded: object
    metrics: dict


def read_checkpoint(path: str | Path) -> dict:
    """``p4q.pt`` (or the directory holding it), loaded without unpickling arbitrary objects."""
    p = Path(path)
    p = p / MODEL_FILE if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"no trained P4Q checkpoint at {path} (expected {MODEL_FILE} from `p4q train`)")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"cannot read {p}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{p} is not a {CHECKPOINT_FORMAT} checkpoint")
    return ck


def load_trained(path: str | Path, device: str = "cpu") -> Trained:
    """Rebuild the trained quantized model, prompt and adapter of a ``p4q train`` output."""
    ck = read_checkpoint(path)
    src = Source(**ck["source"])
    cfg = P4QConfig(**ck["config"])
    loaded = load_source_model(src, device)
    qmodel = quantize_clip(loaded.model, QuantRecipe(**ck["recipe"]))
    install_act_qparams(qmodel, ck["act_qparams"])
    prompt = None
    if ck["prompt"] is not None:
        prompt = PromptLearner(
            qmodel,
            loaded.tokenizer,
            ck["classnames"],
            ck["prompt"]["ctx"].shape[-2],
            None,
            cfg.class_position,
            cfg.class_specific,
        )
        with torch.no_grad():
            prompt.ctx.copy_(ck["prompt"]["ctx"])
    adapter = None
    if ck["adapter"] is not None:
        bits = qmodel.recipe.bits
        w, a = (None, None) if bits.is_float else ((8, 8) if cfg.adapter_bits == "8" else (bits.w_bits, bits.a_bits))
        dim = ck["adapter"]["fc1.weight"].shape[1]
        adapter = QAdapter(dim, cfg.reduction, cfg.alpha, w, a, observer="minmax")
        adapter.load_state_dict(ck["adapter"])
        adapter.eval()
    return Trained(
        qmodel.eval(),
        prompt,
        adapter,
        cfg,
        src,
        list(ck["classnames"]),
        list(ck["templates"]),
        loaded,
        ck.get("metrics", {}),
    )


@torch.no_grad()
def trained_class_features(t: Trained, device: str = "cpu") -> torch.Tensor:
    """``[C, D]`` class features of a trained model: its prompt, or the template ensemble if it has none."""
    from p4q_engine.eval.zeroshot import text_classifier

    if t.prompt is not None:
        return t.prompt(t.qmodel)
    return text_classifier(t.qmodel.encode_text, t.loaded.tokenizer, t.classnames, t.templates, device)


def export_trained(path: str | Path, meta: Optional[dict] = None):
    """Fold a trained P4Q model into an :class:`~p4q_engine.artifact.format.Artifact` (text tower dropped)."""
    from p4q_engine.artifact.export import preprocess_config
    from p4q_engine.artifact.fold import fold

    t = load_trained(path)
    if t.qmodel.is_float:
        raise ConfigError("a full-precision run (e.g. CoOp) cannot be exported to the integer format")
    feats = trained_class_features(t)
    return fold(
        t.qmodel,
        feats,
        t.classnames,
        preprocess_config(t.loaded.model),
        adapter=t.adapter,
        meta={
            **(meta or {}),
            "source": "p4q",
            "name": t.source.model,
            "pretrained": t.source.pretrained,
            "checkpoint": t.source.checkpoint,
            "dataset": t.source.dataset,
            "p4q": {
                k: v
                for k, v in asdict(t.config).items()
                if k in ("n_ctx", "alpha", "adapter_bits", "loss", "lam", "epochs")
            },
        },
    )
