"""Packed low-bit GEMM: int8 activations x packed 2/3/4/8-bit weights on int8 tensor cores, with a fused epilogue.

``y[m, n] = (sum_k (a_u[m, k] - zp_a) * w[n, k]) * s_a * s_w[n] + bias[n]``, then optionally GELU/QuickGELU, a
residual add, and requantization to the next site (per-column scale/zero point, so one in_proj GEMM can emit q, k
and v codes with their own parameters).

Conventions shared with the rest of the engine:

* **Activations** are unsigned codes ``a_u`` in ``[0, 2^b)`` stored *shifted* as int8 ``a_s = a_u - 128`` so the
  int8 tensor cores take them. ``sum (a_u - zp) w = sum a_s w + (128 - zp) * colsum(w)``: the kernel adds that
  correction to the int32 accumulator, which stays exactly the integer the CPU engine computes.
* **Weights** are read from the device layout :mod:`weight_layout` builds once at load time: plain int8 for 8 bits,
  interleaved bytes for 2/3/4 bits (one shift or mask per weight yields ``code * 2^(8 - lane)`` as an int8; the
  accumulator is shifted back exactly), or - ``P4Q_WEIGHT_LAYOUT=planes`` - the ``.p4q`` planes themselves
  (``docs/format.md``: int32 words LSB-first along K, codes offset by ``2^(b-1)``, unpacked per tile).
* **Rounding** of the requantization is ``floor(y / s + 0.5)`` (``p4q_engine.quant.quantizer.round_half_up``); the
  kernel multiplies by the precomputed ``1 / s`` (an ulp from ``y / s``: only codes on a float tie can move).

:func:`qgemm` is the launch wrapper, :func:`_qgemm_kernel` the Triton kernel and :func:`qgemm_reference` the torch
definition the tests compare against (integer accumulator bit-exact; float epilogue within 1e-5 relative).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import triton
import triton.language as tl

from . import compile_ahead, pdl
from .arrival import counters
from .compile_ahead import launch
from .epilogue import LN_MAX_D, epilogue, ln_block_d, ln_rows
from .layernorm import RowNorm
from .limits import check_extent
from .pdl import grid_dependency
from .split_k import k_per_split, split_k_range, split_k_reduce, usable_split, workspace
from .tma import descriptors as _descriptors
from .tma import num_programs as _num_programs
from .tma import tma_eligible
from .tuning import (
    GPU_CANDIDATES,
    SPLIT_K_CANDIDATES,
    TileConfig,
    _m_bucket,
    kernel_choice,
    lookup,
    packed_fields,
    pick_config,
    split_k_enabled,
)
from .weight_layout import PLANES as _PLANES
from .weight_layout import SUB_K, PackedWeight, _field, _mma, _unpack_rows, _unpack_tile

__all__ = ["PackedWeight", "Requant", "qgemm", "qgemm_reference", "tma_eligible"]

ACTIVATIONS = {"none": 0, "gelu": 1, "quick_gelu": 2}


@triton.jit
def _qgemm_kernel(
    a_ptr,
    wp0,
    wp1,
    colsum_ptr,
    wscale_ptr,
    bias_ptr,
    res_ptr,
    oinv_ptr,
    ozp_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    ln_w_ptr,
    ln_b_ptr,
    codes_ptr,
    ln_cnt_ptr,
    M,
    N,
    K,
    K_SPLIT,
    KW0,
    KW1,
    stride_am,
    stride_rm,
    stride_om,
    stride_cm,
    a_scale,
    a_corr,
    ln_eps,
    ln_inv_scale,
    ln_zp,
    W0: tl.constexpr,
    W1: tl.constexpr,
    OFFSET: tl.constexpr,
    DIRECT8: tl.constexpr,
    NIB: tl.constexpr,
    PACKED: tl.constexpr,
    SWAP: tl.constexpr,
    SUB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    ACT: tl.constexpr,
    OUT_MODE: tl.constexpr,
    OUT_QMAX: tl.constexpr,
    HAS_LN: tl.constexpr,
    LN_QMAX: tl.constexpr,
    LN_BLOCK_D: tl.constexpr,
    LN_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GDC: tl.constexpr = False,
):
    grid_dependency(GDC)
    pid, k_lo, k_hi = split_k_range(tl.program_id(0), K, K_SPLIT, SPLIT_K)
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
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    PER0: tl.constexpr = 32 // W0
    if NIB > 0:  # interleaved low-bit bytes [N, Kp / FIELDS]: one byte tile per K group, one field per dot
        FIELDS: tl.constexpr = 8 // NIB
        offs_s = tl.arange(0, SUB)
        for g0 in range(k_lo, k_hi, SUB * FIELDS):
            wb = tl.load(wp0 + offs_n[:, None] * KW0 + (g0 // FIELDS + offs_s)[None, :], mask=n_mask[:, None], other=0)
            for i in tl.static_range(FIELDS):
                offs_k = g0 + i * SUB + offs_s
                a = tl.load(
                    a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k < K)[None, :],
                    other=0,
                )
                acc = _mma(acc, a, _field(wb, i, NIB, PACKED), SWAP)
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            a = tl.load(
                a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0
            )
            if DIRECT8:  # 8-bit weights as plain int8 [N, K]: a straight tile load the compiler can pipeline
                if SWAP:
                    w = tl.load(
                        wp0 + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0
                    )
                    acc = _mma(acc, a, w, SWAP)
                else:
                    b = tl.load(
                        wp0 + offs_n[None, :] * K + offs_k[:, None], mask=n_mask[None, :] & k_mask[:, None], other=0
                    )
                    acc += tl.dot(a, b, out_dtype=tl.int32)
            else:  # the artifact's planes, unpacked here (P4Q_WEIGHT_LAYOUT=planes, or K beyond the nib layouts)
                u = _unpack_tile(wp0, offs_n, n_mask, k0 // PER0, KW0, W0, BLOCK_K, BLOCK_N)
                if W1 > 0:
                    PER1: tl.constexpr = 32 // W1
                    u = u | (_unpack_tile(wp1, offs_n, n_mask, k0 // PER1, KW1, W1, BLOCK_K, BLOCK_N) << W0)
                b = tl.where(k_mask[:, None], u - OFFSET, 0).to(tl.int8)
                acc += tl.dot(a, b, out_dtype=tl.int32)
    if SWAP:
        acc = tl.trans(acc)
    if NIB > 0:
        acc = acc >> (8 - NIB)  # exact: every term was a multiple of 2^(8 - NIB)
    last = True
    if SPLIT_K > 1:  # the tile's exact integer sum over the splits; its last program alone runs the epilogue
        acc, last = split_k_reduce(acc, ws_ptr, cnt_ptr, tl.program_id(0), offs_m, offs_n, M, N, SPLIT_K)
    if last:
        epilogue(
            acc, offs_m, offs_n, M, N, colsum_ptr, wscale_ptr, bias_ptr, res_ptr, oinv_ptr, ozp_ptr, out_ptr,
            stride_rm, stride_om, a_scale, a_corr, HAS_BIAS, HAS_RES, ACT, OUT_MODE, OUT_QMAX,
            pid_m, num_n, ln_w_ptr, ln_b_ptr, codes_ptr, stride_cm, ln_cnt_ptr, ln_eps, ln_inv_scale, ln_zp,
            HAS_LN, LN_QMAX, BLOCK_M, LN_BLOCK_D, LN_ROWS,
        )  # fmt: skip


@triton.jit
def _qgemm_tma_kernel(
    a_desc,
    w_desc0,
    w_desc1,
    colsum_ptr,
    wscale_ptr,
    bias_ptr,
    res_ptr,
    oinv_ptr,
    ozp_ptr,
    out_ptr,
    ln_w_ptr,
    ln_b_ptr,
    codes_ptr,
    ln_cnt_ptr,
    M,
    N,
    K,
    stride_rm,
    stride_om,
    stride_cm,
    a_scale,
    a_corr,
    ln_eps,
    ln_inv_scale,
    ln_zp,
    W0: tl.constexpr,
    W1: tl.constexpr,
    OFFSET: tl.constexpr,
    DIRECT8: tl.constexpr,
    NIB: tl.constexpr,
    PACKED: tl.constexpr,
    SWAP: tl.constexpr,
    SUB: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    ACT: tl.constexpr,
    OUT_MODE: tl.constexpr,
    OUT_QMAX: tl.constexpr,
    HAS_LN: tl.constexpr,
    LN_QMAX: tl.constexpr,
    LN_BLOCK_D: tl.constexpr,
    LN_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    num_programs,
    GDC: tl.constexpr = False,
):
    """Persistent variant: ``num_programs`` programs walk the output tiles; A and the weight words arrive by TMA
    (out-of-bounds rows and K columns read as zero, so the main loop has no masks: a zero activation code times any
    weight adds nothing, and the zero-point correction uses the true column sums). The flattened loop lets the
    pipeliner issue the next tile's loads while this tile's epilogue runs."""
    grid_dependency(GDC)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_m * num_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    group = GROUP_M * num_n
    PER0: tl.constexpr = 32 // W0
    PER1: tl.constexpr = 32 // W1 if W1 > 0 else 1
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
        first_m = (tile // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        off_m = (first_m + (tile % group) % size_m) * BLOCK_M
        off_n = ((tile % group) // size_m) * BLOCK_N
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        if NIB > 0:
            FIELDS: tl.constexpr = 8 // NIB
            for g in range(tl.cdiv(K, SUB * FIELDS)):
                wb = w_desc0.load([off_n, g * SUB])
                for i in tl.static_range(FIELDS):
                    a = a_desc.load([off_m, g * SUB * FIELDS + i * SUB])
                    acc = _mma(acc, a, _field(wb, i, NIB, PACKED), SWAP)
        else:
            for kt in range(k_tiles):
                a = a_desc.load([off_m, kt * BLOCK_K])
                if DIRECT8:
                    w = w_desc0.load([off_n, kt * BLOCK_K])
                else:
                    u = _unpack_rows(w_desc0.load([off_n, kt * (BLOCK_K // PER0)]), W0, BLOCK_N, BLOCK_K)
                    if W1 > 0:
                        u = u | (
                            _unpack_rows(w_desc1.load([off_n, kt * (BLOCK_K // PER1)]), W1, BLOCK_N, BLOCK_K) << W0
                        )
                    w = (u - OFFSET).to(tl.int8)
                acc = _mma(acc, a, w, SWAP)
        if SWAP:
            acc = tl.trans(acc)
        if NIB > 0:
            acc = acc >> (8 - NIB)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        epilogue(
            acc, offs_m, offs_n, M, N, colsum_ptr, wscale_ptr, bias_ptr, res_ptr, oinv_ptr, ozp_ptr, out_ptr,
            stride_rm, stride_om, a_scale, a_corr, HAS_BIAS, HAS_RES, ACT, OUT_MODE, OUT_QMAX,
            off_m // BLOCK_M, num_n, ln_w_ptr, ln_b_ptr, codes_ptr, stride_cm, ln_cnt_ptr, ln_eps, ln_inv_scale,
            ln_zp, HAS_LN, LN_QMAX, BLOCK_M, LN_BLOCK_D, LN_ROWS,
        )  # fmt: skip


@dataclass
class Requant:
    """Per-column quantization parameters of the site the GEMM output feeds."""

    scale: torch.Tensor  # float32 [N]
    zero_point: torch.Tensor  # int32 [N]
    bits: int = 8
    #: float32 ``1 / scale``, what the epilogue multiplies by (computed once here, never inside a CUDA graph)
    inv_scale: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.inv_scale = (1.0 / self.scale.float()).contiguous()


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
    ln: Optional[RowNorm] = None,
):
    """``a``: shifted int8 activation codes ``[M, K]``; returns float ``[M, N]``, shifted int8 codes (``requant``)
    or the raw int32 accumulator (``raw``). ``ln``: also the codes of ``ln`` applied to the fp32 output rows (the
    LayerNorm tail, ``kernels/epilogue.py``), returned as ``(out, codes)``."""
    if a.dtype != torch.int8 or a.dim() != 2 or a.shape[1] != w.k:
        raise ValueError(f"qgemm expects int8 activations [M, {w.k}], got {a.dtype} {list(a.shape)}")
    m, n, k = a.shape[0], w.n, w.k
    check_extent("qgemm", activations=m * k, output=m * n)
    if ln is not None:
        _check_ln(ln, n, raw, requant, out_dtype, a.device)
    a = a.contiguous()
    mode = 0 if raw else (2 if requant is not None else 1)
    dtype = torch.int32 if raw else (torch.int8 if requant is not None else out_dtype)
    out = torch.empty(m, n, dtype=dtype, device=a.device)
    if residual is not None:
        residual = residual.contiguous()
        if residual.shape != (m, n):
            raise ValueError(f"residual must be [{m}, {n}], got {list(residual.shape)}")
    if config is None:
        config = _tuned_config(a, a_scale, a_zp, w, bias, act, residual, requant, out_dtype, raw)
    if config.wide:  # the same integers through the 8-bit loop (a weight without the copy runs its own loop)
        w = w.wide_view() if w.wide is not None else w
        config = _narrow(config)
    cfg = effective_config(config, w)
    w0, w1 = _PLANES[w.bits]
    epi = dict(
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        ACT=ACTIVATIONS[act],
        OUT_MODE=mode,
        OUT_QMAX=float((1 << requant.bits) - 1) if requant is not None else 255.0,
    )
    dummy = w.scale
    ptrs = (
        w.colsum,
        w.scale,
        bias if bias is not None else dummy,
        residual if residual is not None else dummy,
        requant.inv_scale if requant is not None else dummy,
        requant.zero_point if requant is not None else w.colsum,
        out,
    )
    res_stride = residual.stride(0) if residual is not None else 0
    codes = torch.empty(m, n, dtype=torch.int8, device=a.device) if ln is not None else None
    ln_ptrs = (
        (ln.weight, ln.bias, codes, counters(a.device, triton.cdiv(m, cfg.block_m), "ln-tail"))
        if ln is not None
        else (dummy, dummy, out, w.colsum)
    )
    ln_scalars = (float(ln.eps), ln.inv_scale, float(ln.zero_point)) if ln is not None else (0.0, 1.0, 0.0)
    codes_stride = codes.stride(0) if codes is not None else 0
    epi.update(
        HAS_LN=ln is not None,
        LN_QMAX=float((1 << ln.bits) - 1) if ln is not None else 255.0,
        LN_BLOCK_D=ln_block_d(n) if ln is not None else 16,
        LN_ROWS=ln_rows(cfg.block_m, n) if ln is not None else 1,
    )
    direct = w.direct is not None
    nib = w.interleaved is not None
    planes = not (direct or nib)
    consts = dict(  # plane widths and offset only where the plane path reads them: 3- and 4-bit share kernels
        W0=w0 if planes else 8,
        W1=w1 if planes else 0,
        OFFSET=1 << (w.bits - 1) if planes else 0,
        DIRECT8=direct,
        NIB=w.layout.lane if nib else 0,
        PACKED=nib and packed_fields(a.device),
        SWAP=cfg.swap and (direct or nib),  # the plane path keeps its one orientation
        SUB=SUB_K,
        **epi,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl.options(a.device),
    )
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    # the LayerNorm tail runs on the pointer kernel only: inside the TMA kernel's flattened persistent loop, Triton
    # 3.6's TritonGPUFuseNestedLoops pass fails to compile it (H200, benchmarks/results/gpu_2026-12-02f)
    if cfg.kernel == "tma" and ln is None and tma_eligible(a, w, cfg):
        a_desc, w_desc0, w_desc1 = _descriptors(a, w, cfg)
        programs = min(tiles, _num_programs(a.device) * cfg.occupancy)
        launch(
            _qgemm_tma_kernel, (programs,), a_desc, w_desc0, w_desc1, *ptrs, *ln_ptrs, m, n, k, res_stride,
            out.stride(0), codes_stride, float(a_scale), int(128 - a_zp), *ln_scalars, **consts, num_programs=programs,
        )  # fmt: skip
        return out if ln is None else (out, codes)
    wp0 = w.direct if direct else (w.interleaved if nib else w.planes[0])
    wp1 = w.planes[1] if w1 and not nib else wp0
    if cfg.split_k > 1 and cfg.split_k * m * n >= 2**31:  # the slots' int32 offsets (a large M never splits)
        cfg = replace(cfg, split_k=1)
    ws, cnt = workspace(a.device, cfg.split_k * m * n, tiles) if cfg.split_k > 1 else (out, out)
    launch(
        _qgemm_kernel, (tiles * cfg.split_k,), a, wp0, wp1, *ptrs, ws, cnt, *ln_ptrs, m, n, k,
        k_per_split(k, cfg.block_k, cfg.split_k), wp0.shape[1], wp1.shape[1], a.stride(0), res_stride, out.stride(0),
        codes_stride, float(a_scale), int(128 - a_zp), *ln_scalars, **consts, SPLIT_K=cfg.split_k,
    )  # fmt: skip
    return out if ln is None else (out, codes)


def _check_ln(ln: RowNorm, n: int, raw: bool, requant, out_dtype, device) -> None:
    """The LayerNorm tail reads back the fp32 output rows: float32 output only, rows no wider than LN_MAX_D."""
    if raw or requant is not None or out_dtype != torch.float32:
        raise ValueError("qgemm's LayerNorm tail needs the float32 output (not raw, not requant)")
    if n > LN_MAX_D:
        raise ValueError(f"qgemm's LayerNorm tail takes rows up to {LN_MAX_D} wide, got {n}")
    for name in ("weight", "bias"):
        t = getattr(ln, name)
        if t.shape != (n,) or t.dtype != torch.float32 or t.device != device:
            raise ValueError(f"LayerNorm {name} must be float32 [{n}] on {device}, got {t.dtype} {list(t.shape)}")


#: Resolved configurations per call signature: the launch path of a tuned shape is one dict lookup (the tuner's
#: key building and candidate filtering cost tens of microseconds of CPU, more than a batch-1 GEMM takes).
_RESOLVED: dict[tuple, TileConfig] = {}


def _tuned_config(a, a_scale, a_zp, w, bias, act, residual, requant, out_dtype, raw) -> TileConfig:
    """The tuned (or shipped) configuration for this GEMM, tuning it with real launches on first use."""
    m, n, k = a.shape[0], w.n, w.k
    kind = kernel_choice()
    layout = w.layout.name if w.interleaved is not None or w.direct is not None else "planes"
    if w.interleaved is not None and packed_fields(a.device):
        layout += "-packed"  # another main loop: its own tiles (and a before/after in one process)
    # the epilogue is part of the key: an int32 or fp32 output moves 4x the bytes of int8 codes and favours other
    # tiles
    out_tag = "raw" if raw else ("requant" if requant is not None else str(out_dtype).replace("torch.", ""))
    sig = (
        kind,
        layout,
        out_tag,
        residual is not None,
        _m_bucket(m),
        n,
        k,
        w.bits,
        w.wide is not None,
        a.device,
        os.environ.get("P4Q_AUTOTUNE"),
        os.environ.get("P4Q_SPLIT_K"),
    )
    cfg = _RESOLVED.get(sig)
    if cfg is not None:
        return cfg

    def bench(c: TileConfig) -> None:
        qgemm(a, a_scale, a_zp, w, bias, act, residual, requant, out_dtype, raw, config=c)

    pool = GPU_CANDIDATES + (SPLIT_K_CANDIDATES if split_k_enabled() else ())
    cands = pool if kind == "auto" else tuple(c for c in pool if c.kernel == kind)
    cands = tuple(dict.fromkeys(effective_config(c, w) for c in cands))
    name = (
        ("qgemm" if kind == "auto" else f"qgemm-{kind}")
        + f"-{layout}-{out_tag}"
        + ("-res" if residual is not None else "")
    )
    # a low-bit weight with an int8 copy: the shipped / cached choice between the two loops, else the packed loop's
    # best tile timed against the 8-bit loop's best (tuned under its own key)
    cfg = lookup(name + "-wide", m, n, k, w.bits, a.device) if w.wide is not None else None
    if cfg is None:
        cfg = pick_config(name, m, n, k, w.bits, a.device, bench, cands)
        if w.wide is not None:
            w8 = _tuned_config(a, a_scale, a_zp, w.wide_view(), bias, act, residual, requant, out_dtype, raw)
            cfg = pick_config(name + "-wide", m, n, k, w.bits, a.device, bench, (replace(w8, wide=True), cfg))
    if a.device.type == "cuda" and not compile_ahead.active():  # a compile-ahead pass may get an untimed guess
        _RESOLVED[sig] = cfg
    return cfg


@functools.lru_cache(maxsize=None)
def _narrow(cfg: TileConfig) -> TileConfig:
    """``cfg`` without ``wide`` (memoized: an eager launch pays one dict lookup, not a dataclass copy)."""
    return replace(cfg, wide=False)


def effective_config(cfg: TileConfig, w: PackedWeight) -> TileConfig:
    """What a candidate means for this weight: the interleaved layouts fix the K step (one group of
    ``SUB_K * fields``), so candidates that differ only in ``block_k`` are the same kernel there (tuned once);
    ``swap`` has no effect on the artifact-plane path; ``split_k`` shrinks to what K allows (none on TMA)."""
    if w.interleaved is not None:
        cfg = replace(cfg, block_k=w.layout.group)
    elif w.direct is None and cfg.swap:
        cfg = replace(cfg, swap=False)
    split = 1 if cfg.kernel == "tma" else usable_split(cfg.split_k, w.k, cfg.block_k)
    return cfg if split == cfg.split_k else replace(cfg, split_k=split)


# ---------------------------------------------------------------------------------------------- torch reference
def unshift(a: torch.Tensor) -> torch.Tensor:
    """Shifted int8 codes -> unsigned codes (int32)."""
    return a.to(torch.int32) + 128


def qgemm_reference(
    a: torch.Tensor,
    a_scale: float,
    a_zp: int,
    codes: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    act: str = "none",
    residual: Optional[torch.Tensor] = None,
    requant: Optional[Requant] = None,
    raw: bool = False,
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
