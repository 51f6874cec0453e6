"""The GEMM epilogues' activations: exact-erf GELU in about 15 arithmetic operations, QuickGELU.

Why not ``tl.math.erf``: libdevice's ``erff`` is branchy (a polynomial below |x| = 1, an ``exp`` form above), and a
warp whose lanes take both runs both, so the c_fc epilogue cost ~83 SASS instructions per output element on sm_90
(``benchmarks/kernel_sass.py``, 2026-12-02) - about three times the 128x256 tile's whole int8 main loop at K = 768.
The c_fc GEMM is the largest in every block, so its epilogue, not its tensor cores, set its time.

Here ``erfc(|x|)`` is Abramowitz & Stegun 7.1.26 (``t = 1 / (1 + p |x|)``, a degree-5 polynomial in ``t`` times
``exp(-x^2)``: absolute error <= 1.5e-7), branch-free, and the negative half of GELU uses ``erfc`` directly, so it
has no ``1 + erf`` cancellation at all. Evaluated in fp32 on [-12, 12] its GELU is within 3.3e-7 |y| of the exact
one (torch's own fp32 GELU: 4.1e-7 |y|), and in the negative tail it is *closer* to the exact value than torch's fp32
GELU, whose ``1 + erf`` cancels. Against the reference (torch fp32) it therefore differs by a few fp32 ulps of ``y``,
what the tie rule (``p4q_engine.quant.ties``, 1e-3 code units) already allows transcendentals.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: A&S 7.1.26 coefficients (p, a1..a5); constexpr so the kernels may read them (plain floats in the reference).
P = tl.constexpr(0.3275911)
A1 = tl.constexpr(0.254829592)
A2 = tl.constexpr(-0.284496736)
A3 = tl.constexpr(1.421413741)
A4 = tl.constexpr(-1.453152027)
A5 = tl.constexpr(1.061405429)
#: Bound on |gelu(y) - exact gelu(y)| / max(|y|, 1) of the fp32 evaluation (measured 6.4e-7 at |y| = 12, where it
#: is the fp32 ulp of y itself; 3.3e-7 |y| below), with headroom; the tests hold the kernel to it.
ABS_ERR_PER_UNIT = 1e-6


@triton.jit
def gelu(y):
    """``0.5 y (1 + erf(y / sqrt 2))``: ``0.5 y (2 - h)`` for ``y >= 0`` and ``0.5 y h`` below, ``h = erfc(|y| / sqrt
    2)``. ``+inf`` -> ``inf``; ``-inf`` -> NaN (``-inf * 0``), as ``y * (1 + erf)`` gives."""
    x = tl.abs(y) * 0.7071067811865476
    t = 1.0 / (1.0 + P * x)
    poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t
    h = poly * tl.math.exp2(-(x * x) * 1.4426950408889634)
    return 0.5 * y * tl.where(y >= 0, 2.0 - h, h)


@triton.jit
def quick_gelu(y):
    """open_clip's QuickGELU, ``y sigmoid(1.702 y)``."""
    return y * tl.sigmoid(1.702 * y)


def gelu_reference(y: torch.Tensor) -> torch.Tensor:
    """The same arithmetic in torch (float32 or float64), for the accuracy tests."""
    p, a1, a2, a3, a4, a5 = (float(c.value) for c in (P, A1, A2, A3, A4, A5))
    x = y.abs() * 0.7071067811865476
    t = 1.0 / (1.0 + p * x)
    poly = ((((a5 * t + a4) * t + a3) * t + a2) * t + a1) * t
    h = poly * torch.exp2(-(x * x) * 1.4426950408889634)
    return 0.5 * y * torch.where(y >= 0, 2.0 - h, h)
