"""The GEMMs' epilogues, one definition for both main loops (``kernels/qgemm.py``): the per-tile epilogue
(zero-point correction, dequantization, bias, activation, residual, store) and the LayerNorm tail.

**LayerNorm tail** (``qgemm(..., residual=x, ln=RowNorm(...))``): a residual GEMM (out_proj, c_proj) is followed in
every CLIP block by LayerNorm + quantize of the rows it just wrote (ln_2 -> c_fc, the next block's ln_1 ->
in_proj). Instead of a separate kernel (``layernorm.layernorm_quant``: a launch and a boundary, 24 of a ViT-B/32
forward's ~88 kernels), the tiles of one row block count their arrivals (``kernels/arrival.py``) and the last one
normalises the block's finished rows - reading them back from L2 - and stores the next site's codes beside the
fp32 residual stream. The arithmetic is :func:`layernorm.ln_codes`, the standalone kernel's, so the fused and the
unfused block compute the same codes up to the row sum's reduction order (tie-aware parity, as before).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from .activations import gelu, quick_gelu
from .arrival import arrive
from .layernorm import ln_codes
from .rounding import MAGIC, shifted_codes

#: Widest row the LayerNorm tail normalises (one row per step there; its registers grow with the width).
LN_MAX_D = 8192
#: Elements per LayerNorm-tail step (rows x padded width): 32 fp32 per thread of a 4-warp program.
LN_STEP = 4096


def ln_tail_enabled() -> bool:
    """``P4Q_FUSE_LN``: ``1`` runs the engine's LayerNorms as the residual GEMMs' tails, ``0`` (default, until timed
    at every batch) as their own kernels. Anything else raises."""
    value = os.environ.get("P4Q_FUSE_LN", "0")
    if value not in ("0", "1"):
        from p4q_engine.errors import ConfigError

        raise ConfigError(f"P4Q_FUSE_LN must be 0 or 1, got {value!r}")
    return value == "1"


def ln_block_d(n: int) -> int:
    """The tail's padded row width."""
    return max(16, 1 << (n - 1).bit_length())


def ln_rows(block_m: int, n: int) -> int:
    """Rows per tail step: as many as fit ``LN_STEP`` elements, at most the tile's rows."""
    return max(1, min(block_m, LN_STEP // ln_block_d(n)))


@triton.jit
def epilogue(
    acc,
    offs_m,
    offs_n,
    M,
    N,
    colsum_ptr,
    wscale_ptr,
    bias_ptr,
    res_ptr,
    oinv_ptr,
    ozp_ptr,
    out_ptr,
    stride_rm,
    stride_om,
    a_scale,
    a_corr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    ACT: tl.constexpr,
    OUT_MODE: tl.constexpr,
    OUT_QMAX: tl.constexpr,
    pid_m,
    num_n,
    ln_w_ptr,
    ln_b_ptr,
    codes_ptr,
    stride_cm,
    ln_cnt_ptr,
    ln_eps,
    ln_inv_scale,
    ln_zp,
    HAS_LN: tl.constexpr,
    LN_QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    LN_BLOCK_D: tl.constexpr,
    LN_ROWS: tl.constexpr,
):
    """Zero-point correction, dequantization, bias, activation, residual, and the store (raw / float / requant),
    then (``HAS_LN``, float output) the LayerNorm tail: one definition for both main loops."""
    m_mask = offs_m < M
    n_mask = offs_n < N
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
        if ACT == 1:  # exact-erf GELU, branch-free (kernels/activations.py: libdevice erff was most of c_fc's time)
            y = gelu(y)
        elif ACT == 2:
            y = quick_gelu(y)
        if HAS_RES:
            y += tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=o_mask, other=0.0)
        if OUT_MODE == 1:  # float output
            tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=o_mask)
            if HAS_LN:
                ln_tail(
                    out_ptr, stride_om, codes_ptr, stride_cm, ln_cnt_ptr, pid_m, num_n, M, N, ln_w_ptr, ln_b_ptr,
                    ln_eps, ln_inv_scale, ln_zp, LN_QMAX, BLOCK_M, LN_BLOCK_D, LN_ROWS,
                )  # fmt: skip
        else:  # requantize to the next site, shifted int8 codes
            # y * (1 / s) instead of y / s: no per-element division; the two differ by an ulp or two of y / s
            # (<= 255 + zp), far inside the tie rule's TIE_EPS, so only codes on a float tie can move
            # (round half to even in ``shifted_codes``: differs from floor(v + 0.5) only on an exact .5, a tie)
            inv = tl.load(oinv_ptr + offs_n, mask=n_mask, other=1.0)
            zp_magic = tl.load(ozp_ptr + offs_n, mask=n_mask, other=0).to(tl.float32) + MAGIC
            tl.store(out_ptr + out_offs, shifted_codes(y, inv[None, :], zp_magic[None, :], OUT_QMAX), mask=o_mask)


@triton.jit
def ln_tail(
    y_ptr,
    stride_ym,
    codes_ptr,
    stride_cm,
    cnt_ptr,
    pid_m,
    num_n,
    M,
    N,
    ln_w_ptr,
    ln_b_ptr,
    eps,
    inv_scale,
    zp,
    QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
):
    """After a tile's epilogue stored its part of rows ``[pid_m * BLOCK_M, +BLOCK_M)``: the last of the row block's
    ``num_n`` tiles to arrive normalises those rows (every column now written) and stores their codes."""
    if arrive(cnt_ptr, pid_m, num_n):
        cols = tl.arange(0, BLOCK_D)
        for r0 in range(0, BLOCK_M, ROWS):
            rows = pid_m * BLOCK_M + r0 + tl.arange(0, ROWS)
            mask = (rows < M)[:, None] & (cols < N)[None, :]
            x = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :], mask=mask, other=0.0, cache_modifier=".cg")
            codes = ln_codes(x, mask, cols, N, ln_w_ptr, ln_b_ptr, eps, inv_scale, zp, QMAX)
            tl.store(codes_ptr + rows[:, None] * stride_cm + cols[None, :], codes, mask=mask)
