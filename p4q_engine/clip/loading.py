"""Load a CLIP for quantization: open_clip models (pretrained tag or local checkpoint) and the embedded reference.

:func:`load_clip` is the single entry point. It validates every option *before* anything is built or downloaded
(unknown model, unknown tag, unsupported tower, missing file are instant :class:`~p4q_engine.errors.ConfigError` /
:class:`~p4q_engine.errors.ModelLoadError`), then lets open_clip build the model so its checkpoint conversions
(``module.`` prefixes, ``{"state_dict": ...}`` wrappers, positional-embedding resizing) apply unchanged.

The QuickGELU trap: OpenAI's CLIP weights (and a few open_clip releases) were trained with QuickGELU
(``x * sigmoid(1.702 x)``), but open_clip's plain configs such as ``ViT-B-32`` use ``nn.GELU``. Loading such weights
into a GELU model costs several points of zero-shot accuracy with no error, and would make every quantization
result look worse than it is, so :func:`needs_quick_gelu` decides when to force it.
"""

from __future__ import annotations

import difflib
import logging
import os
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

from p4q_engine.errors import ConfigError, ModelLoadError

__all__ = [
    "LoadedModel",
    "load_clip",
    "needs_quick_gelu",
    "check_supported_config",
    "check_supported_model",
    "REFERENCE_MODEL_NAME",
    "PRECISIONS",
    "CHECKPOINT_SUFFIXES",
]

log = logging.getLogger(__name__)

# Mirrors p4q_engine.reference.model.REFERENCE_MODEL_NAME; kept literal so this module imports without it.
REFERENCE_MODEL_NAME = "P4Q-Ref-Tiny"
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".safetensors")
_TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI's JIT archives


@dataclass
class LoadedModel:
    """A CLIP ready for evaluation/quantization. ``preprocess`` is the eval transform (PIL -> tensor) and
    ``tokenizer`` maps a list of strings to a ``LongTensor[N, context_length]``."""

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    model_name: str
    pretrained: Optional[str]
    checkpoint: Optional[str] = None
    quick_gelu: bool = False


# ---------------------------------------------------------------- small helpers
def _one_line(e: BaseException, limit: int = 300) -> str:
    """Exception text on one line (state-dict errors span dozens of lines), so the CLI prints one line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Silence open_clip's "No pretrained weights loaded" log record when the weights are loaded by us later."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "No pretrained weights loaded" not in record.getMessage()

    flt, root = _Filter(), logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _model_config(model_name: str) -> dict:
    """open_clip's architecture config; unknown names fail here with suggestions rather than deep in open_clip."""
    import open_clip

    cfg = open_clip.get_model_config(model_name) if model_name in open_clip.list_models() else None
    if cfg is None:
        names = open_clip.list_models()
        close = difflib.get_close_matches(model_name, names, n=5, cutoff=0.5)
        examples = close or [n for n in names if n.startswith("ViT-")][:8]
        raise ConfigError(
            f"unknown model {model_name!r}; e.g. {', '.join(examples)}, or {REFERENCE_MODEL_NAME} "
            f"(open_clip.list_models() lists all {len(names)})"
        )
    return cfg


def check_supported_config(model_name: str, cfg: dict) -> None:
    """Reject, before building or downloading anything, towers the quantizer cannot handle: it rewrites open_clip's
    own ``VisionTransformer`` / text ``Transformer`` blocks, so timm, ResNet, HF-text and CoCa towers are out."""
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    reasons = {
        "timm image tower": bool(vision.get("timm_model_name")),
        "ResNet image tower": isinstance(vision.get("layers"), (list, tuple)),
        "attentional-pooling image tower": bool(vision.get("attentional_pool")),
        "Hugging Face text tower": bool(text.get("hf_model_name")),
        "CoCa multimodal decoder": "multimodal_cfg" in cfg,
    }
    bad = [k for k, v in reasons.items() if v]
    if bad:
        raise ConfigError(
            f"{model_name} has a {bad[0]}; only ViT towers are supported (open_clip VisionTransformer "
            "+ text transformer)"
        )


def check_supported_model(model: nn.Module, model_name: str) -> None:
    """The authoritative post-build check that the towers are the classes the quantizer rewrites."""
    from open_clip.transformer import TextTransformer, VisionTransformer

    if not isinstance(getattr(model, "visual", None), VisionTransformer):
        kind = type(getattr(model, "visual", None)).__name__
        raise ConfigError(f"{model_name} has a {kind} image tower; only ViT towers are supported")
    text = getattr(model, "text", None)
    if text is not None and not isinstance(text, TextTransformer):
        raise ConfigError(
            f"{model_name} has a {type(text).__name__} text tower; only ViT towers with open_clip's "
            "text transformer are supported"
        )


def _check_tag(model_name: str, pretrained: str) -> None:
    """Validate a pretrained tag offline (open_clip would otherwise fail only after trying it as a file path)."""
    import open_clip

    if open_clip.is_pretrained_cfg(model_name, pretrained):
        return
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if not tags:
        raise ConfigError(f"{model_name} has no open_clip pretrained weights; pass --checkpoint FILE instead")
    raise ConfigError(f"unknown pretrained tag {pretrained!r} for {model_name}; valid tags: {', '.join(tags)}")


def needs_quick_gelu(model_name: str, pretrained: Optional[str]) -> bool:
    """True when ``pretrained`` weights were trained with QuickGELU but ``model_name``'s config builds ``nn.GELU``
    (e.g. ``ViT-B-32`` + ``openai``, but also ``ViT-B-32`` + ``laion400m_e31`` or ``metaclip_400m``), i.e. when
    ``force_quick_gelu`` must be set for the weights to compute what they were trained to compute. False for
    ``-quickgelu`` configs (already QuickGELU) and for weights trained with GELU (e.g. ``laion2b_s34b_b79k``)."""
    if not pretrained:
        return False
    import open_clip

    model_cfg = open_clip.get_model_config(model_name) or {}
    if model_cfg.get("quick_gelu", False):
        return False
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    # Older open_clip releases lacked the per-tag flag; every OpenAI release used QuickGELU.
    return bool(tag_cfg.get("quick_gelu", pretrained.lower() == "openai"))


def _quick_gelu_for_tag(model_name: str, pretrained: str, quick_gelu: Optional[bool]) -> bool:
    """Resolve ``quick_gelu`` for a pretrained tag: auto (None) follows :func:`needs_quick_gelu`, with a warning
    so the user knows the architecture differs from the plain config; an explicit False is honoured but warned."""
    needed = needs_quick_gelu(model_name, pretrained)
    if quick_gelu is None:
        if needed:
            msg = (
                f"{model_name} weights '{pretrained}' were trained with QuickGELU; forcing QuickGELU "
                f"(equivalently use {model_name}-quickgelu)"
            )
            log.warning(msg)
            warnings.warn(msg, UserWarning, stacklevel=3)
        return needed
    if needed and not quick_gelu:
        warnings.warn(
            f"{model_name} '{pretrained}' was trained with QuickGELU but quick_gelu=False: accuracy will be degraded",
            UserWarning,
            stacklevel=3,
        )
    return bool(quick_gelu)


def _quick_gelu_for_checkpoint(model_name: str, path: Path, quick_gelu: Optional[bool]) -> bool:
    """A file carries no activation flag, so default to the config's; flag the common "OpenAI weights in a GELU
    config" mistake when the file name gives it away."""
    if quick_gelu is not None:
        return bool(quick_gelu)
    import open_clip

    if "openai" in path.name.lower() and not (open_clip.get_model_config(model_name) or {}).get("quick_gelu"):
        warnings.warn(
            f"checkpoint {path.name} looks like OpenAI weights, which were trained with QuickGELU; pass "
            f"--quick-gelu (quick_gelu=True) or use {model_name}-quickgelu, else accuracy drops",
            UserWarning,
            stacklevel=3,
        )
    return False


def _is_torchscript(path: Path) -> bool:
    """OpenAI's original ``ViT-B-32.pt`` files are TorchScript archives, which ``torch.load(weights_only=True)``
    (what open_clip uses) refuses; they are recognised by their ``code/`` / ``constants.pkl`` entries."""
    if path.suffix == ".safetensors" or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


_MISMATCH_MARKERS = ("state_dict", "size mismatch", "Missing key", "Unexpected key", "pos_embed")


def _mismatch_error(e: BaseException, model_name: str, path: Path) -> ModelLoadError:
    """Name the model and the file. Wrong-architecture files fail either in ``load_state_dict`` or, earlier, in
    open_clip's positional-embedding resizing, which *asserts* (``AssertionError: text pos_embed width changed!``);
    anything else means the file itself is unreadable."""
    if isinstance(e, AssertionError) or any(m in str(e) for m in _MISMATCH_MARKERS):
        return ModelLoadError(f"checkpoint {path} does not match model {model_name} (wrong --model?): {_one_line(e)}")
    return ModelLoadError(f"cannot load checkpoint {path} into {model_name}: {type(e).__name__}: {_one_line(e)}")


# ---------------------------------------------------------------- builders
def _create(model_name: str, source: Optional[str], device: Union[str, torch.device], quick_gelu: bool, precision: str):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=source, force_quick_gelu=quick_gelu, device=device, precision=precision
    )
    return model, preprocess


def _from_tag(model_name: str, tag: str, device, quick_gelu: bool, precision: str):
    """open_clip resolves and downloads the tag (HF hub or URL, cached); any failure there is a ModelLoadError."""
    try:
        return _create(model_name, tag, device, quick_gelu, precision)
    except RuntimeError as e:
        if "state_dict" in str(e):
            raise ModelLoadError(f"open_clip weights {model_name}:{tag} do not match the config: {_one_line(e)}") from e
        raise ModelLoadError(
            f"cannot fetch {model_name}:{tag} weights (offline? set HF_HUB_OFFLINE=1 with a warm "
            f"cache, or pass --checkpoint FILE): {_one_line(e)}"
        ) from e
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot fetch {model_name}:{tag} weights (offline? pass --checkpoint FILE): {_one_line(e)}"
        ) from e


def _from_torchscript(model_name: str, path: Path, device, quick_gelu: bool, precision: str):
    """Build ``model_name`` without weights and copy the archive's tensors in (OpenAI's key names are open_clip's)."""
    try:
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as e:  # noqa: BLE001 - torch.jit raises several error types for a bad archive
        raise ModelLoadError(f"cannot read TorchScript checkpoint {path}: {_one_line(e)}") from e
    for key in _TORCHSCRIPT_EXTRA_KEYS:
        state.pop(key, None)
    with _quiet_random_init():
        model, preprocess = _create(model_name, None, "cpu", quick_gelu, "fp32")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise _mismatch_error(e, model_name, path) from e
    return _cast(model, precision).to(device), preprocess


def _cast(model: nn.Module, precision: str) -> nn.Module:
    """What open_clip's factory does for native (non-timm) towers: ``fp16``/``bf16`` keep LayerNorm in fp32
    (OpenAI's mixed precision), ``pure_*`` cast everything."""
    import open_clip

    dtype = torch.bfloat16 if "bf16" in precision else torch.float16
    if precision in ("fp16", "bf16"):
        open_clip.convert_weights_to_lp(model, dtype=dtype)
    elif precision in ("pure_fp16", "pure_bf16"):
        model.to(dtype=dtype)
    return model


def _from_checkpoint(model_name: str, path: Path, device, quick_gelu: bool, precision: str):
    """Let open_clip load the file (``strict=True``), translating its errors into one-line ModelLoadErrors."""
    if _is_torchscript(path):
        return _from_torchscript(model_name, path, device, quick_gelu, precision)
    try:
        # an absolute path can never be mistaken by open_clip for a pretrained tag of the same name
        return _create(model_name, str(path.resolve()), device, quick_gelu, precision)
    except Exception as e:  # noqa: BLE001 - torch.load / safetensors / load_state_dict raise many types
        raise _mismatch_error(e, model_name, path) from e


def _tokenizer(model_name: str) -> Callable:
    import open_clip

    try:
        return open_clip.get_tokenizer(model_name)
    except Exception as e:  # noqa: BLE001 - HF tokenizers can fail on download
        raise ModelLoadError(f"cannot create the tokenizer of {model_name}: {_one_line(e)}") from e


def _load_reference(checkpoint: Optional[str], pretrained: Optional[str], device, precision: str) -> LoadedModel:
    """The embedded model has its own tokenizer/transform and committed weights; delegate to its module."""
    if pretrained is not None:
        raise ConfigError(f"{REFERENCE_MODEL_NAME} has no pretrained tags; omit --pretrained (or pass --checkpoint)")
    if precision != "fp32":
        raise ConfigError(f"{REFERENCE_MODEL_NAME} is loaded in fp32 only, got precision={precision!r}")
    from p4q_engine.reference.model import load_reference_model  # lazy: written separately

    model, preprocess, tokenizer = load_reference_model(checkpoint=checkpoint, device=device)
    return LoadedModel(
        model.eval(),
        preprocess,
        tokenizer,
        REFERENCE_MODEL_NAME,
        None,
        None if checkpoint is None else os.fspath(checkpoint),
        False,
    )


# ---------------------------------------------------------------- entry point
def load_clip(
    model_name: str = "ViT-B-32",
    pretrained: Optional[str] = None,
    checkpoint: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    quick_gelu: Optional[bool] = None,
    precision: str = "fp32",
) -> LoadedModel:
    """Load ``model_name`` with weights from an open_clip ``pretrained`` tag or a local ``checkpoint`` file
    (.pt/.pth/.bin/.safetensors; raw state dict, ``{"state_dict": ...}`` or an OpenAI TorchScript archive), or
    random weights if neither is given. ``quick_gelu=None`` picks QuickGELU automatically for tags (see
    :func:`needs_quick_gelu`) and leaves the config's activation for files. Returns the model in eval mode.

    Raises ConfigError for bad options (unknown model/tag/precision, non-ViT towers, both sources given) and
    ModelLoadError when weights cannot be fetched or read or do not fit the architecture.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if pretrained is not None and checkpoint is not None:
        raise ConfigError("give a pretrained tag or a checkpoint file, not both")
    if model_name == REFERENCE_MODEL_NAME:
        return _load_reference(checkpoint, pretrained, device, precision)

    check_supported_config(model_name, _model_config(model_name))
    if pretrained is not None:
        _check_tag(model_name, pretrained)
        qg = _quick_gelu_for_tag(model_name, pretrained, quick_gelu)
        model, preprocess = _from_tag(model_name, pretrained, device, qg, precision)
    elif checkpoint is not None:
        path = Path(os.fspath(checkpoint)).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"checkpoint file not found: {path}")
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            log.warning("checkpoint %s has an unusual suffix; trying torch.load", path)
        qg = _quick_gelu_for_checkpoint(model_name, path, quick_gelu)
        model, preprocess = _from_checkpoint(model_name, path, device, qg, precision)
    else:
        qg = bool(quick_gelu)
        log.warning("no --pretrained or --checkpoint: %s has random weights", model_name)
        with _quiet_random_init():
            model, preprocess = _create(model_name, None, device, qg, precision)

    check_supported_model(model, model_name)
    return LoadedModel(
        model.eval(),
        preprocess,
        _tokenizer(model_name),
        model_name,
        pretrained,
        None if checkpoint is None else os.fspath(checkpoint),
        qg,
    )
