"""Device-side weight layouts of the packed GEMM, built once at load time from the artifact's bit planes.

The artifact (``docs/format.md``) stores codes LSB-first along K in int32 words, 3-bit as a 2-bit plus a 1-bit
plane: compact, but unpacking it costs a shift, a mask, a reshape and an offset subtraction per weight element in
the main loop, and the reshape is a register shuffle. The device keeps a second copy shaped for the main loop:

* ``direct8``: 8-bit weights as plain int8 ``[N, K]`` (no unpacking at all).
* ``nib4`` (3- and 4-bit) and ``nib2`` (2-bit): signed two's complement fields packed ``8 / lane`` to a byte,
  *interleaved by sub-tile*: byte ``[n, g * SUB + j]`` holds the codes of ``k = g * G + i * SUB + j`` in field ``i``
  (bits ``[i * lane, (i + 1) * lane)``), with ``G = SUB * 8 / lane``. One K step of the kernel loads one
  ``[BLOCK_N, SUB]`` byte tile and gets field ``i`` as an **int8 that is already a multiple of the code**:
  ``(byte << (8 - lane * (i + 1))) & -(1 << (8 - lane))`` equals ``code * 2^(8 - lane)`` - one shift and/or one
  mask, no offset, no reshape. The accumulator is ``2^(8 - lane)`` times the true one; every term is a multiple of
  that factor, so an arithmetic right shift recovers the exact integer (``|acc| <= K * 128 * 128 = K * 2^14`` stays
  below 2^31 for K < 2^17; :func:`device_layout` takes the nibble layouts up to ``NIB_MAX_K = 2^16``, a factor two
  of margin).

3-bit codes use ``nib4`` (their range fits a nibble): the same speed as 4-bit, one byte per two weights on the
device, while the artifact keeps its 3-bit planes. The registry :data:`LAYOUTS` maps bits to a layout; nothing in
the kernels branches on the bit width itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

#: K elements of one sub-tile (one tensor-core dot per field and K step).
SUB_K = 64
#: Above this K the scaled accumulator of the nibble layouts could leave int32: the plane kernels run instead.
NIB_MAX_K = 65536
#: Plane widths of the artifact layout per weight bit width (``docs/format.md``).
PLANES = {2: (2, 0), 3: (2, 1), 4: (4, 0), 8: (8, 0)}


@dataclass(frozen=True)
class DeviceLayout:
    """How the main loop reads a weight: ``lane`` bits per field, ``8 // lane`` fields per byte (``lane == 8``:
    plain int8 codes)."""

    name: str
    lane: int

    @property
    def fields(self) -> int:
        return 8 // self.lane

    @property
    def group(self) -> int:
        """K elements one byte column of a sub-tile covers."""
        return SUB_K * self.fields

    @property
    def shift(self) -> int:
        """log2 of the factor the extracted fields carry (the accumulator's right shift)."""
        return 8 - self.lane


DIRECT8 = DeviceLayout("direct8", 8)
NIB4 = DeviceLayout("nib4", 4)
NIB2 = DeviceLayout("nib2", 2)
#: Weight bits -> device layout (``P4Q_WEIGHT_LAYOUT=planes`` keeps the artifact's planes for 2/3/4 bits: the
#: before/after switch of the benchmarks).
LAYOUTS: dict[int, DeviceLayout] = {8: DIRECT8, 4: NIB4, 3: NIB4, 2: NIB2}


def device_layout(bits: int, k: int) -> Optional[DeviceLayout]:
    """The layout the kernels use for ``bits``-bit weights with reduction length ``k`` (None: the artifact planes)."""
    lay = LAYOUTS[bits]
    if lay is DIRECT8:
        return lay
    if os.environ.get("P4Q_WEIGHT_LAYOUT", "nib") == "planes" or k > NIB_MAX_K:
        return None
    return lay


def wide_copy(device: torch.device, nbytes: int = 0) -> bool:
    """Whether a low-bit weight on ``device`` also keeps an int8 copy of ``nbytes`` (``P4Q_WIDE_INT8``: ``auto``, the
    default, on GPUs while at least a quarter of the GPU's memory stays free after the copy; ``1`` everywhere, ``0``
    nowhere). It costs N x K bytes per weight (ViT-B/32: 85 MB beside its 43 MB of 4-bit codes) and lets the tuner
    run each GEMM through whichever main loop is faster at its M: the packed one reads fewer bytes (small M), the
    8-bit one loads both operands by TMA straight into shared memory (large M, where the nibble loop measured
    1.3-1.46x the W8 time: benchmarks/results/gpu_2026-12-01b). A model too large for the copies keeps the packed
    loop for the weights that no longer fit, instead of running out of memory."""
    mode = os.environ.get("P4Q_WIDE_INT8", "auto")
    if mode not in ("auto", "0", "1"):
        from p4q_engine.errors import ConfigError

        raise ConfigError(f"P4Q_WIDE_INT8 must be auto, 0 or 1, got {mode!r}")
    if mode != "auto":
        return mode == "1"
    if device.type != "cuda":
        return False
    free, total = torch.cuda.mem_get_info(device)
    return free - nbytes >= total // 4


def pack_interleaved(codes: torch.Tensor, layout: DeviceLayout) -> torch.Tensor:
    """Signed codes ``[N, K]`` (any int dtype, within the layout's signed field range) -> int8 bytes
    ``[N, ceil(K / G) * SUB_K]`` of the interleaved layout; K is padded with zero codes to a whole group."""
    n, k = codes.shape
    lane, fields, group = layout.lane, layout.fields, layout.group
    lo, hi = -(1 << (lane - 1)), (1 << (lane - 1)) - 1
    c = codes.to(torch.int32)
    if c.numel() and (int(c.min()) < lo or int(c.max()) > hi):
        raise ValueError(f"codes outside the {lane}-bit signed field range [{lo}, {hi}]")
    kp = -(-k // group) * group
    c = torch.nn.functional.pad(c, (0, kp - k)).view(n, kp // group, fields, SUB_K) & ((1 << lane) - 1)
    shifts = (torch.arange(fields, device=c.device, dtype=torch.int32) * lane).view(1, 1, fields, 1)
    byte = (c << shifts).sum(dim=2)  # fields occupy disjoint bits: the sum is their OR
    return (byte - ((byte >= 128).to(torch.int32) << 8)).to(torch.int8).reshape(n, kp // fields).contiguous()


def unpack_interleaved(packed: torch.Tensor, layout: DeviceLayout, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_interleaved` (int8 codes ``[N, k]``), the way the kernel extracts them."""
    n = packed.shape[0]
    b = packed.to(torch.int32).view(n, -1, 1, SUB_K)
    fields = []
    for i in range(layout.fields):
        x = (b << (32 - layout.lane * (i + 1))) >> (32 - layout.lane)  # sign-extending field extraction
        fields.append(x)
    return torch.cat(fields, dim=2).reshape(n, -1)[:, :k].to(torch.int8)


# ---------------------------------------------------------------------------------------------- readers (Triton)
@triton.jit
def _field(wb, I: tl.constexpr, LANE: tl.constexpr, PACKED: tl.constexpr = False):
    """Field ``I`` of interleaved weight bytes (``weight_layout``) as int8 ``code * 2^(8 - LANE)``: one shift for
    the lowest field, one mask for the highest, both between (the cast wraps, dropping the fields above).

    ``PACKED`` (GPU only, ``P4Q_NIB_PACKED=1``): the same bytes four to a 32-bit register, ``shl.b32`` + ``and.b32``
    with the mask repeated per byte - half an instruction per weight instead of the compiler's per-byte unpack,
    shift, mask and repack (~2 per weight on sm_90, ``benchmarks/kernel_sass.py``-style count). A shift's spill
    into the next byte lands in its low ``SH <= 8 - LANE`` bits, which the mask clears."""
    SH: tl.constexpr = 8 - LANE * (I + 1)
    HI: tl.constexpr = -(1 << (8 - LANE))
    if PACKED:
        return _field_packed(wb.to(tl.int8), SH, LANE)
    x = wb
    if SH > 0:
        x = x << SH
    if I > 0:
        x = x & HI
    return x.to(tl.int8)


@triton.jit
def _field_packed(wb, SH: tl.constexpr, LANE: tl.constexpr):
    """``(bytes << SH) & top-LANE-bits`` on four bytes per register (literal PTX per case: the lanes of the layouts
    are 4 (3- and 4-bit weights) and 2)."""
    tl.static_assert(LANE == 4 or LANE == 2, "interleaved layouts have 2- or 4-bit lanes")
    if LANE == 4:
        if SH == 4:
            y = tl.inline_asm_elementwise(
                "{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }", "=r,r", [wb], tl.int8, True, 4
            )
        else:
            y = tl.inline_asm_elementwise("and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [wb], tl.int8, True, 4)
    else:
        if SH == 6:
            y = tl.inline_asm_elementwise(
                "{ .reg .b32 t; shl.b32 t, $1, 6; and.b32 $0, t, 0xC0C0C0C0; }", "=r,r", [wb], tl.int8, True, 4
            )
        elif SH == 4:
            y = tl.inline_asm_elementwise(
                "{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xC0C0C0C0; }", "=r,r", [wb], tl.int8, True, 4
            )
        elif SH == 2:
            y = tl.inline_asm_elementwise(
                "{ .reg .b32 t; shl.b32 t, $1, 2; and.b32 $0, t, 0xC0C0C0C0; }", "=r,r", [wb], tl.int8, True, 4
            )
        else:
            y = tl.inline_asm_elementwise("and.b32 $0, $1, 0xC0C0C0C0;", "=r,r", [wb], tl.int8, True, 4)
    return y


@triton.jit
def _mma(acc, a, w, SWAP: tl.constexpr):
    """``acc += a w^T`` (``SWAP``: ``acc^T += w a^T``, the weight as the left operand: the tensor core's 64-row
    side then holds output channels, which pays at small M, and a weight tile built in registers can stay there)."""
    if SWAP:
        acc = tl.dot(w, tl.trans(a), acc, out_dtype=tl.int32)
    else:
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _unpack_tile(wp, offs_n, n_mask, kw0, KW, WIDTH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Stored codes of a [BLOCK_K, BLOCK_N] tile from one bit plane (int32 words, LSB-first along K)."""
    PER: tl.constexpr = 32 // WIDTH
    offs_w = kw0 + tl.arange(0, BLOCK_K // PER)
    words = tl.load(wp + offs_n[None, :] * KW + offs_w[:, None], mask=n_mask[None, :] & (offs_w[:, None] < KW), other=0)
    shifts = tl.arange(0, PER) * WIDTH
    vals = (words[:, None, :] >> shifts[None, :, None]) & ((1 << WIDTH) - 1)
    return tl.reshape(vals, (BLOCK_K, BLOCK_N))


@triton.jit
def _unpack_rows(words, WIDTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Stored codes ``[BLOCK_N, BLOCK_K]`` from a ``[BLOCK_N, BLOCK_K / per]`` tile of words (LSB-first along K)."""
    PER: tl.constexpr = 32 // WIDTH
    shifts = tl.arange(0, PER) * WIDTH
    vals = (words[:, :, None] >> shifts[None, None, :]) & ((1 << WIDTH) - 1)
    return tl.reshape(vals, (BLOCK_N, BLOCK_K))


def pad_words(p: torch.Tensor) -> torch.Tensor:
    """Rows of int32 words padded with zero words to a multiple of 4 (16 bytes), as TMA requires of row strides."""
    kw = p.shape[1]
    if kw % 4 == 0:
        return p.contiguous()
    return torch.nn.functional.pad(p, (0, 4 - kw % 4)).contiguous()


@dataclass
class PackedWeight:
    """A weight on the device: the artifact's planes, per-channel scales, column sums of the signed codes, and the
    main loop's copy (:class:`DeviceLayout`) built from the codes once."""

    planes: list[torch.Tensor]  # int32 [N, ceil(K / (32 / width))] per plane (device copy padded to 16 bytes)
    scale: torch.Tensor  # float32 [N]
    colsum: torch.Tensor  # int32 [N]: sum_k code[n, k]
    bits: int
    n: int
    k: int
    direct: Optional[torch.Tensor] = None  # int8 codes [N, K] for 8-bit weights: no unpacking in the main loop
    codes: Optional[torch.Tensor] = None  # signed codes [N, K] when the caller has them (saves an unpack)
    interleaved: Optional[torch.Tensor] = None  # int8 [N, Kp / fields] for the nib layouts
    layout: Optional[DeviceLayout] = None  # None: the kernels unpack the artifact planes
    #: low-bit weights: their codes also as plain int8 ``[N, K]`` (:func:`wide_copy`), so a GEMM where the 8-bit main
    #: loop is faster (large M: compute-bound, TMA straight into shared memory) runs that loop on the same integers
    wide: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        # the artifact keeps its exact layout; only this device copy is padded (padding codes meet K-masked or
        # zero-padded activations, so they never reach the accumulator)
        self.planes = [pad_words(p) for p in self.planes]
        self.layout = device_layout(self.bits, self.k)
        if self.layout is None or (self.bits == 8 and self.direct is not None):
            self.codes = None
            return
        codes = self.codes if self.codes is not None else self._codes_from_planes()
        dev = self.planes[0].device
        if self.bits == 8:
            self.direct = codes.to(torch.int8).to(dev).contiguous()
        else:
            self.interleaved = pack_interleaved(codes.to(dev), self.layout)
            if wide_copy(dev, self.n * self.k):
                self.wide = codes.to(torch.int8).to(dev).contiguous()
        self.codes = None  # not kept: the planes and the main-loop copies are all the kernels read
        self._view: Optional[PackedWeight] = None

    def wide_view(self) -> "PackedWeight":
        """The int8 copy as an 8-bit weight (same codes, scales and column sums: the W8 kernels, tiles and tuning
        keys compute exactly the integers of the packed loop)."""
        if self.wide is None:
            raise ValueError("this weight has no int8 copy (P4Q_WIDE_INT8=0, or an 8-bit weight)")
        if getattr(self, "_view", None) is None:
            self._view = PackedWeight([], self.scale, self.colsum, 8, self.n, self.k, direct=self.wide)
        return self._view

    def _codes_from_planes(self) -> torch.Tensor:
        from p4q_engine.artifact.bitpack import unpack_reference

        stored = unpack_reference([p.cpu() for p in self.artifact_planes()], self.bits, self.k)
        return stored.to(torch.int16) - (1 << (self.bits - 1))

    def artifact_planes(self) -> list[torch.Tensor]:
        """The planes without the device padding: exactly the artifact's words."""
        return [p[:, : -(-self.k // (32 // w))] for p, w in zip(self.planes, (x for x in PLANES[self.bits] if x))]

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, bits: int) -> "PackedWeight":
        """Pack signed int8 codes ``[N, K]`` (on any device) with the artifact layout."""
        from p4q_engine.artifact.bitpack import pack_reference

        offset = 1 << (bits - 1)
        stored = (codes.cpu().to(torch.int16) + offset).to(torch.uint8)
        planes = [p.to(codes.device) for p in pack_reference(stored, bits)]
        colsum = codes.to(torch.int32).sum(dim=1).to(torch.int32)
        return cls(
            planes, scale.float().contiguous(), colsum.contiguous(), bits, codes.shape[0], codes.shape[1], codes=codes
        )
