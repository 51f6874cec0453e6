"""Bit packing: the C++ extension against the torch reference, the packed layout by hand, and every rejection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p4q_engine.artifact import bitpack
from p4q_engine.artifact.bitpack import (
    from_unsigned,
    pack,
    pack_reference,
    planes_for,
    to_unsigned,
    unpack,
    unpack_reference,
    words_per_row,
)
from p4q_engine.errors import ConfigError
from p4q_engine.quant.spec import QuantSpec

ext = bitpack._bitpack
needs_ext = pytest.mark.skipif(ext is None, reason="C++ extension not built")

BITS = (2, 3, 4, 8)
KS = (1, 5, 15, 16, 17, 31, 32, 33, 100, 1001)
ROWS = (1, 3, 8)


def random_codes(rows: int, k: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7919 + rows * 131 + k * 17 + bits)
    return torch.randint(0, 1 << bits, (rows, k), generator=g, dtype=torch.int64).to(torch.uint8)


def test_extension_is_built():
    assert bitpack.have_extension(), "p4q_engine._bitpack missing: run `python setup.py build_ext --inplace`"


@needs_ext
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", KS)
def test_cpp_pack_matches_reference_and_roundtrips(bits, k):
    widths = planes_for(bits)
    for rows in ROWS:
        codes = random_codes(rows, k, bits)
        cpp, ref = pack(codes, bits), pack_reference(codes, bits)
        assert len(cpp) == len(ref) == len(widths)
        for w, c, r in zip(widths, cpp, ref):
            assert c.dtype == r.dtype == torch.int32
            assert tuple(c.shape) == tuple(r.shape) == (rows, words_per_row(w, k))
            assert torch.equal(c, r), f"bits={bits} k={k} rows={rows} plane width {w}"
        assert torch.equal(unpack(cpp, bits, k), codes)
        assert torch.equal(unpack_reference(ref, bits, k), codes)
        # cross: each side unpacks the other's planes
        assert torch.equal(unpack(ref, bits, k), codes)
        assert torch.equal(unpack_reference(cpp, bits, k), codes)


@needs_ext
@pytest.mark.parametrize("bits", BITS)
def test_extreme_codes_roundtrip(bits):
    """All-zero and all-max rows (every bit set: the sign bit of each int32 word is exercised)."""
    top = (1 << bits) - 1
    codes = torch.tensor([[0] * 70, [top] * 70, [top, 0] * 35], dtype=torch.uint8)
    planes = pack(codes, bits)
    assert all(torch.equal(a, b) for a, b in zip(planes, pack_reference(codes, bits)))
    assert torch.equal(unpack(planes, bits, 70), codes)
    if bits in (2, 4, 8):  # one plane holding every bit: full words are -1 (0xFFFFFFFF)
        assert int(planes[0][1, 0]) == -1


@needs_ext
@pytest.mark.parametrize("bits", BITS)
def test_thread_count_does_not_change_the_result(bits):
    codes = random_codes(37, 1001, bits, seed=3)  # rows not divisible by the thread count
    one = pack(codes, bits, threads=1)
    for threads in (2, 4, 64, 0):
        many = pack(codes, bits, threads=threads)
        assert all(torch.equal(a, b) for a, b in zip(one, many)), threads
        assert torch.equal(unpack(many, bits, 1001, threads=threads), unpack(one, bits, 1001, threads=1))
    # raw extension: same arrays
    raw1 = ext.pack_planes(codes.numpy(), list(planes_for(bits)), 1)
    raw4 = ext.pack_planes(codes.numpy(), list(planes_for(bits)), 4)
    assert all(np.array_equal(a, b) for a, b in zip(raw1, raw4))


# ------------------------------------------------------------------ hand-computed layouts
def test_4bit_word_by_hand():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    expected = 0x87654321 - (1 << 32)  # as int32: code k at bits 4k..4k+3, little-endian along K
    for planes in (pack(codes, 4), pack_reference(codes, 4)):
        assert len(planes) == 1 and planes[0].shape == (1, 1)
        assert int(planes[0][0, 0]) == expected
    assert torch.equal(unpack([torch.tensor([[expected]], dtype=torch.int32)], 4, 8), codes)


def test_4bit_partial_word_by_hand():
    # 9 codes: one full word plus one word holding only code 8 in its low nibble
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 0xF]], dtype=torch.uint8)
    planes = pack(codes, 4)
    assert planes[0].tolist() == [[0x87654321 - (1 << 32), 0xF]]


def test_3bit_planes_by_hand():
    codes = torch.tensor([[5, 3, 7, 0, 6]], dtype=torch.uint8)  # binary 101 011 111 000 110
    # plane 0 (2-bit, bits 0-1): low bits 01 11 11 00 10 at offsets 0,2,4,6,8
    low = 0b01 | 0b11 << 2 | 0b11 << 4 | 0b00 << 6 | 0b10 << 8
    # plane 1 (1-bit, bit 2): high bits 1 0 1 0 1 at offsets 0..4
    high = 0b1 | 0b0 << 1 | 0b1 << 2 | 0b0 << 3 | 0b1 << 4
    assert low == 0x23D and high == 0x15
    for planes in (pack(codes, 3), pack_reference(codes, 3)):
        assert [p.tolist() for p in planes] == [[[low]], [[high]]]
    assert torch.equal(
        unpack([torch.tensor([[low]], dtype=torch.int32), torch.tensor([[high]], dtype=torch.int32)], 3, 5), codes
    )


def test_3bit_word_boundaries():
    # 2-bit plane: 16 codes per word; 1-bit plane: 32 per word -> K=33 needs 3 and 2 words
    codes = torch.full((1, 33), 7, dtype=torch.uint8)
    p0, p1 = pack(codes, 3)
    assert p0.tolist() == [[-1, -1, 0b11]]
    assert p1.tolist() == [[-1, 0b1]]


def test_2bit_and_8bit_by_hand():
    assert pack(torch.tensor([[3, 0, 1, 2]], dtype=torch.uint8), 2)[0].tolist() == [[0b10_01_00_11]]
    assert pack(torch.tensor([[0x01, 0x02, 0x03, 0xFF, 0x7F]], dtype=torch.uint8), 8)[0].tolist() == [
        [0xFF030201 - (1 << 32), 0x7F]
    ]


def test_plane_registry():
    assert {b: planes_for(b) for b in BITS} == {2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}
    assert words_per_row(1, 32) == 1 and words_per_row(1, 33) == 2 and words_per_row(8, 5) == 2
    with pytest.raises(ConfigError):
        planes_for(5)


# ------------------------------------------------------------------ empty edges
@pytest.mark.parametrize("bits", BITS)
def test_empty_k(bits):
    codes = torch.zeros(4, 0, dtype=torch.uint8)
    for planes in (pack(codes, bits), pack_reference(codes, bits)):
        assert [tuple(p.shape) for p in planes] == [(4, 0)] * len(planes_for(bits))
        assert unpack(planes, bits, 0).shape == (4, 0)
        assert unpack_reference(planes, bits, 0).shape == (4, 0)


@pytest.mark.parametrize("bits", BITS)
def test_zero_rows(bits):
    codes = torch.zeros(0, 17, dtype=torch.uint8)
    planes = pack(codes, bits)
    assert all(torch.equal(a, b) for a, b in zip(planes, pack_reference(codes, bits)))
    assert unpack(planes, bits, 17).shape == (0, 17)


# ------------------------------------------------------------------ rejections
@pytest.mark.parametrize("bits", BITS[:-1])
def test_code_too_large_rejected(bits):
    codes = torch.zeros(2, 40, dtype=torch.uint8)
    codes[1, 33] = 1 << bits
    for fn in (pack, pack_reference):
        with pytest.raises(ConfigError, match=f"does not fit in {bits} bits"):
            fn(codes, bits)
    if ext is not None:  # the extension checks on its own too (it is callable directly)
        with pytest.raises(ValueError, match=f"does not fit in {bits} bits"):
            ext.pack_planes(codes.numpy(), list(planes_for(bits)), 0)


def test_bad_input_tensors_rejected():
    with pytest.raises(ConfigError, match="2-D"):
        pack(torch.zeros(8, dtype=torch.uint8), 4)
    with pytest.raises(ConfigError, match="uint8"):
        pack(torch.zeros(2, 8, dtype=torch.int8), 4)
    with pytest.raises(ConfigError):
        pack(torch.zeros(2, 8, dtype=torch.uint8), 5)


@needs_ext
def test_raw_extension_rejects_bad_widths():
    codes = np.zeros((2, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="plane width"):
        ext.pack_planes(codes, [3], 0)
    with pytest.raises(ValueError, match="add up"):
        ext.pack_planes(codes, [8, 4], 0)
    with pytest.raises(ValueError, match="2-D"):
        ext.pack_planes(np.zeros(8, dtype=np.uint8), [4], 0)
    with pytest.raises(ValueError, match="one packed array per plane"):
        ext.unpack_planes([np.zeros((2, 1), dtype=np.int32)], [2, 1], 8, 0)
    with pytest.raises(ValueError, match="non-negative"):
        ext.unpack_planes([np.zeros((2, 1), dtype=np.int32)], [4], -1, 0)


@pytest.mark.parametrize("unpacker", [unpack, unpack_reference], ids=["cpp", "reference"])
def test_wrong_plane_count_rejected(unpacker):
    codes = random_codes(3, 40, 3)
    planes = pack(codes, 3)
    with pytest.raises(ConfigError, match="need 2 planes"):
        unpacker(planes[:1], 3, 40)
    with pytest.raises(ConfigError, match="need 1 planes"):
        unpacker(planes, 4, 40)


@pytest.mark.parametrize("unpacker", [unpack, unpack_reference], ids=["cpp", "reference"])
def test_wrong_plane_shape_rejected(unpacker):
    codes = random_codes(3, 40, 4)
    (plane,) = pack(codes, 4)  # [3, 5]
    for bad, k in ((plane[:, :4], 40), (plane, 48), (plane, 32), (torch.cat([plane, plane], 1), 40)):
        with pytest.raises(ConfigError):
            unpacker([bad], 4, k)
    p0, p1 = pack(random_codes(3, 40, 3), 3)
    with pytest.raises(ConfigError):  # second plane has fewer rows than the first
        unpacker([p0, p1[:2]], 3, 40)
    with pytest.raises(ConfigError):  # planes swapped: each has the other's word count
        unpacker([p1, p0], 3, 40)


def test_non_2d_plane_rejected():
    with pytest.raises(ConfigError):
        unpack([torch.tensor(3, dtype=torch.int32)], 4, 8)
    with pytest.raises(ConfigError):
        unpack([torch.zeros(1, 1, 1, dtype=torch.int32)], 4, 8)


# ------------------------------------------------------------------ stored (unsigned) form of codes
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_to_from_unsigned_roundtrip(bits, signed):
    spec = QuantSpec(bits, signed=signed)
    codes = torch.arange(spec.qmin, spec.qmax + 1).to(torch.int8 if signed else torch.uint8)
    stored = to_unsigned(codes, spec)
    assert stored.dtype == torch.uint8
    assert stored.tolist() == list(range(1 << bits))  # offset by -qmin: 0 .. 2^b - 1, fits the packer
    back = from_unsigned(stored, spec)
    assert back.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(back, codes)
    # and through the packer
    rows = stored.repeat(3, 1)
    assert torch.equal(from_unsigned(unpack(pack(rows, bits), bits, rows.shape[1]), spec), codes.repeat(3, 1))
