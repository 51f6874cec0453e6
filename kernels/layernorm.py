"""Fused LayerNorm + activation quantization: one read of the fp32 residual row, one write of int8 codes.

Every quantized Linear in a CLIP block is preceded by a LayerNorm (ln_1 -> in_proj, ln_2 -> c_fc), so fusing the
two removes the float LayerNorm output from HBM. Output: shifted int8 codes ``u - 128`` of the next site
(``u = clamp(floor(y / s + 0.5) + zp, 0, 2^b - 1)``). Also :func:`quantize_rows` for a plain quantize (the image
patches feeding the patch-embedding GEMM).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import compile_ahead, pdl
from .compile_ahead import launch
from .limits import check_extent
from .pdl import grid_dependency
from .rounding import MAGIC, shifted_codes
from .tuning import INVARIANT_ROWS, TileConfig, _m_bucket, batch_invariant, pick_config


@triton.jit
def ln_codes(x, mask, cols, D, w_ptr, b_ptr, eps, inv_scale, zp, QMAX: tl.constexpr):
    """Shifted int8 codes of ``quantize(layer_norm(x))`` for rows ``x`` [rows, BLOCK_D] (zero where ``mask`` is
    false): the one definition this kernel and the GEMMs' LayerNorm tail (``kernels/epilogue.py``) share, so a
    fused and an unfused block compute the same arithmetic.

    ``y * (1 / s)``, no per-element division: its ulp against ``y / s`` is far inside the tie rule, and the
    LayerNorm's own reduction order already differs from torch's by more; rounding as ``shifted_codes``."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    y = xc * (1.0 / tl.sqrt(var + eps))[:, None]
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0)
    y = y * w[None, :] + tl.load(b_ptr + cols, mask=cols < D, other=0.0)[None, :]
    return shifted_codes(y, inv_scale, zp + MAGIC, QMAX)


@dataclass(frozen=True)
class RowNorm:
    """A LayerNorm followed by the quantizer of the site it feeds: what a GEMM's LayerNorm tail computes on the rows
    it finishes (``qgemm(..., ln=...)``), with the very arithmetic of :func:`layernorm_quant`."""

    weight: torch.Tensor  # fp32 [D], on the GEMM's device
    bias: torch.Tensor  # fp32 [D]
    eps: float
    scale: float
    zero_point: int
    bits: int = 8

    @property
    def inv_scale(self) -> float:
        """fp32 ``1 / s``, as :func:`layernorm_quant` passes it."""
        return float(np.float32(1.0) / np.float32(self.scale))


@triton.jit
def _ln_quant_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    R,
    D,
    stride_x,
    stride_o,
    eps,
    scale,
    inv_scale,
    zp,
    QMAX: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    GDC: tl.constexpr = False,
):
    grid_dependency(GDC)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM:
        codes = ln_codes(x, mask, cols, D, w_ptr, b_ptr, eps, inv_scale, zp, QMAX)
    else:  # a plain quantize stays the exact division and half up (the patches: bit-exact with the reference)
        q = tl.floor(tl.math.div_rn(x, scale) + 0.5) + zp
        codes = (tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.int32) - 128).to(tl.int8)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], codes, mask=mask)


#: Rows per program x warps, tuned per (rows bucket, D) like the GEMMs (one row per program left most of a
#: 768-wide row's lanes waiting on one load); the interpreter runs 2 rows per program (row masking exercised).
LN_CANDIDATES: tuple[TileConfig, ...] = tuple(
    TileConfig(rows, 1, 16, 1, warps, 1, "ln") for rows, warps in ((1, 4), (2, 4), (4, 4), (4, 8), (8, 8), (16, 8))
)
INTERPRET_LN = TileConfig(2, 1, 16, 1, 4, 1, "ln")


def _launch(
    x: torch.Tensor, w, b, eps: float, scale: float, zp: int, bits: int, norm: bool, config=None
) -> torch.Tensor:
    shape = x.shape
    check_extent("layernorm_quant" if norm else "quantize_rows", x=x.numel())
    x2 = x.reshape(-1, shape[-1]).contiguous()
    out = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    r, d = x2.shape
    if r == 0:
        return out.view(shape)
    cfg = config or _config(x2, w, b, eps, scale, zp, bits, norm)
    block = max(16, 1 << (d - 1).bit_length())
    launch(
        _ln_quant_kernel,
        (triton.cdiv(r, cfg.block_m),),
        x2,
        w if w is not None else x2,
        b if b is not None else x2,
        out,
        r,
        d,
        x2.stride(0),
        out.stride(0),
        float(eps),
        float(scale),
        float(np.float32(1.0) / np.float32(scale)),
        float(zp),
        QMAX=float((1 << bits) - 1),
        NORM=norm,
        BLOCK_D=block,
        ROWS=cfg.block_m,
        num_warps=cfg.num_warps if block <= 1024 else max(8, cfg.num_warps),
        **pdl.options(x2.device),
    )
    return out.view(shape)


_RESOLVED: dict[tuple, TileConfig] = {}  # per call signature: the launch path is one lookup once tuned


def _config(x2, w, b, eps, scale, zp, bits, norm) -> TileConfig:
    if x2.device.type != "cuda":
        return INTERPRET_LN
    fixed = norm and batch_invariant()  # the row reduction's order follows the tile: one tile for every batch
    rows = INVARIANT_ROWS if fixed else x2.shape[0]
    sig = (norm, _m_bucket(rows), x2.shape[1], bits, x2.device, os.environ.get("P4Q_AUTOTUNE"), fixed)
    if sig in _RESOLVED:
        return _RESOLVED[sig]

    def bench(c: TileConfig) -> None:
        _launch(x2, w, b, eps, scale, zp, bits, norm, config=c)

    # fit_m = 16: every candidate (<= 16 rows) fits any row count
    name = "ln-quant" if norm else "quant-rows"
    cfg = pick_config(name, rows, x2.shape[1], 0, bits, x2.device, None if fixed else bench, LN_CANDIDATES, fit_m=16)
    if not compile_ahead.active():  # a compile-ahead pass may get an untimed guess
        _RESOLVED[sig] = cfg
    return cfg


def layernorm_quant(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, scale: float, zp: int, bits: int = 8
) -> torch.Tensor:
    """``quantize(layer_norm(x))`` as shifted int8 codes, rows of the last dimension."""
    return _launch(x, weight, bias, eps, scale, zp, bits, True)


def quantize_rows(x: torch.Tensor, scale: float, zp: int, bits: int = 8) -> torch.Tensor:
    """``quantize(x)`` as shifted int8 codes."""
    return _launch(x, None, None, 0.0, scale, zp, bits, False)


def layernorm_quant_reference(x, weight, bias, eps, scale, zp, bits=8, norm=True) -> torch.Tensor:
    y = F.layer_norm(x.float().cpu(), x.shape[-1:], weight.cpu(), bias.cpu(), eps) if norm else x.float().cpu()
    q = torch.clamp(torch.floor(y / torch.tensor(scale, dtype=torch.float32) + 0.5) + zp, 0, (1 << bits) - 1)
    return (q.to(torch.int32) - 128).to(torch.int8)
