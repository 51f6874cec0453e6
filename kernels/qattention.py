"""Fused quantized attention: one tile per (image, head) for short sequences (ViT-B/32's 50 tokens, the text tower's
77 with the causal mask), a tiled two-pass kernel for longer ones (ViT-B/16's 197, ViT-L/14's 257, 577 at 336 px).

Short kernel, one program per (image, head): int8 q and k codes -> int8 tensor-core ``q k^T`` with int32 accumulation
and zero-point correction -> scaled logits -> fp32 softmax -> probabilities quantized to the Attention bits -> int8
``p v`` -> output requantized to the out-projection's input site. The attention matrix lives only in registers.

Inputs come from the in_proj GEMM's requantizing epilogue: shifted int8 codes ``[B, L, 3D]`` (q | k | v columns).
For unsigned codes ``u`` with zero point ``z`` stored as ``s = u - 128``:
``sum (u1 - z1)(u2 - z2) = sum s1 s2 + c2 sum s1 + c1 sum s2 + n c1 c2`` with ``c = 128 - z``; padded rows and
columns are loaded as ``s = -c`` so they contribute exactly zero and the sums can run over the padded tile.

Tiled kernel, one program per (image, head, block of query rows): the probabilities are quantized on a fixed grid
*after* normalisation, so the usual online softmax (rescaling a running output) cannot be used - a code needs the
final row max and sum. Pass 1 streams the key blocks for the row max and the sum of ``exp(logit - max)`` (online
rescaling of the sum only); pass 2 streams them again, recomputes each logit, normalises, quantizes the probability
and accumulates the integer ``p v`` (an fp16 tensor-core dot of values in [-255, 255] per key block, exact, summed
in int32). The attention matrix never leaves registers; the cost is one extra ``q k^T``. A tile whose key block
covers the whole sequence (``block_n >= L``) needs neither: one ``q k^T``, one ``exp`` per logit, the exact row max
and sum. The probabilities differ from the reference's only by float rounding of the row sum and of one reciprocal
(ties, ``p4q_engine.quant.ties``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .tuning import TileConfig, pick_config


@dataclass
class AttnSites:
    """Scale and zero point of q, k, v, the probabilities and the output site (the out_proj input)."""

    q: tuple[float, int]
    k: tuple[float, int]
    v: tuple[float, int]
    p: tuple[float, int]
    out: tuple[float, int]
    p_bits: int = 8
    out_bits: int = 8


@triton.jit
def _store_out(optr, acc, pv_scale, so, zo, mask, O_QMAX: tl.constexpr):
    """Integer ``p v`` accumulator -> output codes of the out_proj input site (shifted int8), both kernels."""
    y = acc.to(tl.float32) * pv_scale
    qo = tl.floor(tl.math.div_rn(y, so) + 0.5) + zo
    qo = tl.minimum(tl.maximum(qo, 0.0), O_QMAX)
    tl.store(optr, (qo.to(tl.int32) - 128).to(tl.int8), mask=mask)


@triton.jit
def _qattention_kernel(
    qkv_ptr,
    out_ptr,
    L,
    H,
    D,
    stride_b,
    stride_l,
    out_stride_b,
    out_stride_l,
    qk_scale,
    cq,
    ck,
    cv,
    sp,
    zpp,
    cp,
    pv_scale,
    so,
    zo,
    sm_scale,
    HD: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    P_QMAX: tl.constexpr,
    O_QMAX: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    rows = tl.arange(0, BLOCK_L)
    dims = tl.arange(0, BLOCK_D)
    r_mask = rows < L
    d_mask = dims < HD
    base = qkv_ptr + b * stride_b + rows[:, None] * stride_l + h * HD + dims[None, :]
    m2 = r_mask[:, None] & d_mask[None, :]
    q = tl.load(base, mask=m2, other=-cq).to(tl.int8)
    k = tl.load(base + D, mask=m2, other=-ck).to(tl.int8)
    v = tl.load(base + 2 * D, mask=m2, other=-cv).to(tl.int8)

    s = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
    q_sum = tl.sum(q.to(tl.int32), axis=1)
    k_sum = tl.sum(k.to(tl.int32), axis=1)
    s += ck * q_sum[:, None] + cq * k_sum[None, :] + BLOCK_D * cq * ck
    logits = s.to(tl.float32) * qk_scale * sm_scale
    keep = r_mask[None, :] & (rows[:, None] >= 0)
    if CAUSAL:
        keep = keep & (rows[None, :] <= rows[:, None])
    logits = tl.where(keep, logits, float("-inf"))
    mx = tl.max(logits, axis=1)
    e = tl.exp(logits - mx[:, None])
    # u = floor(p / s_p + 0.5) + z_p with p / s_p = e * (1 / (sum * s_p)): one multiply per probability instead of
    # two IEEE divisions (the tiled kernel's arithmetic, within TIE_EPS of the reference); a masked key has e = 0,
    # hence u = z_p, and adds (u - z_p) * (v - z_v) = 0 to the output
    inv = 1.0 / (tl.sum(e, axis=1) * sp)
    pu = tl.minimum(tl.floor(e * inv[:, None] + (zpp + 0.5)), P_QMAX)
    ps = (pu.to(tl.int32) - 128).to(tl.int8)
    o = tl.dot(ps, v, out_dtype=tl.int32)
    o += cv * tl.sum(ps.to(tl.int32), axis=1)[:, None] + cp * tl.sum(v.to(tl.int32), axis=0)[None, :]
    o += BLOCK_L * cp * cv
    optr = out_ptr + b * out_stride_b + rows[:, None] * out_stride_l + h * HD + dims[None, :]
    _store_out(optr, o, pv_scale, so, zo, m2, O_QMAX)


@triton.jit
def _qk_logits(q, k_ptrs, kmask, cq, ck, qk_scale, sm_scale, q_sum, BLOCK_D: tl.constexpr):
    """Scaled logits of one key block, in the reference's fp32 operation order (see the short kernel)."""
    k = tl.load(k_ptrs, mask=kmask, other=-ck).to(tl.int8)
    s = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
    k_sum = tl.sum(k.to(tl.int32), axis=1)
    s += ck * q_sum[:, None] + cq * k_sum[None, :] + BLOCK_D * cq * ck
    return s.to(tl.float32) * qk_scale * sm_scale


@triton.jit
def _block_logits(
    q,
    k_head,
    rows,
    keys,
    L,
    d_mask,
    stride_l,
    cq,
    ck,
    qk_scale,
    sm_scale,
    q_sum,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """Logits of the key block ``keys`` for the query ``rows``, ``-inf`` at padded (and, causal, later) keys. The
    padding mask is a per-key bias (``x + 0 == x`` exactly): one add per logit instead of a 2-D compare and select."""
    kmask = (keys < L)[:, None] & d_mask[None, :]
    logits = _qk_logits(q, k_head + keys[:, None] * stride_l, kmask, cq, ck, qk_scale, sm_scale, q_sum, BLOCK_D)
    logits += tl.where(keys < L, 0.0, float("-inf"))[None, :]
    if CAUSAL:
        logits = tl.where(keys[None, :] <= rows[:, None], logits, float("-inf"))
    return logits


@triton.jit
def _pv_step(acc, e, inv, bias, v_ptrs, vmask, cv, P_QMAX: tl.constexpr):
    """``acc += (u - z_p) (v - z_v)`` for one key block, ``u = floor(e / (den s_p) + 0.5) + z_p``.

    ``p / s_p = e * (1 / (den s_p))``: one multiply instead of two divisions (a few ulps of ``p / s_p <= 255``,
    within TIE_EPS of the reference's value). A masked key has ``e = 0``, hence ``u = z_p``: it adds nothing with no
    select. ``(u - z_p)`` and ``(v - z_v)`` lie in [-255, 255]: exact in fp16, each product and a tile's sum (< 2^24)
    exact in the fp32 tensor-core accumulator, so the fp16 dot is an exact integer P.V with no zero-point terms;
    ``|acc| <= (255 + L / 2) * 255 < 2^24`` for L <= 4096 (a row's codes sum to ~1 / s_p plus rounding), so the
    accumulation across key blocks is exact in place."""
    pu = tl.minimum(tl.floor(e * inv[:, None] + bias), P_QMAX)  # e >= 0: never below z_p >= 0
    pf = (pu - (bias - 0.5)).to(tl.float16)
    v = tl.load(v_ptrs, mask=vmask, other=-cv).to(tl.int32) + cv
    return tl.dot(pf, v.to(tl.float16), acc, out_dtype=tl.float32)


@triton.jit
def _qattention_tiled_kernel(
    qkv_ptr,
    out_ptr,
    L,
    H,
    D,
    stride_b,
    stride_l,
    out_stride_b,
    out_stride_l,
    qk_scale,
    cq,
    ck,
    cv,
    sp,
    zpp,
    cp,
    pv_scale,
    so,
    zo,
    sm_scale,
    HD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    P_QMAX: tl.constexpr,
    O_QMAX: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    r_mask = rows < L
    d_mask = dims < HD
    head = qkv_ptr + b * stride_b + h * HD + dims[None, :]
    q = tl.load(head + rows[:, None] * stride_l, mask=r_mask[:, None] & d_mask[None, :], other=-cq).to(tl.int8)
    q_sum = tl.sum(q.to(tl.int32), axis=1)
    bias = zpp + 0.5
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    if ONE_PASS:
        # every key in one block (BLOCK_N >= L): one q k^T, one exp per logit - the logits stay in registers
        logits = _block_logits(
            q, head + D, rows, cols, L, d_mask, stride_l, cq, ck, qk_scale, sm_scale, q_sum, BLOCK_D, CAUSAL
        )
        mx = tl.max(logits, axis=1)
        e = tl.exp(logits - mx[:, None])
        inv = 1.0 / (tl.sum(e, axis=1) * sp)
        vmask = (cols < L)[:, None] & d_mask[None, :]
        acc = _pv_step(acc, e, inv, bias, head + 2 * D + cols[:, None] * stride_l, vmask, cv, P_QMAX)
    else:
        n_end = L
        if CAUSAL:
            n_end = tl.minimum(L, (pid_m + 1) * BLOCK_M)
        # pass 1: row max and sum of exp(logit - max) (the sum rescaled when the max grows)
        mx = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        den = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(0, n_end, BLOCK_N):
            logits = _block_logits(
                q, head + D, rows, n0 + cols, L, d_mask, stride_l, cq, ck, qk_scale, sm_scale, q_sum, BLOCK_D, CAUSAL
            )
            new_mx = tl.maximum(mx, tl.max(logits, axis=1))
            den = den * tl.exp(mx - new_mx) + tl.sum(tl.exp(logits - new_mx[:, None]), axis=1)
            mx = new_mx
        # pass 2: the final max and sum give each probability its code (see _pv_step)
        inv = 1.0 / (den * sp)
        for n0 in range(0, n_end, BLOCK_N):
            keys = n0 + cols
            logits = _block_logits(
                q, head + D, rows, keys, L, d_mask, stride_l, cq, ck, qk_scale, sm_scale, q_sum, BLOCK_D, CAUSAL
            )
            e = tl.exp(logits - mx[:, None])
            vmask = (keys < L)[:, None] & d_mask[None, :]
            acc = _pv_step(acc, e, inv, bias, head + 2 * D + keys[:, None] * stride_l, vmask, cv, P_QMAX)
    optr = out_ptr + b * out_stride_b + rows[:, None] * out_stride_l + h * HD + dims[None, :]
    _store_out(optr, acc.to(tl.int32), pv_scale, so, zo, r_mask[:, None] & d_mask[None, :], O_QMAX)


def _f32_product(a: float, b: float) -> float:
    """``a * b`` rounded as fp32 operands and an fp32 product (what the reference computes). Passed to the kernel
    precomputed: the Triton interpreter keeps float scalar arguments as Python floats, so ``a * b`` inside the kernel
    would be a float64 product there (an ulp off fp32, enough to flip a code on a rounding tie)."""
    return float(torch.tensor(a, dtype=torch.float32) * torch.tensor(b, dtype=torch.float32))


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (n - 1).bit_length())


#: Longest sequence the single-tile kernel takes; longer ones use the tiled kernel.
SHORT_MAX_L = 128
#: Longest sequence the tiled kernel's exact fp32 P.V accumulation covers (|acc| < 2^24, see the kernel).
TILED_MAX_L = 4096
#: Tiled kernel without tuning (interpreter, ``P4Q_AUTOTUNE=0``): query rows per program and keys per step.
TILED_BLOCK_M = 64
TILED_BLOCK_N = 64
#: Tiled-kernel candidates (block_m, block_n, -, -, warps, stages): the 2026-12-01 H200 sweep's winners per length
#: (128/64/8 at 577 tokens, 64/32/4 at 197 and 257, 128/32/8 at head dim 80) and their neighbours; tuned per
#: (batch x heads bucket, L, head dim) like the GEMMs, shipped tables first (``kernels/tuning.py``). One-pass tiles
#: (block_n >= L) were candidates on 2026-12-01 (third session) and lost at every shape (64x256 and 32x256 at 197
#: tokens, 32x512 at 257: wide logits tiles cost more than the second q k^T they save), so they are not tuned; the
#: branch still runs wherever a tile covers the sequence (e.g. the default tile on <= 64 tokens).
ATTN_CANDIDATES: tuple[TileConfig, ...] = tuple(
    TileConfig(bm, bn, 64, 1, nw, st, "attn")
    for bm, bn, nw, st in (
        (64, 64, 4, 2),
        (128, 64, 8, 2),
        (128, 64, 8, 3),
        (64, 32, 4, 2),
        (128, 32, 8, 2),
        (64, 64, 4, 3),
        (128, 128, 8, 2),
    )
)
#: The one-pass tiles measured (and lost) on 2026-12-01: kept for the tests of the one-pass branch.
ONE_PASS_TILES: tuple[TileConfig, ...] = (
    TileConfig(64, 256, 64, 1, 8, 2, "attn"),
    TileConfig(32, 256, 64, 1, 4, 2, "attn"),
    TileConfig(32, 512, 64, 1, 8, 2, "attn"),
)
#: Short-kernel candidates: warps per (image, head) program (the tile is the whole padded sequence).
SHORT_CANDIDATES: tuple[TileConfig, ...] = tuple(TileConfig(0, 0, 64, 1, nw, 1, "attn-short") for nw in (4, 2, 8))
#: Tuning-cache names: a changed kernel gets a new name, so tiles tuned (or shipped) for an older one are not reused.
TILED_TUNE_NAME = "qattn-tiled2"
SHORT_TUNE_NAME = "qattn-short"


def _scalar_args(sites: AttnSites, hd: int) -> tuple:
    return (
        _f32_product(sites.q[0], sites.k[0]),
        128 - sites.q[1],
        128 - sites.k[1],
        128 - sites.v[1],
        sites.p[0],
        float(sites.p[1]),
        128 - sites.p[1],
        _f32_product(sites.p[0], sites.v[0]),
        sites.out[0],
        float(sites.out[1]),
        1.0 / math.sqrt(hd),
    )


def qattention(
    qkv: torch.Tensor,
    heads: int,
    sites: AttnSites,
    causal: bool = False,
    num_warps: Optional[int] = None,
    kernel: str = "auto",
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    config: Optional[TileConfig] = None,
) -> torch.Tensor:
    """``qkv``: shifted int8 codes ``[B, L, 3D]``; returns the out_proj input codes ``[B, L, D]`` (shifted int8).

    ``kernel``: ``"short"`` (one tile per (image, head), L <= 128), ``"tiled"`` (L <= 4096), or ``"auto"`` (short
    when it fits). The tiled kernel's tile is tuned per shape unless ``block_m``/``block_n``/``num_warps`` are
    given."""
    if qkv.dtype != torch.int8 or qkv.dim() != 3 or qkv.shape[2] % (3 * heads):
        raise ValueError(f"qattention expects int8 [B, L, 3D] with D divisible by {heads} heads")
    if kernel not in ("auto", "short", "tiled"):
        raise ValueError(f"unknown qattention kernel {kernel!r}")
    qkv = qkv.contiguous()
    bsz, length, d3 = qkv.shape
    d = d3 // 3
    hd = d // heads
    short = length <= SHORT_MAX_L if kernel == "auto" else kernel == "short"
    if short and length > SHORT_MAX_L:
        raise ValueError(f"the short qattention kernel takes L <= {SHORT_MAX_L}, got L={length}")
    if length > TILED_MAX_L:
        raise ValueError(f"qattention takes L <= {TILED_MAX_L} (exact fp32 P.V accumulation), got L={length}")
    out = torch.empty(bsz, length, d, dtype=torch.int8, device=qkv.device)
    if bsz == 0 or length == 0:
        return out
    common = (
        qkv,
        out,
        length,
        heads,
        d,
        qkv.stride(0),
        qkv.stride(1),
        out.stride(0),
        out.stride(1),
        *_scalar_args(sites, hd),
    )
    qmax = dict(P_QMAX=float((1 << sites.p_bits) - 1), O_QMAX=float((1 << sites.out_bits) - 1))
    if short:
        cfg = config or _short_config(qkv, heads, sites, causal, num_warps)
        _qattention_kernel[(bsz * heads,)](
            *common,
            HD=hd,
            BLOCK_L=_pow2(length),
            BLOCK_D=_pow2(hd),
            CAUSAL=causal,
            **qmax,
            num_warps=cfg.num_warps,
            num_stages=1,
        )
        return out
    cfg = config or _tiled_config(qkv, heads, sites, causal, block_m, block_n, num_warps)
    _qattention_tiled_kernel[(bsz * heads, triton.cdiv(length, cfg.block_m))](
        *common,
        HD=hd,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=_pow2(hd),
        CAUSAL=causal,
        **qmax,
        ONE_PASS=cfg.block_n >= length,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def _tune(name: str, qkv: torch.Tensor, heads: int, sites: AttnSites, causal: bool, kernel: str, candidates):
    """The tuned (or shipped) tile of ``kernel`` for this (batch x heads bucket, L, head dim)."""
    bsz, length, d3 = qkv.shape

    def bench(c: TileConfig) -> None:
        qattention(qkv, heads, sites, causal, kernel=kernel, config=c)

    name += "-causal" if causal else ""
    hd = d3 // 3 // heads
    return pick_config(name, bsz * heads, length, hd, sites.p_bits, qkv.device, bench, candidates, fit_m=length)


def _short_config(qkv, heads, sites, causal, num_warps) -> TileConfig:
    if num_warps is not None or qkv.device.type != "cuda":
        return TileConfig(0, 0, 64, 1, num_warps or 4, 1, "attn-short")
    return _tune(SHORT_TUNE_NAME, qkv, heads, sites, causal, "short", SHORT_CANDIDATES)


def _tiled_config(qkv, heads, sites, causal, block_m, block_n, num_warps) -> TileConfig:
    """The tiled kernel's tile: explicit arguments, else the tuned (or shipped) one for this shape."""
    if block_m is not None or block_n is not None or num_warps is not None:
        return TileConfig(block_m or TILED_BLOCK_M, block_n or TILED_BLOCK_N, 64, 1, num_warps or 4, 2, "attn")
    if qkv.device.type != "cuda":
        return TileConfig(TILED_BLOCK_M, TILED_BLOCK_N, 64, 1, 4, 2, "attn")
    return _tune(TILED_TUNE_NAME, qkv, heads, sites, causal, "tiled", ATTN_CANDIDATES)


def qattention_reference(qkv: torch.Tensor, heads: int, sites: AttnSites, causal: bool = False) -> torch.Tensor:
    """The CPU engine's attention on codes (exact integer matmuls in float64, fp32 softmax)."""
    x = qkv.cpu().to(torch.float64) + 128
    bsz, length, d3 = x.shape
    d = d3 // 3
    hd = d // heads

    def heads_of(t: torch.Tensor, zp: int) -> torch.Tensor:
        return (t - zp).view(bsz, length, heads, hd).transpose(1, 2)

    q, k, v = (
        heads_of(x[..., :d], sites.q[1]),
        heads_of(x[..., d : 2 * d], sites.k[1]),
        heads_of(x[..., 2 * d :], sites.v[1]),
    )
    sq, sk, sv, sp, so = (
        torch.tensor(s[0], dtype=torch.float32) for s in (sites.q, sites.k, sites.v, sites.p, sites.out)
    )
    logits = (q @ k.transpose(-2, -1)).float() * (sq * sk) * (1.0 / math.sqrt(hd))
    if causal:
        logits = logits.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(logits, dim=-1)
    pu = torch.clamp(torch.floor(p / sp + 0.5) + sites.p[1], 0, (1 << sites.p_bits) - 1)
    o = ((pu.double() - sites.p[1]) @ v).float() * (sp * sv)
    o = o.transpose(1, 2).reshape(bsz, length, d)
    qo = torch.clamp(torch.floor(o / so + 0.5) + sites.out[1], 0, (1 << sites.out_bits) - 1)
    return (qo.to(torch.int32) - 128).to(torch.int8)
