"""Fused LayerNorm + activation quantization: one read of the fp32 residual row, one write of int8 codes.

Every quantized Linear in a CLIP block is preceded by a LayerNorm (ln_1 -> in_proj, ln_2 -> c_fc), so fusing the
two removes the float LayerNorm output from HBM. Output: shifted int8 codes ``u - 128`` of the next site
(``u = clamp(floor(y / s + 0.5) + zp, 0, 2^b - 1)``). Also :func:`quantize_rows` for a plain quantize (the image
patches feeding the patch-embedding GEMM).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _ln_quant_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    D,
    stride_x,
    stride_o,
    eps,
    scale,
    zp,
    QMAX: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / D
        y = xc * (1.0 / tl.sqrt(var + eps))
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0) + tl.load(b_ptr + cols, mask=mask, other=0.0)
    else:
        y = x
    q = tl.floor(tl.math.div_rn(y, scale) + 0.5) + zp
    q = tl.minimum(tl.maximum(q, 0.0), QMAX)
    tl.store(out_ptr + row * stride_o + cols, (q.to(tl.int32) - 128).to(tl.int8), mask=mask)


def _launch(x: torch.Tensor, w, b, eps: float, scale: float, zp: int, bits: int, norm: bool) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    out = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    d = x2.shape[1]
    block = max(16, 1 << (d - 1).bit_length())
    _ln_quant_kernel[(x2.shape[0],)](
        x2,
        w if w is not None else x2,
        b if b is not None else x2,
        out,
        d,
        x2.stride(0),
        out.stride(0),
        float(eps),
        float(scale),
        float(zp),
        QMAX=float((1 << bits) - 1),
        NORM=norm,
        BLOCK_D=block,
        num_warps=4 if block <= 1024 else 8,
    )
    return out.view(shape)


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
