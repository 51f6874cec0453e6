"""Bit packing of integer codes into 32-bit words: the layout registry, the C++ packer and its torch reference.

Codes are packed along the last axis (K, the GEMM reduction axis). A ``b``-bit code is split into bit planes of
power-of-two width (:data:`PLANES`); in a plane of width ``w`` code ``k`` sits in word ``k // (32 // w)`` at bit
offset ``(k % (32 // w)) * w``. Signed codes are stored offset by ``2^(b-1)`` (see :func:`to_unsigned`). The C++
extension (``csrc/bitpack.cpp``) is the production path; :func:`pack_reference` / :func:`unpack_reference` are the
pure-torch definitions it is tested against.
"""

from __future__ import annotations

import torch

from p4q_engine.errors import ConfigError
from p4q_engine.quant.spec import QuantSpec, check_bits

try:  # built by setup.py on install
    from p4q_engine import _bitpack  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - only when the package was not installed with its extension
    _bitpack = None

#: Bit-plane widths per code width: each plane width divides 32, so a K tile of 32 codes is whole words in every
#: plane. 3-bit codes = a 2-bit plane (bits 0-1) + a 1-bit plane (bit 2).
PLANES: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}


def planes_for(bits: int) -> tuple[int, ...]:
    return PLANES[check_bits(bits)]


def words_per_row(width: int, k: int) -> int:
    per = 32 // width
    return (k + per - 1) // per


def to_unsigned(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Stored form of codes: ``code + spec.storage_offset`` as uint8 (signed grids are offset by ``2^(b-1)``)."""
    return (codes.to(torch.int16) + spec.storage_offset).to(torch.uint8)


def from_unsigned(stored: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Inverse of :func:`to_unsigned`: int8 for signed specs, uint8 for unsigned ones."""
    v = stored.to(torch.int16) - spec.storage_offset
    return v.to(torch.int8 if spec.signed else torch.uint8)


def _check_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if codes.dim() != 2:
        raise ConfigError(f"pack expects a 2-D [rows, K] tensor, got shape {tuple(codes.shape)}")
    if codes.dtype != torch.uint8:
        raise ConfigError(f"pack expects uint8 stored codes, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ConfigError(f"code {int(codes.max())} does not fit in {bits} bits")
    return codes.contiguous()


def _check_planes(planes: list[torch.Tensor], bits: int, widths: tuple[int, ...]) -> None:
    if len(planes) != len(widths):
        raise ConfigError(f"{bits}-bit codes need {len(widths)} planes, got {len(planes)}")
    if any(p.dim() != 2 for p in planes):
        raise ConfigError(f"packed planes must be 2-D [rows, words], got shapes {[tuple(p.shape) for p in planes]}")


def pack_reference(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Torch definition of the packed layout: one int32 ``[rows, words]`` tensor per plane."""
    codes = _check_codes(codes, bits)
    rows, k = codes.shape
    out, shift = [], 0
    for w in planes_for(bits):
        per = 32 // w
        nw = words_per_row(w, k)
        plane = torch.zeros(rows, nw * per, dtype=torch.int64)
        plane[:, :k] = (codes.to(torch.int64) >> shift) & ((1 << w) - 1)
        offsets = torch.arange(per, dtype=torch.int64) * w
        words = (plane.view(rows, nw, per) << offsets).sum(dim=-1)
        out.append(torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32))
        shift += w
    return out


def unpack_reference(planes: list[torch.Tensor], bits: int, k: int) -> torch.Tensor:
    """Torch inverse of :func:`pack_reference`: uint8 codes ``[rows, k]``."""
    widths = planes_for(bits)
    _check_planes(planes, bits, widths)
    rows = planes[0].shape[0]
    codes = torch.zeros(rows, k, dtype=torch.int64)
    shift = 0
    for plane, w in zip(planes, widths):
        per = 32 // w
        if tuple(plane.shape) != (rows, words_per_row(w, k)):
            raise ConfigError(f"packed plane has shape {tuple(plane.shape)}, expected {(rows, words_per_row(w, k))}")
        words = plane.to(torch.int64) & 0xFFFFFFFF
        offsets = torch.arange(per, dtype=torch.int64) * w
        vals = ((words[:, :, None] >> offsets) & ((1 << w) - 1)).reshape(rows, -1)[:, :k]
        codes |= vals << shift
        shift += w
    return codes.to(torch.uint8)


def have_extension() -> bool:
    return _bitpack is not None


def pack(codes: torch.Tensor, bits: int, threads: int = 0) -> list[torch.Tensor]:
    """Pack uint8 stored codes ``[rows, K]`` with the C++ extension (torch reference if it is missing)."""
    codes = _check_codes(codes, bits)
    if _bitpack is None:
        return pack_reference(codes, bits)
    arrays = _bitpack.pack_planes(codes.cpu().numpy(), list(planes_for(bits)), threads)
    return [torch.from_numpy(a) for a in arrays]


def unpack(planes: list[torch.Tensor], bits: int, k: int, threads: int = 0) -> torch.Tensor:
    """Unpack planes to uint8 stored codes ``[rows, k]`` with the C++ extension."""
    widths = planes_for(bits)
    if _bitpack is None:
        return unpack_reference(planes, bits, k)
    _check_planes(planes, bits, widths)
    try:
        out = _bitpack.unpack_planes([p.cpu().contiguous().numpy() for p in planes], list(widths), k, threads)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return torch.from_numpy(out)
