"""Packed low-bit GEMM: int8 activations x packed 2/3/4/8-bit weights on int8 tensor cores, with a fused epilogue.

``y[m, n] = (sum_k (a_u[m, k] - zp_a) * w[n, k]) * s_a * s_w[n] + bias[n]``, then optionally GELU/QuickGELU, a
residual add, and requantization to the next site (per-column scale/zero point, so one in_proj GEMM can emit q, k
and v codes with their own parameters).

Conventions shared with the rest of the engine:

* **Activations** are unsigned codes ``a_u`` in ``[0, 2^b)`` stored *shifted* as int8 ``a_s = a_u - 128`` so the
  int8 tensor cores take them. ``sum (a_u - zp) w = sum a_s w + (128 - zp) * colsum(w)``: the kernel adds that
  correction to the int32 accumulator, which stays exactly the integer the CPU engine computes.
* **Weights** come straight from the ``.p4q`` packed planes (``docs/format.md``): int32 words ``[N, ceil(K/per)]``,
  LSB-first along K, stored codes offset by ``2^(b-1)``; 3-bit = 2-bit plane + 1-bit plane. The kernel loads a
  ``[BLOCK_K / per, BLOCK_N]`` tile of words per plane and unpacks it in registers with one shift and one mask.
* **Rounding** of the requantization is ``floor(y / s + 0.5)`` (``p4q_engine.quant.quantizer.round_half_up``).

:func:`qgemm` is the launch wrapper, :func:`_qgemm_kernel` the Triton kernel and :func:`qgemm_reference` the torch
definition the tests compare against (integer accumulator bit-exact; float epilogue within 1e-5 relative).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .tuning import TileConfig, pick_config

ACTIVATIONS = {"none": 0, "gelu": 1, "quick_gelu": 2}
_PLANES = {2: (2, 0), 3: (2, 1), 4: (4, 0), 8: (8, 0)}


@dataclass
class PackedWeight:
    """A packed weight on the device: planes, per-channel scales, column sums of the signed codes."""

    planes: list[torch.Tensor]  # int32 [N, ceil(K / (32 / width))] per plane
    scale: torch.Tensor  # float32 [N]
    colsum: torch.Tensor  # int32 [N]: sum_k code[n, k]
    bits: int
    n: int
    k: int
    direct: Optional[torch.Tensor] = None  # int8 codes [N, K] for 8-bit weights: no unpacking in the main loop

    def __post_init__(self) -> None:
        if self.bits == 8 and self.direct is None:
            from p4q_engine.artifact.bitpack import unpack_reference

            stored = unpack_reference([p.cpu() for p in self.planes], 8, self.k)
            self.direct = (stored.to(torch.int16) - 128).to(torch.int8).to(self.planes[0].device).contiguous()

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, bits: int) -> "PackedWeight":
        """Pack signed int8 codes ``[N, K]`` (on any device) with the artifact layout."""
        from p4q_engine.artifact.bitpack import pack_reference

        offset = 1 << (bits - 1)
        stored = (codes.cpu().to(torch.int16) + offset).to(torch.uint8)
        planes = [p.to(codes.device) for p in pack_reference(stored, bits)]
        colsum = codes.to(torch.int32).sum(dim=1).to(torch.int32)
        return cls(planes, scale.float().contiguous(), colsum.contiguous(), bits, codes.shape[0], codes.shape[1])


@triton.jit
def _unpack_tile(wp, offs_n, n_mask, kw0, KW, WIDTH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stored codes of a [BLOCK_K, BLOCK_N] tile from one bit plane (int32 words, LSB-first along K)."""
    PER: tl.constexpr = 32 // WIDTH
    offs_w = kw0 + tl.arange(0, BLOCK_K // PER)
    words = tl.load(wp + offs_n[None, :] * KW + offs_w[:, None], mask=n_mask[None, :] & (offs_w[:, None] < KW),
                    other=0)
    shifts = tl.arange(0, PER) * WIDTH
    vals = (words[:, None, :] >> shifts[None, :, None]) & ((1 << WIDTH) - 1)
    return tl.reshape(vals, (BLOCK_K, BLOCK_N))


@triton.jit
def _qgemm_kernel(
    a_ptr, wp0, wp1, colsum_ptr, wscale_ptr, bias_ptr, res_ptr, oscale_ptr, ozp_ptr, out_ptr,
    M, N, K, KW0, KW1, stride_am, stride_rm, stride_om,
    a_scale, a_corr,
    W0: tl.constexpr, W1: tl.constexpr, OFFSET: tl.constexpr, DIRECT8: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, OUT_MODE: tl.constexpr, OUT_QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    PER0: tl.constexpr = 32 // W0
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0)
        if DIRECT8:  # 8-bit weights as plain int8 [N, K]: a straight tile load the compiler can pipeline
            b = tl.load(wp0 + offs_n[None, :] * K + offs_k[:, None], mask=n_mask[None, :] & k_mask[:, None],
                        other=0)
        else:
            u = _unpack_tile(wp0, offs_n, n_mask, k0 // PER0, KW0, W0, BLOCK_K, BLOCK_N)
            if W1 > 0:
                PER1: tl.constexpr = 32 // W1
                u = u | (_unpack_tile(wp1, offs_n, n_mask, k0 // PER1, KW1, W1, BLOCK_K, BLOCK_N) << W0)
            b = tl.where(k_mask[:, None], u - OFFSET, 0).to(tl.int8)
        acc += tl.dot(a, b, out_dtype=tl.int32)

    colsum = tl.load(colsum_ptr + offs_n, mask=n_mask, other=0)
    acc += a_corr * colsum[None, :]
    out_offs = offs_m[:, None] * stride_om + offs_n[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    if OUT_MODE == 0:  # raw int32 accumulator (tests / debugging)
        tl.store(out_ptr + out_offs, acc, mask=o_mask)
    else:
        wscale = tl.load(wscale_ptr + offs_n, mask=n_mask, other=0.0)
        y = acc.to(tl.float32) * (a_scale * wscale)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
        if ACT == 1:
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        elif ACT == 2:
            y = y * tl.sigmoid(1.702 * y)
        if HAS_RES:
            y += tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=o_mask, other=0.0)
        if OUT_MODE == 1:  # float output
            tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=o_mask)
        else:  # requantize to the next site, shifted int8 codes
            osc = tl.load(oscale_ptr + offs_n, mask=n_mask, other=1.0)
            ozp = tl.load(ozp_ptr + offs_n, mask=n_mask, other=0)
            q = tl.floor(tl.math.div_rn(y, osc[None, :]) + 0.5) + ozp[None, :].to(tl.float32)
            q = tl.minimum(tl.maximum(q, 0.0), OUT_QMAX)
            tl.store(out_ptr + out_offs, (q.to(tl.int32) - 128).to(tl.int8), mask=o_mask)


@dataclass
class Requant:
    """Per-column quantization parameters of the site the GEMM output feeds."""

    scale: torch.Tensor  # float32 [N]
    zero_point: torch.Tensor  # int32 [N]
    bits: int = 8


def qgemm(
    a: torch.Tensor,
    a_scale: float,
    a_zp: int,
    w: PackedWeight,
    bias: Optional[torch.Tensor] = None,
    act: str = "none",
    residual: Optional[torch.Tensor] = None,
    requant: Optional[Requant] = None,
    out_dtype: torch.dtype = torch.float32,
    raw: bool = False,
    config: Optional[TileConfig] = None,
) -> torch.Tensor:
    """``a``: shifted int8 activation codes ``[M, K]``; returns float ``[M, N]``, shifted int8 codes (``requant``)
    or the raw int32 accumulator (``raw``)."""
    if a.dtype != torch.int8 or a.dim() != 2 or a.shape[1] != w.k:
        raise ValueError(f"qgemm expects int8 activations [M, {w.k}], got {a.dtype} {list(a.shape)}")
    a = a.contiguous()
    m, n, k = a.shape[0], w.n, w.k
    mode = 0 if raw else (2 if requant is not None else 1)
    dtype = torch.int32 if raw else (torch.int8 if requant is not None else out_dtype)
    out = torch.empty(m, n, dtype=dtype, device=a.device)
    if residual is not None:
        residual = residual.contiguous()
        if residual.shape != (m, n):
            raise ValueError(f"residual must be [{m}, {n}], got {list(residual.shape)}")
    if config is None:
        def bench(c: TileConfig) -> None:
            qgemm(a, a_scale, a_zp, w, bias, act, residual, requant, out_dtype, raw, config=c)

        config = pick_config("qgemm", m, n, k, w.bits, a.device, bench)
    cfg = config
    w0, w1 = _PLANES[w.bits]
    wp1 = w.planes[1] if w1 else w.planes[0]
    dummy = w.scale
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    direct = w.direct is not None
    _qgemm_kernel[grid](
        a, w.direct if direct else w.planes[0], wp1, w.colsum, w.scale,
        bias if bias is not None else dummy, residual if residual is not None else dummy,
        requant.scale if requant is not None else dummy, requant.zero_point if requant is not None else w.colsum,
        out,
        m, n, k, w.planes[0].shape[1], wp1.shape[1], a.stride(0), residual.stride(0) if residual is not None else 0,
        out.stride(0),
        float(a_scale), int(128 - a_zp),
        W0=w0, W1=w1, OFFSET=1 << (w.bits - 1), DIRECT8=direct,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=ACTIVATIONS[act], OUT_MODE=mode,
        OUT_QMAX=float((1 << requant.bits) - 1) if requant is not None else 255.0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


# ---------------------------------------------------------------------------------------------- torch reference
def unshift(a: torch.Tensor) -> torch.Tensor:
    """Shifted int8 codes -> unsigned codes (int32)."""
    return a.to(torch.int32) + 128


def qgemm_reference(
    a: torch.Tensor, a_scale: float, a_zp: int, codes: torch.Tensor, w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None, act: str = "none", residual: Optional[torch.Tensor] = None,
    requant: Optional[Requant] = None, raw: bool = False,
) -> torch.Tensor:
    """What :func:`qgemm` computes, from unpacked signed weight codes ``[N, K]``, in float64/int64 on the CPU."""
    acc = (unshift(a.cpu()).to(torch.int64) - a_zp) @ codes.cpu().to(torch.int64).t()
    if raw:
        return acc.to(torch.int32)
    y = acc.to(torch.float32) * (torch.tensor(a_scale, dtype=torch.float32) * w_scale.cpu().float())
    if bias is not None:
        y = y + bias.cpu().float()
    if act == "gelu":
        y = torch.nn.functional.gelu(y)
    elif act == "quick_gelu":
        y = y * torch.sigmoid(1.702 * y)
    if residual is not None:
        y = y + residual.cpu().float()
    if requant is None:
        return y
    q = torch.floor(y / requant.scale.cpu() + 0.5) + requant.zero_point.cpu().float()
    q = torch.clamp(q, 0, (1 << requant.bits) - 1)
    return (q.to(torch.int32) - 128).to(torch.int8)


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
