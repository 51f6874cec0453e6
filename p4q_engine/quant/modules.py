"""Fake-quant building blocks: an activation quantizer and quantized Linear / Conv2d / Embedding layers.

Every quantized site owns its :class:`QuantSpec` and, once calibrated, its :class:`QParams`; the packer and the integer
engine read those same objects, so a site's grid is defined exactly once.
"""

from __future__ import annotations

from enum import Enum
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from p4q_engine.errors import CalibrationError
from p4q_engine.quant.observers import Observer, make_observer
from p4q_engine.quant.quantizer import QParams, fake_quantize, quantize
from p4q_engine.quant.spec import QuantSpec


class QuantMode(str, Enum):
    """What an activation quantizer does in ``forward``."""

    OFF = "off"  # pass the float tensor through
    CALIBRATE = "calibrate"  # observe the tensor, pass it through unchanged
    QUANT = "quant"  # fake-quantize with the frozen parameters


class ActQuantizer(nn.Module):
    """One activation quantization site (Eq. 3 + 6); a pass-through when ``spec`` is ``None``."""

    def __init__(self, spec: Optional[QuantSpec], observer: str = "omse", **observer_kwargs) -> None:
        super().__init__()
        self.spec = spec
        self.observer_name = observer
        self.observer_kwargs = dict(observer_kwargs)
        self.observer: Optional[Observer] = make_observer(observer, spec, **observer_kwargs) if spec else None
        self.mode = QuantMode.OFF
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.int32))

    @property
    def enabled(self) -> bool:
        return self.spec is not None

    @property
    def calibrated(self) -> bool:
        return self.scale.numel() > 0

    def qparams(self) -> QParams:
        if self.spec is None:
            raise CalibrationError("this site is not quantized")
        if not self.calibrated:
            raise CalibrationError("activation quantizer used before calibration")
        return QParams(self.scale, self.zero_point, self.spec)

    def start_calibration(self) -> None:
        if self.spec is not None:
            self.observer = make_observer(self.observer_name, self.spec, **self.observer_kwargs)
            self.mode = QuantMode.CALIBRATE

    def freeze(self) -> None:
        """Turn the observer's statistics into frozen qparams and switch to fake-quant."""
        if self.spec is None:
            return
        if self.observer is None or self.observer.batches == 0:
            raise CalibrationError("activation quantizer was never reached during calibration")
        qp = self.observer.qparams()
        self.scale = qp.scale.to(self.scale.device)
        self.zero_point = qp.zero_point.to(self.scale.device)
        self.observer = None
        self.mode = QuantMode.QUANT

    def set_qparams(self, qp: QParams) -> None:
        """Install known parameters (e.g. from a checkpoint) and switch to fake-quant."""
        self.scale, self.zero_point = qp.scale.clone(), qp.zero_point.clone()
        self.observer = None
        self.mode = QuantMode.QUANT

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Buffers are empty before calibration; resize them so a calibrated state dict loads.
        for name in ("scale", "zero_point"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.spec is not None and self.calibrated:
            self.mode = QuantMode.QUANT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec is None or self.mode is QuantMode.OFF:
            return x
        if self.mode is QuantMode.CALIBRATE:
            self.observer.observe(x)
            return x
        return fake_quantize(x, self.qparams())

    def extra_repr(self) -> str:
        return "float" if self.spec is None else f"{self.spec.describe()}, {self.observer_name}, {self.mode.value}"


class _QuantWeightMixin:
    """Weight fake-quant shared by Linear, Conv2d and Embedding.

    Frozen weights are quantized once (with the configured observer) and cached; trainable weights (the QAdapter)
    use min/max ranges, are re-quantized whenever the optimizer changed them, and pass gradients through the STE.
    """

    weight: nn.Parameter
    w_spec: Optional[QuantSpec]

    def _init_weight_quant(self, w_spec: Optional[QuantSpec], observer: str) -> None:
        self.w_spec = w_spec
        self.w_observer = observer
        self._wq_cache: Optional[tuple[tuple, QParams, torch.Tensor]] = None

    def _weight_cache_key(self) -> tuple:
        """Identifies the weight's current contents: its in-place version counter alone is not enough, because
        ``.to(device)``, ``.half()`` or ``load_state_dict`` (on a module whose parameter was replaced) give a
        tensor with new storage whose counter may equal the old one."""
        w = self.weight
        return (w._version, w.data_ptr(), w.device, w.dtype, tuple(w.shape), w.requires_grad)

    def weight_qparams(self) -> QParams:
        """Per-channel qparams of the current weight, recomputed only when the weight changed."""
        if self.w_spec is None:
            raise CalibrationError("this layer's weight is not quantized")
        trainable = self.weight.requires_grad
        key = self._weight_cache_key()
        if self._wq_cache is None or self._wq_cache[0] != key:
            obs = make_observer("minmax" if trainable else self.w_observer, self.w_spec)
            obs.observe(self.weight)
            qp = obs.qparams().to(self.weight.device)
            self._wq_cache = (key, qp, fake_quantize(self.weight.detach(), qp))
        return self._wq_cache[1]

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the integer engine sees it (dequantized codes), differentiable through the STE."""
        if self.w_spec is None:
            return self.weight
        qp = self.weight_qparams()
        return fake_quantize(self.weight, qp) if self.weight.requires_grad else self._wq_cache[2]

    def weight_codes(self) -> tuple[torch.Tensor, QParams]:
        """Integer codes and qparams of the weight: what the packer stores."""
        with torch.no_grad():
            qp = self.weight_qparams()
            return quantize(self.weight, qp), qp


class QuantLinear(nn.Module, _QuantWeightMixin):
    """``nn.Linear`` with W-bit per-output-channel weights and an A-bit input quantizer."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        w_spec: Optional[QuantSpec],
        a_spec: Optional[QuantSpec],
        observer: str = "omse",
        observer_kwargs: Optional[dict] = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self._init_weight_quant(w_spec, observer)
        self.input_quant = ActQuantizer(a_spec, observer, **(observer_kwargs or {}))

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, w_spec, a_spec, observer: str = "omse", observer_kwargs: Optional[dict] = None
    ) -> "QuantLinear":
        return cls(linear.weight, linear.bias, w_spec, a_spec, observer, observer_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        return F.linear(self.input_quant(x), w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        w = "float" if self.w_spec is None else self.w_spec.describe()
        return f"in={self.in_features}, out={self.out_features}, weight={w}"


class QuantConv2d(nn.Module, _QuantWeightMixin):
    """The patch embedding: a strided ``Conv2d`` with per-output-channel weights and a quantized input image."""

    def __init__(
        self, conv: nn.Conv2d, w_spec, a_spec, observer: str = "omse", observer_kwargs: Optional[dict] = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self._init_weight_quant(w_spec, observer)
        self.input_quant = ActQuantizer(a_spec, observer, **(observer_kwargs or {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(self.input_quant(x), w, b, self.stride, self.padding, self.dilation, self.groups)


class QuantEmbedding(nn.Module, _QuantWeightMixin):
    """Token embedding table quantized per row (each token's vector is one channel)."""

    def __init__(self, emb: nn.Embedding, w_spec, observer: str = "omse") -> None:
        super().__init__()
        self.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        self.num_embeddings, self.embedding_dim = emb.weight.shape
        self._init_weight_quant(w_spec, observer)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.quantized_weight())
