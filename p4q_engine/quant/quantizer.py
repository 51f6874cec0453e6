"""The uniform affine quantizer of Eq. 1-3 and its inverse (Eq. 6), with a straight-through gradient.

Everything that turns floats into integer codes goes through :func:`quantize`; the fake-quant model, the packer and
the integer kernels therefore agree bit for bit on the codes. Two conventions are fixed here, once:

* **Rounding is half-up**: ``floor(v + 0.5)``. Unlike ``torch.round`` (half-to-even) it is one instruction in every
  backend we target (Triton, C++, numpy), so integer kernels can reproduce the reference exactly.
* **Division, not multiplication by the reciprocal**: ``x / scale``. The integer engine must do the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from p4q_engine.errors import CalibrationError
from p4q_engine.quant.spec import QuantSpec

#: Smallest scale we allow; a constant channel (e.g. all-zero weights) would otherwise divide by zero.
MIN_SCALE = 1e-8


@dataclass
class QParams:
    """Scale and zero point of one quantized tensor (shape ``[]`` per tensor, ``[C]`` per channel)."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QuantSpec

    def view_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point reshaped to broadcast against ``x`` along ``spec.ch_axis``."""
        if not self.spec.per_channel:
            return self.scale.to(x.device), self.zero_point.to(x.device)
        axis = self.spec.ch_axis % x.dim()
        shape = [1] * x.dim()
        shape[axis] = -1
        if x.shape[axis] != self.scale.numel():
            raise CalibrationError(
                f"per-channel qparams have {self.scale.numel()} channels, tensor has {x.shape[axis]} on axis {axis}"
            )
        return self.scale.to(x.device).view(shape), self.zero_point.to(x.device).view(shape)

    def to(self, device: torch.device | str) -> "QParams":
        return QParams(self.scale.to(device), self.zero_point.to(device), self.spec)


def round_half_up(v: torch.Tensor) -> torch.Tensor:
    """The project's rounding: nearest integer, ties towards +inf (see module docstring)."""
    return torch.floor(v + 0.5)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> QParams:
    """Scale/zero point covering the clipping range ``[lo, hi]`` (per tensor or per channel).

    Signed specs are symmetric: ``scale = max(|lo|, |hi|) / qmax`` and zero point 0, so integer kernels need no
    weight zero-point correction. On the ``full`` grid (:data:`~p4q_engine.quant.spec.WEIGHT_GRID`) the code
    ``qmin = -(qmax + 1)`` is reached only by values below ``-max(|lo|, |hi|)``, i.e. where the calibrated range clips
    (OMSE, percentile); on the ``restricted`` grid they clamp at ``-qmax``. Unsigned specs widen the range to contain
    0 (so 0 is exact, needed for padding and ReLU) and use ``scale = (hi - lo) / (qmax - qmin)``,
    ``zp = clamp(round(qmin - lo / scale), qmin, qmax)``.
    """
    lo = lo.detach().float()
    hi = hi.detach().float()
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise CalibrationError("cannot compute quantization parameters from a non-finite range")
    if spec.signed:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = torch.clamp(amax / spec.qmax, min=MIN_SCALE)
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        scale = torch.clamp((hi - lo) / float(spec.qmax - spec.qmin), min=MIN_SCALE)
        zp = torch.clamp(round_half_up(spec.qmin - lo / scale), spec.qmin, spec.qmax).to(torch.int32)
    return QParams(scale, zp, spec)


def code_dtype(spec: QuantSpec) -> torch.dtype:
    """Storage dtype of unpacked codes: int8 for signed grids, uint8 for unsigned ones (fits every width <= 8)."""
    return torch.int8 if spec.signed else torch.uint8


def _quantize_float(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    scale, zp = qp.view_for(x)
    return torch.clamp(round_half_up(x.float() / scale) + zp, qp.spec.qmin, qp.spec.qmax)


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes of ``x`` (Eq. 3), as int8 (signed) or uint8 (unsigned) - the unpacked storage format."""
    return _quantize_float(x, qp).to(code_dtype(qp.spec))


def dequantize(codes: torch.Tensor, qp: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Real values of integer codes (Eq. 6): ``(q - zp) * scale``."""
    scale, zp = qp.view_for(codes)
    return ((codes.float() - zp) * scale).to(dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Quantize-dequantize whose backward is the clipped straight-through estimator.

    The gradient is passed unchanged where ``x`` lies inside the representable range and is zero where it was
    clipped. Without this, ``floor`` has zero gradient almost everywhere and a prompt behind a quantized text encoder
    never trains (the bug found in the authors' released code).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int):  # type: ignore[override]
        v = round_half_up(x / scale) + zp
        inside = (v >= qmin) & (v <= qmax)
        ctx.save_for_backward(inside)
        return ((torch.clamp(v, qmin, qmax) - zp) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None, None, None


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, differentiable through the STE."""
    scale, zp = qp.view_for(x)
    return _FakeQuantSTE.apply(x, scale, zp.to(scale.dtype), qp.spec.qmin, qp.spec.qmax)
