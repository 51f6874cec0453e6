"""What integer grid a tensor is mapped onto, and the named W-A-Attention bit configurations.

One :class:`QuantSpec` describes a quantized tensor completely (bit width, signedness, granularity). The fake-quant
path, the packer and the integer kernels all read the same spec, so they cannot disagree about ``qmin``/``qmax``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from p4q_engine.errors import ConfigError

#: Bit widths the project can quantize to, pack and execute. Anything else is rejected at parse time.
SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is a supported width, else raise :class:`ConfigError`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ConfigError(f"unsupported bit width {bits!r}; supported: {', '.join(map(str, SUPPORTED_BITS))}")
    return bits


#: Signed grids by name: ``full`` is two's complement, codes ``[-2^(b-1), 2^(b-1) - 1]`` (Eq. 2 of the paper; at 2
#: bits the four levels -2..1); ``restricted`` drops the most negative code, ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (at 2
#: bits ternary). The value is ``QuantSpec.narrow_range``.
SIGNED_GRIDS: dict[str, bool] = {"full": False, "restricted": True}

#: The grid every weight is quantized on (fake-quant, OMSE's objective, packer, both engines, kernels): ``full``.
#: Measured first (benchmarks/results/weight_grid.md, reference task): neither grid is consistently better - over
#: the 16 percentile/OMSE PTQ rows the differences are -1.45..+2.80 points and average +0.01 for ``full``; it wins
#: the largest one (2-2-8 OMSE full scope, 19.20 vs 16.40: 6% of its weights use the extra level) and P4Q 4-4-8 (72.60
#: vs 72.10). So the tie-breakers decide: it is the paper's Eq. 2, and every artifact written before the grid was
#: recorded holds it. Scales stay ``max|w| / (2^(b-1) - 1)`` either way, so the extra negative level is reached only
#: where the calibrated clipping range is narrower than ``max|w|``.
WEIGHT_GRID = "full"


@dataclass(frozen=True)
class QuantSpec:
    """The integer grid of one tensor.

    ``signed`` specs are symmetric (zero point 0) and are used for weights, per output channel (``ch_axis=0``); their
    codes are ``[-2^(b-1), 2^(b-1) - 1]``, or ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` with ``narrow_range`` (see
    :data:`SIGNED_GRIDS`). Unsigned specs are asymmetric (codes in ``[0, 2^b - 1]`` with an integer zero point,
    Eq. 3) and are used for activations, per tensor by default.
    """

    bits: int
    signed: bool
    per_channel: bool = False
    ch_axis: int = 0
    narrow_range: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.narrow_range and not self.signed:
            raise ConfigError("narrow_range applies to signed (weight) grids only")

    @property
    def grid(self) -> str:
        """``full`` / ``restricted`` for signed specs, ``unsigned`` otherwise (recorded in the artifact)."""
        if not self.signed:
            return "unsigned"
        return "restricted" if self.narrow_range else "full"

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(1 << (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def storage_offset(self) -> int:
        """Added to a code before packing, so stored codes are ``[0, 2^b)``: ``2^(b-1)`` for every signed grid (the
        packed layout and the kernels' unpacking do not depend on the grid), 0 for unsigned ones."""
        return (1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def levels(self) -> int:
        return 1 << self.bits

    def describe(self) -> str:
        kind = "int" if self.signed else "uint"
        gran = f"per-channel(axis={self.ch_axis})" if self.per_channel else "per-tensor"
        return f"{kind}{self.bits} {gran}"


def signed_grid(name: str) -> bool:
    """``narrow_range`` of the signed grid called ``name``; :class:`ConfigError` for an unknown name."""
    if name not in SIGNED_GRIDS:
        raise ConfigError(f"unknown signed grid {name!r}; choose from {', '.join(SIGNED_GRIDS)}")
    return SIGNED_GRIDS[name]


def weight_spec(bits: Optional[int]) -> Optional[QuantSpec]:
    """Signed symmetric per-output-channel spec on :data:`WEIGHT_GRID` for a weight (``None`` keeps it float)."""
    if bits is None:
        return None
    return QuantSpec(bits, signed=True, per_channel=True, ch_axis=0, narrow_range=signed_grid(WEIGHT_GRID))


def act_spec(bits: Optional[int], per_channel: bool = False) -> Optional[QuantSpec]:
    """Unsigned asymmetric spec for an activation; per-channel means per hidden feature (last axis)."""
    return None if bits is None else QuantSpec(bits, signed=False, per_channel=per_channel, ch_axis=-1)


@dataclass(frozen=True)
class BitConfig:
    """A W-A-Attention bit configuration as in the paper's Table 1 (``None`` = floating point)."""

    name: str
    w_bits: Optional[int]
    a_bits: Optional[int]
    attn_bits: Optional[int]

    @property
    def is_float(self) -> bool:
        return self.w_bits is None and self.a_bits is None and self.attn_bits is None


#: The named configurations of the paper (plus full precision).
BIT_CONFIGS: dict[str, BitConfig] = {
    "fp32": BitConfig("fp32", None, None, None),
    "8-8-8": BitConfig("8-8-8", 8, 8, 8),
    "4-4-8": BitConfig("4-4-8", 4, 4, 8),
    "3-3-8": BitConfig("3-3-8", 3, 3, 8),
    "2-2-8": BitConfig("2-2-8", 2, 2, 8),
}

_BITS_RE = re.compile(r"^(\d+)-(\d+)-(\d+)$")


def parse_bit_config(text: str | BitConfig) -> BitConfig:
    """Parse ``"4-4-8"`` (any supported W, A and Attention widths) or a registered name such as ``"fp32"``."""
    if isinstance(text, BitConfig):
        return text
    key = str(text).strip().lower()
    if key in BIT_CONFIGS:
        return BIT_CONFIGS[key]
    m = _BITS_RE.match(key)
    if not m:
        raise ConfigError(
            f"bad bit config {text!r}: expected W-A-Attention such as 4-4-8 or one of {', '.join(BIT_CONFIGS)}"
        )
    w, a, t = (int(g) for g in m.groups())
    for role, b in (("weight", w), ("activation", a), ("attention", t)):
        if b not in SUPPORTED_BITS:
            raise ConfigError(
                f"bad bit config {text!r}: {role} bits {b} unsupported; supported: "
                f"{', '.join(map(str, SUPPORTED_BITS))}"
            )
    return BitConfig(key, w, a, t)
