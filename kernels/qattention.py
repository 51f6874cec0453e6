"""Fused quantized attention, one Triton kernel: one tile per (image, head) for short sequences (ViT-B/32's 50 tokens,
the text tower's 77 with the causal mask: every key in one block, one pass), two passes over key blocks for longer
ones (ViT-B/16's 197, ViT-L/14's 257, 577 at 336 px). The attention matrix lives only in registers.

Inputs come from the in_proj GEMM's requantizing epilogue: shifted int8 codes ``[B, L, 3D]`` (q | k | v columns).
For unsigned codes ``u`` with zero point ``z`` stored as ``s = u - 128``:
``sum (u1 - z1)(u2 - z2) = sum s1 s2 + c2 sum s1 + c1 sum s2 + n c1 c2`` with ``c = 128 - z``; padded rows and
columns are loaded as ``s = -c`` so they contribute exactly zero and the sums can run over the padded tile.
int8 tensor-core ``q k^T`` (the key-sum term as a second dot, into an int32 accumulator that is already the fp32
logit integer, see ``MAGIC``) -> the reference's two fp32 scale multiplies -> fp32 softmax -> probabilities quantized
to the Attention bits -> exact integer ``p v`` (an fp16 tensor-core dot of values in [-255, 255]) -> output codes
of the out-projection's input site.

The probabilities are quantized on a fixed grid *after* normalisation, so the usual online softmax (rescaling a
running output) cannot be used - a code needs the final row max and sum. Pass 1 streams the key blocks for the row
max and the sum of ``exp(logit - max)`` (online rescaling of the sum only); pass 2 streams them again, recomputes
each logit, normalises, quantizes the probability and accumulates the integer ``p v``. The cost is one extra
``q k^T``. A tile whose key block covers the whole sequence (``block_n >= L``, the short path) needs neither: one
``q k^T``, one ``exp`` per logit, the exact row max and sum. Whole key blocks carry no mask (only the last, partial
one - and, causal, the diagonal ones - does). The probabilities differ from the reference's only by float rounding
of the row sum and of one reciprocal, and round half to even (ties, ``p4q_engine.quant.ties``).

Per logit the main loops issue no int-to-float conversion, ``floor`` or subnormal fix-up (2026-12-02: 216 and 268
SASS instructions per 64 x 32 block and pass on sm_90, from 373 and 516; ``benchmarks/kernel_sass.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import pdl
from .compile_ahead import launch
from .limits import check_extent
from .pdl import grid_dependency
from .rounding import MAGIC, MAGIC_BITS, shifted_codes
from .tuning import INVARIANT_HEADS, TileConfig, batch_invariant, pick_config


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


#: ``MAGIC`` (``kernels/rounding.py``): an int32 accumulator started at ``MAGIC_BITS`` *is* fp32 ``MAGIC + acc`` - no
#: int-to-float conversion (a quarter-rate instruction) per logit - and ``fl(x + MAGIC + z)`` rounds ``x`` to an integer
#: code with one FMA (no ``floor``). Exact while ``|acc| <= 2**22``, which the tiled kernel needs for head dims <= 128.
#: fp16 bits of ``1024 + n`` are ``0x6400 + n`` for integers ``0 <= n < 1024``: int8 value codes become exact fp16
#: ``u - z_v`` with an integer add and one fp16 subtract (no int-to-float conversion).
FP16_MAGIC_BITS = tl.constexpr(0x6400)


@triton.jit
def _store_out(optr, acc, pv_scale, inv_so, zo, mask, O_QMAX: tl.constexpr):
    """Exact integer ``p v`` (fp32) -> output codes of the out_proj input site (shifted int8).

    ``y * (1 / s_o)`` instead of ``y / s_o`` (as the GEMM epilogues): an ulp or two of ``y / s_o``, far inside
    TIE_EPS; ``fl(. + MAGIC + z_o)`` rounds to the code (ties to even: an exact tie) and its bits are the integer."""
    tl.store(optr, shifted_codes(acc * pv_scale, inv_so, zo + MAGIC, O_QMAX), mask=mask)


@triton.jit
def _key_block(
    q,
    cq_a,
    cq_b,
    k_head,
    keys,
    rows,
    L,
    dims,
    stride_l,
    ck,
    rowc,
    qk_scale,
    sm_scale,
    HD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    SPLIT_CQ: tl.constexpr,
    FOLD_SM: tl.constexpr,
):
    """Scaled logits of the key block ``keys`` for the query ``rows`` (``-inf`` at padded and, causal, later keys
    when ``MASKED``; full blocks need no mask at all).

    ``sum (u_q - z_q)(u_k - z_k) = sum s_q s_k + c_q sum s_k + (c_k sum s_q + BLOCK_D c_q c_k)``: the first two terms
    come from the tensor cores (``c_q sum s_k`` as a dot with a constant ``c_q`` matrix - split in two when
    ``c_q = 128`` does not fit int8 - instead of unpacking every key byte), into an accumulator started at
    ``MAGIC_BITS``; the row term ``rowc`` (minus ``MAGIC``) is one exact fp32 add. The value is the reference's exact
    integer, then the reference's two fp32 multiplies (one when ``FOLD_SM``: ``sm_scale`` is a power of two, already in
    ``qk_scale``, and ``fl(fl(a qk) 2^-e) = fl(a (qk 2^-e))`` exactly)."""
    if MASKED:
        kmask = (keys < L)[:, None] & (dims < HD)[None, :]
    else:
        kmask = (dims < HD)[None, :]
    k = tl.load(k_head + keys[:, None] * stride_l + dims[None, :], mask=kmask, other=-ck).to(tl.int8)
    kt = tl.trans(k)
    if BLOCK_D <= 128:  # |acc| <= BLOCK_D * 2^15 <= 2^22
        acc = tl.dot(q, kt, tl.full((q.shape[0], k.shape[0]), MAGIC_BITS, tl.int32), out_dtype=tl.int32)
        acc = tl.dot(cq_a, kt, acc, out_dtype=tl.int32)
        if SPLIT_CQ:
            acc = tl.dot(cq_b, kt, acc, out_dtype=tl.int32)
        s = acc.to(tl.float32, bitcast=True) + rowc[:, None]
    else:  # |acc| may pass 2^22: convert
        acc = tl.dot(q, kt, out_dtype=tl.int32)
        acc = tl.dot(cq_a, kt, acc, out_dtype=tl.int32)
        if SPLIT_CQ:
            acc = tl.dot(cq_b, kt, acc, out_dtype=tl.int32)
        s = acc.to(tl.float32) + rowc[:, None]
    if FOLD_SM:
        logits = s * qk_scale
    else:
        logits = s * qk_scale * sm_scale
    if MASKED:
        keep = (keys < L)[None, :] & (rows >= 0)[:, None]
        if CAUSAL:
            keep = keep & (keys[None, :] <= rows[:, None])
        logits = tl.where(keep, logits, float("-inf"))
    return logits


#: log2(e) in fp32: ``exp(x - m) = 2^(x log2e - m log2e)``.
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp_sub(x, m2):
    """``exp(x - m)`` given ``m2 = fl(m log2e)``: ``ex2.approx.ftz`` of one fused ``x log2e - m2`` (one FFMA per
    logit where ``tl.exp(x - m)`` takes a subtract and a multiply). ``m2``'s own rounding scales a whole row's terms
    by one common factor, which the row's normalisation cancels; the per-logit error is one rounding of the fused
    result (< 4e-7 relative for every probability above half a code step), far inside TIE_EPS. Results below
    2^-126 flush to 0 (no subnormal fix-up): such a term is < 1e-37 of the row sum (>= 1, the max's term) and its
    probability code is the zero point either way."""
    return tl.math.exp2(tl.fma(x, LOG2E, -m2))


@triton.jit
def _pv_step(acc, e, inv, code_bias, v_ptrs, vmask, vc16, P_QMAX: tl.constexpr):
    """``acc += (u - z_p) (v - z_v)`` for one key block, ``u = round(e / (den s_p)) + z_p`` (clamped).

    ``p / s_p = e * (1 / (den s_p))``: one multiply instead of two divisions (a few ulps of ``p / s_p <= 255``,
    within TIE_EPS of the reference's value), fused with the round-to-integer: ``fl(p / s_p + MAGIC + z_p)`` is
    ``MAGIC + z_p + round(p / s_p)`` (ties to even where the reference rounds half up: an exact tie). A masked key has
    ``e = 0``, hence ``u = z_p``: it adds nothing with no select. ``(u - z_p)`` and ``(v - z_v)`` lie in [-255, 255]:
    exact in fp16, each product and a tile's sum (< 2^24) exact in the fp32 tensor-core accumulator, so the fp16 dot
    is an exact integer P.V with no zero-point terms; ``|acc| <= (255 + L / 2) * 255 < 2^24`` for L <= 4096 (a row's
    codes sum to ~1 / s_p plus rounding), so the accumulation across key blocks is exact in place."""
    t = tl.minimum(e * inv[:, None] + code_bias, MAGIC + P_QMAX)
    pf = (t - code_bias).to(tl.float16)  # = u - z_p (t >= code_bias: e >= 0)
    v = tl.load(v_ptrs, mask=vmask, other=0)
    vbits = (v.to(tl.int32) + (FP16_MAGIC_BITS + 128)).to(tl.int16)  # fp16 bits of 1024 + u_v
    vh = vbits.to(tl.float16, bitcast=True) - vc16  # - (1024 + z_v): exact
    return tl.dot(pf, vh, acc, out_dtype=tl.float32)


@triton.jit
def _pass1_step(m2, den, logits):
    """Online row max (kept as ``m2 = fl(max log2e)``, the value pass 2 subtracts) and sum of ``exp(logit - max)``.

    When the max grows the sum is rescaled by ``2^(m2_old - m2_new)``: by the ``m2`` values its terms were computed
    against, not by ``exp(max_old - max_new)`` - the latter would leave each earlier term off by ``m2_old``'s
    rounding (~4e-6 relative at logits ~ 100, enough to move a code by 1e-3 of a step)."""
    new_m2 = tl.maximum(m2, tl.max(logits, axis=1) * LOG2E)  # fl(. log2e) is monotonic: the max of the products
    den = den * tl.math.exp2(m2 - new_m2) + tl.sum(_exp_sub(logits, new_m2[:, None]), axis=1)
    return new_m2, den


@triton.jit
def _pass2_step(
    acc, q, cq_a, cq_b, k_head, v_head, keys, rows, L, dims, stride_l, ck, rowc, qk_scale, sm_scale, m2, inv,
    code_bias, vc16, HD: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    SPLIT_CQ: tl.constexpr, FOLD_SM: tl.constexpr, P_QMAX: tl.constexpr,
):  # fmt: skip
    """One key block of pass 2: the logits again, their probability codes, ``acc += (u - z_p)(v - z_v)``."""
    logits = _key_block(
        q, cq_a, cq_b, k_head, keys, rows, L, dims, stride_l, ck, rowc, qk_scale, sm_scale,
        HD, BLOCK_D, MASKED, CAUSAL, SPLIT_CQ, FOLD_SM,
    )  # fmt: skip
    e = _exp_sub(logits, m2[:, None])
    vmask = (dims < HD)[None, :]
    if MASKED:
        vmask = vmask & (keys < L)[:, None]
    return _pv_step(acc, e, inv, code_bias, v_head + keys[:, None] * stride_l + dims[None, :], vmask, vc16, P_QMAX)


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
    pv_scale,
    inv_so,
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
    SPLIT_CQ: tl.constexpr,
    FOLD_SM: tl.constexpr = False,
    GDC: tl.constexpr = False,
):
    grid_dependency(GDC)
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    r_mask = rows < L
    d_mask = dims < HD
    head = qkv_ptr + b * stride_b + h * HD
    q = tl.load(head + rows[:, None] * stride_l + dims[None, :], mask=r_mask[:, None] & d_mask[None, :], other=-cq).to(
        tl.int8
    )
    # c_q = cq_a + cq_b, each within int8 (c_q = 128 - z_q lies in [-127, 128])
    cq_hi = cq // 2 if SPLIT_CQ else cq
    cq_a = tl.full((BLOCK_M, BLOCK_D), cq_hi, tl.int8)
    cq_b = tl.full((BLOCK_M, BLOCK_D), cq - cq_hi, tl.int8)
    rowi = ck * tl.sum(q.to(tl.int32), axis=1) + BLOCK_D * cq * ck  # |rowi| <= BLOCK_D 2^15: exact in fp32
    if BLOCK_D <= 128:
        rowc = rowi.to(tl.float32) - MAGIC
    else:
        rowc = rowi.to(tl.float32)
    k_head = head + D
    v_head = head + 2 * D
    vc16 = tl.cast(1152.0 - cv, tl.float16)  # 1024 + z_v (z_v = 128 - c_v)
    code_bias = MAGIC + zpp
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    vdm = d_mask[None, :]
    if ONE_PASS:
        # every key in one block (BLOCK_N >= L): one q k^T, one exp per logit - the logits stay in registers
        logits = _key_block(
            q, cq_a, cq_b, k_head, cols, rows, L, dims, stride_l, ck, rowc, qk_scale, sm_scale,
            HD, BLOCK_D, True, CAUSAL, SPLIT_CQ, FOLD_SM,
        )  # fmt: skip
        e = _exp_sub(logits, (tl.max(logits, axis=1) * LOG2E)[:, None])
        inv = 1.0 / (tl.sum(e, axis=1) * sp)
        vmask = (cols < L)[:, None] & vdm
        acc = _pv_step(acc, e, inv, code_bias, v_head + cols[:, None] * stride_l + dims[None, :], vmask, vc16, P_QMAX)
    else:
        # key blocks [0, n_full) are whole and (causal) entirely at or before every row of this block: no mask
        n_end = L
        n_full = (L // BLOCK_N) * BLOCK_N
        if CAUSAL:
            n_end = tl.minimum(L, (pid_m + 1) * BLOCK_M)
            n_full = tl.minimum(n_full, (pid_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N)
        # pass 1: row max and sum of exp(logit - max); whole blocks unmasked, then the masked rest
        m2 = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        den = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(0, n_full, BLOCK_N):
            logits = _key_block(
                q, cq_a, cq_b, k_head, n0 + cols, rows, L, dims, stride_l, ck, rowc, qk_scale, sm_scale,
                HD, BLOCK_D, False, CAUSAL, SPLIT_CQ, FOLD_SM,
            )  # fmt: skip
            m2, den = _pass1_step(m2, den, logits)
        for n0 in range(n_full, n_end, BLOCK_N):
            logits = _key_block(
                q, cq_a, cq_b, k_head, n0 + cols, rows, L, dims, stride_l, ck, rowc, qk_scale, sm_scale,
                HD, BLOCK_D, True, CAUSAL, SPLIT_CQ, FOLD_SM,
            )  # fmt: skip
            m2, den = _pass1_step(m2, den, logits)
        # pass 2: the final max and sum give each probability its code (see _pv_step)
        inv = 1.0 / (den * sp)
        for n0 in range(0, n_full, BLOCK_N):
            acc = _pass2_step(
                acc, q, cq_a, cq_b, k_head, v_head, n0 + cols, rows, L, dims, stride_l, ck, rowc, qk_scale,
                sm_scale, m2, inv, code_bias, vc16, HD, BLOCK_D, False, CAUSAL, SPLIT_CQ, FOLD_SM, P_QMAX,
            )  # fmt: skip
        for n0 in range(n_full, n_end, BLOCK_N):
            acc = _pass2_step(
                acc, q, cq_a, cq_b, k_head, v_head, n0 + cols, rows, L, dims, stride_l, ck, rowc, qk_scale,
                sm_scale, m2, inv, code_bias, vc16, HD, BLOCK_D, True, CAUSAL, SPLIT_CQ, FOLD_SM, P_QMAX,
            )  # fmt: skip
    optr = out_ptr + b * out_stride_b + rows[:, None] * out_stride_l + h * HD + dims[None, :]
    _store_out(optr, acc, pv_scale, inv_so, zo, r_mask[:, None] & d_mask[None, :], O_QMAX)


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
TILED_TUNE_NAME = "qattn-tiled3"
SHORT_TUNE_NAME = "qattn-short2"


def fold_sm(qk_scale: float, hd: int) -> bool:
    """Whether ``1 / sqrt(hd)`` is a power of two (head dims 4^k: 16, 64, 256) and ``qk_scale / sqrt(hd)`` an fp32
    normal (or 0), so the softmax scale folds into ``qk_scale`` exactly: one multiply per logit and pass fewer."""
    folded = abs(qk_scale) / math.sqrt(hd)
    return math.frexp(1.0 / math.sqrt(hd))[0] == 0.5 and (folded == 0 or folded >= 2.0**-126)


def _scalar_args(sites: AttnSites, hd: int) -> tuple[bool, tuple]:
    """(``FOLD_SM``, the kernel's scalar arguments)."""
    qk = _f32_product(sites.q[0], sites.k[0])
    fold = fold_sm(qk, hd)
    return fold, (
        qk / math.sqrt(hd) if fold else qk,  # times a power of two: exact
        128 - sites.q[1],
        128 - sites.k[1],
        128 - sites.v[1],
        sites.p[0],
        float(sites.p[1]),
        _f32_product(sites.p[0], sites.v[0]),
        float(1.0 / torch.tensor(sites.out[0], dtype=torch.float32)),  # fp32 reciprocal, as the GEMM epilogues
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
    check_extent("qattention", qkv=qkv.numel())
    qkv = qkv.contiguous()
    bsz, length, d3 = qkv.shape
    d = d3 // 3
    hd = d // heads
    short = length <= SHORT_MAX_L if kernel == "auto" else kernel == "short"
    if short and length > SHORT_MAX_L:
        raise ValueError(f"the short qattention kernel takes L <= {SHORT_MAX_L}, got L={length}")
    if length > TILED_MAX_L:
        raise ValueError(f"qattention takes L <= {TILED_MAX_L} (exact fp32 P.V accumulation), got L={length}")
    bad = [n for n in ("q", "k", "v", "p", "out") if not 0 <= getattr(sites, n)[1] <= 255]
    if bad:  # the kernels' integer bounds (int8 zero-point terms, exact fp32 accumulators) assume 8-bit grids
        raise ValueError(f"qattention zero points must lie in [0, 255], got {[(n, getattr(sites, n)[1]) for n in bad]}")
    out = torch.empty(bsz, length, d, dtype=torch.int8, device=qkv.device)
    if bsz == 0 or length == 0:
        return out
    fold, scalars = _scalar_args(sites, hd)
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
        *scalars,
    )
    qmax = dict(P_QMAX=float((1 << sites.p_bits) - 1), O_QMAX=float((1 << sites.out_bits) - 1))
    if short:  # one tile per (image, head): the whole padded sequence, one pass
        cfg = config or _short_config(qkv, heads, sites, causal, num_warps)
        block_m = block_n = _pow2(length)
        grid = (bsz * heads, 1)
    else:
        cfg = config or _tiled_config(qkv, heads, sites, causal, block_m, block_n, num_warps)
        block_m, block_n = cfg.block_m, cfg.block_n
        grid = (bsz * heads, triton.cdiv(length, block_m))
    launch(
        _qattention_kernel,
        grid,
        *common,
        HD=hd,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=_pow2(hd),
        CAUSAL=causal,
        **qmax,
        ONE_PASS=block_n >= length,
        SPLIT_CQ=128 - sites.q[1] > 127,
        FOLD_SM=fold,
        num_warps=cfg.num_warps,
        num_stages=1 if short else cfg.num_stages,
        **pdl.options(qkv.device),
    )
    return out


def _tune(name: str, qkv: torch.Tensor, heads: int, sites: AttnSites, causal: bool, kernel: str, candidates):
    """The tuned (or shipped) tile of ``kernel`` for this (batch x heads bucket, L, head dim)."""
    bsz, length, d3 = qkv.shape

    def bench(c: TileConfig) -> None:
        qattention(qkv, heads, sites, causal, kernel=kernel, config=c)

    name += "-causal" if causal else ""
    hd = d3 // 3 // heads
    if batch_invariant():  # the row sums' order follows the tile: one tile for every batch, looked up, not timed
        return pick_config(name, INVARIANT_HEADS, length, hd, sites.p_bits, qkv.device, None, candidates, length)
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


def qattention_reference(
    qkv: torch.Tensor, heads: int, sites: AttnSites, causal: bool = False, values: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The CPU engine's attention on codes (exact integer matmuls in float64, fp32 softmax). ``values``: also return
    the output site's pre-rounding values ``o / s_o`` (float64 of the fp32 quotient), for the tie rule."""
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
    pre = o / so
    qo = torch.clamp(torch.floor(pre + 0.5) + sites.out[1], 0, (1 << sites.out_bits) - 1)
    codes = (qo.to(torch.int32) - 128).to(torch.int8)
    return (codes, pre.double()) if values else codes
