"""Fold a calibrated fake-quant CLIP (optionally with a trained P4Q prompt and QAdapter) into a ``.p4q`` artifact.

Only what serving needs is kept: the image tower as packed integer weights with per-channel scales plus every
activation site's quantization parameters, the QAdapter, and the class text features computed once through the
quantized text tower and stored at 8 bits per row - the text tower itself is dropped (zero text-encoder cost).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerScale
from torch import nn

from p4q_engine.artifact.bitpack import pack, planes_for, to_unsigned
from p4q_engine.artifact.format import Artifact
from p4q_engine.clip.qmodel import QuantCLIP
from p4q_engine.errors import ConfigError
from p4q_engine.quant.modules import ActQuantizer, QuantConv2d, QuantLinear
from p4q_engine.quant.observers import MinMaxObserver
from p4q_engine.quant.quantizer import QParams, quantize
from p4q_engine.quant.spec import QuantSpec


class _Folder:
    """Accumulates tensors and manifest entries under stable names."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.layouts: dict[str, dict[str, Any]] = {}
        self.linears: dict[str, dict[str, Any]] = {}
        self.sites: dict[str, Optional[dict[str, Any]]] = {}

    def plain(self, name: str, t: torch.Tensor) -> None:
        self.tensors[name] = t.detach().float().contiguous().cpu()
        self.layouts[name] = {"kind": "plain"}

    def packed(self, name: str, codes: torch.Tensor, spec: QuantSpec, scale: torch.Tensor) -> None:
        """Per-row integer codes ``[rows, K]`` -> one packed tensor per bit plane plus a scale vector."""
        rows, k = codes.shape
        widths = planes_for(spec.bits)
        for i, plane in enumerate(pack(to_unsigned(codes, spec), spec.bits)):
            self.tensors[f"{name}.p{i}"] = plane
            self.layouts[f"{name}.p{i}"] = {
                "kind": "packed",
                "bits": spec.bits,
                "signed": spec.signed,
                "grid": spec.grid,
                "offset": spec.storage_offset,
                "planes": list(widths),
                "plane": i,
                "order": "lsb-first-along-k",
                "logical_shape": [rows, k],
            }
        self.plain(f"{name}_scale", scale)

    def site(self, name: str, aq: ActQuantizer) -> Optional[str]:
        if not aq.enabled:
            self.sites[name] = None
            return None
        if aq.spec.per_channel:
            raise ConfigError(f"site {name}: the engine executes per-tensor activation quantization only")
        qp = aq.qparams()
        self.sites[name] = {
            "bits": aq.spec.bits,
            "signed": aq.spec.signed,
            "scale": float(qp.scale),
            "zero_point": int(qp.zero_point),
        }
        return name

    def linear(self, prefix: str, lin: QuantLinear | QuantConv2d, in_site: Optional[str] = None) -> None:
        w = lin.weight.detach().reshape(lin.weight.shape[0], -1)
        if lin.w_spec is None:
            self.plain(f"{prefix}.weight", w)
        else:
            codes, qp = lin.weight_codes()
            self.packed(f"{prefix}.w", codes.reshape(w.shape), lin.w_spec, qp.scale)
        if lin.bias is not None:
            self.plain(f"{prefix}.bias", lin.bias)
        # the layer's own input quantizer, else the site the caller names (the QAdapter's fc1 reads z_hat, which its
        # in_quant produced: fc1's own quantizer is off, but its input is quantized all the same)
        own = self.site(f"{prefix}.in", lin.input_quant) if hasattr(lin, "input_quant") else None
        site = own if own is not None else in_site
        self.linears[prefix] = {
            "out_features": w.shape[0],
            "in_features": w.shape[1],
            "bias": lin.bias is not None,
            "weight_bits": None if lin.w_spec is None else lin.w_spec.bits,
            "in_site": site,
        }

    def layernorm(self, prefix: str, ln: nn.Module) -> None:
        if isinstance(ln, nn.LayerNorm):
            self.plain(f"{prefix}.weight", ln.weight)
            self.plain(f"{prefix}.bias", ln.bias)


def _act_name(blk: nn.Module) -> str:
    act = blk.mlp.gelu
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    raise ConfigError(f"unsupported MLP activation {type(act).__name__}")


def _vision_config(q: QuantCLIP) -> dict[str, Any]:
    v = q.visual
    blocks = v.transformer.resblocks
    ln_eps = [m.eps for m in v.modules() if isinstance(m, nn.LayerNorm)]
    return {
        "image_size": list(v.image_size),
        "patch_size": list(v.patch_size),
        "grid_size": list(v.grid_size),
        "width": v.transformer.width,
        "layers": len(blocks),
        "heads": blocks[0].attn.num_heads,
        "mlp_width": blocks[0].mlp.c_fc.out_features,
        "pool_type": v.pool_type,
        "final_ln_after_pool": bool(v.final_ln_after_pool),
        "ln_pre": isinstance(v.ln_pre, nn.LayerNorm),
        "layer_scale": isinstance(blocks[0].ls_1, LayerScale),
        "act": _act_name(blocks[0]),
        "ln_eps": ln_eps[0] if ln_eps else 1e-5,
        "output_dim": q.image_proj.out_features,
    }


def _fold_vision(f: _Folder, q: QuantCLIP) -> None:
    v = q.visual
    f.linear("visual.conv", v.conv1)
    f.plain("visual.class_embedding", v.class_embedding)
    f.plain("visual.positional_embedding", v.positional_embedding)
    f.layernorm("visual.ln_pre", v.ln_pre)
    for i, blk in enumerate(v.transformer.resblocks):
        p = f"visual.blocks.{i}"
        f.layernorm(f"{p}.ln_1", blk.ln_1)
        f.layernorm(f"{p}.ln_2", blk.ln_2)
        for j, ls in ((1, blk.ls_1), (2, blk.ls_2)):
            if isinstance(ls, LayerScale):
                f.plain(f"{p}.ls_{j}", ls.gamma)
        f.linear(f"{p}.attn.in_proj", blk.attn.in_proj)
        for s in ("q", "k", "v", "p"):
            f.site(f"{p}.attn.{s}", getattr(blk.attn, f"{s}_quant"))
        f.linear(f"{p}.attn.out_proj", blk.attn.out_proj)
        f.linear(f"{p}.mlp.c_fc", blk.mlp.c_fc)
        f.linear(f"{p}.mlp.c_proj", blk.mlp.c_proj)
    f.layernorm("visual.ln_post", v.ln_post)
    f.linear("visual.proj", q.image_proj)


def _fold_adapter(f: _Folder, adapter: nn.Module) -> dict[str, Any]:
    site = f.site("adapter.in", adapter.in_quant)
    f.linear("adapter.fc1", adapter.fc1, in_site=site)
    f.linear("adapter.fc2", adapter.fc2)
    return {"alpha": adapter.alpha, "hidden": adapter.hidden, "dim": adapter.dim}


def quantize_rows(features: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, QParams]:
    """Class text features stored as signed per-row codes (each class embedding keeps its own scale)."""
    spec = QuantSpec(bits, signed=True, per_channel=True, ch_axis=0)
    obs = MinMaxObserver(spec)
    obs.observe(features)
    qp = obs.qparams()
    return quantize(features, qp), qp


def fold(
    qmodel: QuantCLIP,
    class_features: torch.Tensor,
    classnames: Sequence[str],
    preprocess: dict[str, Any],
    adapter: Optional[nn.Module] = None,
    text_bits: int = 8,
    meta: Optional[dict[str, Any]] = None,
) -> Artifact:
    """Build the artifact of a calibrated :class:`QuantCLIP` and its ``[C, D]`` class text features."""
    if class_features.dim() != 2 or class_features.shape[0] != len(classnames):
        raise ConfigError(f"class features {tuple(class_features.shape)} do not match {len(classnames)} class names")
    qmodel = qmodel.cpu().eval()
    from p4q_engine.runtime.engine import _POOL_TYPES  # what the engines execute

    if qmodel.visual.pool_type not in _POOL_TYPES:
        raise ConfigError(
            f"image tower pool_type {qmodel.visual.pool_type!r} cannot be exported: the engines "
            f"execute {', '.join(_POOL_TYPES)}"
        )
    f = _Folder()
    with torch.no_grad():
        _fold_vision(f, qmodel)
        adapter_cfg = _fold_adapter(f, adapter.cpu().eval()) if adapter is not None else None
        codes, qp = quantize_rows(F.normalize(class_features.float().cpu(), dim=-1), text_bits)
        f.packed("text.features", codes, qp.spec, qp.scale)
    recipe = qmodel.recipe
    recipe_cfg = {
        "bits": recipe.bits.name,
        "scope": recipe.scope,
        "observer": recipe.observer,
        "edge_bits": recipe.edge_bits,
    }
    if recipe.observer_kwargs:  # only when set, so artifacts calibrated with the defaults stay byte-identical
        recipe_cfg["observer_kwargs"] = dict(recipe.observer_kwargs)
    manifest = {
        "model": {**(meta or {}), "recipe": recipe_cfg},
        "vision": _vision_config(qmodel),
        "preprocess": preprocess,
        "classes": {
            "names": list(classnames),
            "logit_scale": float(qmodel.logit_scale.exp()),
            "text_bits": text_bits,
            "dim": class_features.shape[1],
        },
        "adapter": adapter_cfg,
        "linears": f.linears,
        "sites": f.sites,
        "tensors": {name: {"layout": layout} for name, layout in f.layouts.items()},
    }
    return Artifact(manifest, f.tensors)
