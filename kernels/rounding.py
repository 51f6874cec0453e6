"""Round a pre-rounding value to its code with no conversion instruction: the fp32 "magic number" every kernel's
quantize shares (the GEMM epilogues, LayerNorm + quantize, attention's probabilities and output).

``MAGIC + n`` is exact and its fp32 bits are ``MAGIC_BITS + n`` for every integer ``|n| <= 2**22`` (the fp32 values in
[2^23, 2^24] are the integers). So ``fl(v + MAGIC + zp)`` *is* ``MAGIC + zp + round(v)`` (round half to even), the
clamp to ``[0, qmax]`` is two float min/max against constants, and the code is the float's bits minus a constant: one
FFMA, two FMNMX and an integer add, where ``floor(v + 0.5) + zp`` -> clamp -> int costs an FRND and an F2I (both
conversion-pipe instructions, a quarter of the FMA rate on sm_80/sm_90) and an extra add.

Half to even instead of the reference's half up differs only where ``v`` is exactly on a ``.5`` boundary: a float
tie by definition (:mod:`p4q_engine.quant.ties`). Out-of-range values (``|v|`` past 2^22, infinities) land outside
``[MAGIC, MAGIC + qmax]`` on the right side and are clamped, as before; NaN clamps to code 0 (``tl.maximum`` returns the
non-NaN operand), as ``floor`` -> clamp did.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23
MAGIC_BITS = tl.constexpr(0x4B400000)


@triton.jit
def shifted_codes(y, inv, zp_magic, QMAX: tl.constexpr):
    """Shifted int8 codes ``clamp(round(y * inv) + zp, 0, QMAX) - 128``; ``zp_magic = zp + MAGIC`` (fp32, exact for
    integer ``zp <= 2^22``), ``inv`` the site's fp32 ``1 / scale`` (both broadcastable against ``y``)."""
    t = tl.minimum(tl.maximum(y * inv + zp_magic, MAGIC), MAGIC + QMAX)
    return (t.to(tl.int32, bitcast=True) - (MAGIC_BITS + 128)).to(tl.int8)
