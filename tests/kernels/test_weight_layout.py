"""Device weight layouts (``p4q_engine.kernels.weight_layout``) and the main loops that read them.

The interleaved low-bit layouts are checked three ways: the pack/unpack round trip (every field, K not a multiple
of a group), the kernels' raw int32 accumulator bit-exact against the torch reference for both operand orders and
both kernels on fresh random inputs (poisoned outputs), and a mutation (one corrupted byte) that must fail.
"""

from __future__ import annotations

import pytest
import torch
from p4q_engine.kernels.qgemm import Requant, qgemm, qgemm_reference, tma_eligible
from p4q_engine.kernels.tuning import TileConfig
from p4q_engine.kernels.weight_layout import (
    LAYOUTS,
    NIB_MAX_K,
    SUB_K,
    device_layout,
    pack_interleaved,
    unpack_interleaved,
)

from p4q_engine.quant.ties import assert_codes_equal_or_ties
from tests.kernels.test_qgemm import RAW_SENTINELS, gen, make_acts, make_weight, run_poisoned

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

LOW_BITS = (2, 3, 4)
#: (M, N, K): K below one sub-tile, a partial group, a whole group, several groups; M and N off the tiles.
SHAPES = ((1, 40, 24), (19, 33, 100), (37, 48, 256), (5, 16, 320))
#: Both kernels, both operand orders, tiles small enough for the interpreter.
CONFIGS = (
    TileConfig(32, 32, 64, 4, 4, 1),
    TileConfig(16, 32, 64, 4, 4, 1, swap=True),
    TileConfig(32, 32, 64, 2, 4, 1, "tma"),
    TileConfig(16, 32, 64, 2, 4, 1, "tma", swap=True),
    TileConfig(32, 16, 64, 2, 4, 1, "tma", occupancy=2),  # twice the persistent programs: the tile loop still
)  # covers every tile once


@pytest.mark.parametrize("bits", LOW_BITS)
@pytest.mark.parametrize("k", [1, 63, 64, 130, 256, 1000])
def test_interleaved_round_trip(bits, k):
    lay = LAYOUTS[bits]
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (7, k), generator=gen("rt", bits, k), dtype=torch.int16).to(torch.int8)
    codes[0] = lo
    codes[1] = hi
    packed = pack_interleaved(codes, lay)
    assert packed.dtype == torch.int8 and packed.shape == (7, -(-k // lay.group) * SUB_K)
    assert torch.equal(unpack_interleaved(packed, lay, k), codes)
    # field i of byte j of group g is k = g * G + i * SUB_K + j; the kernel's extraction multiplies it by 2^shift
    b = packed.to(torch.int32)
    for i in range(lay.fields):
        x = b << (8 - lay.lane * (i + 1)) if lay.lane * (i + 1) < 8 else b
        x = (x & -(1 << lay.shift)) if i > 0 else x
        field = ((x + 128) % 256 - 128).view(7, -1, SUB_K)  # the int8 cast's wrap-around
        want = torch.nn.functional.pad(codes.to(torch.int32), (0, packed.shape[1] * lay.fields - k))
        want = want.view(7, -1, lay.fields, SUB_K)[:, :, i]
        assert torch.equal(field, want << lay.shift)


def test_pack_refuses_codes_outside_the_field():
    with pytest.raises(ValueError, match="outside"):
        pack_interleaved(torch.tensor([[8, 0]], dtype=torch.int8), LAYOUTS[4])
    with pytest.raises(ValueError, match="outside"):
        pack_interleaved(torch.tensor([[-3, 0]], dtype=torch.int8), LAYOUTS[2])


def test_layout_choice(monkeypatch):
    assert device_layout(8, 10**6).name == "direct8"
    assert device_layout(3, 768).name == "nib4" and device_layout(2, 768).name == "nib2"
    assert device_layout(4, NIB_MAX_K + 1) is None  # the scaled accumulator could leave int32: planes
    monkeypatch.setenv("P4Q_WEIGHT_LAYOUT", "planes")
    assert device_layout(4, 768) is None and device_layout(8, 768).name == "direct8"


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_both_orders_both_kernels_bit_exact(poison, device, bits, shape):
    """Raw accumulators of every configuration equal the reference; requantized codes equal it up to ties."""
    m, n, k = shape
    g = gen("orders", bits, shape)
    codes, scale, w = make_weight(bits, n, k, g, device)
    a = make_acts(m, k, g, device)
    ref = qgemm_reference(a, 0.01, 3, codes, scale, raw=True)
    bias = torch.randn(n, generator=g).to(device)
    y = qgemm_reference(a, 0.002, 250, codes, scale, bias=bias)
    rq = Requant((y.abs().amax(0) / 100 + 1e-3).to(device), torch.randint(0, 256, (n,), generator=g).to(device), 8)
    ref_q = qgemm_reference(a, 0.002, 250, codes, scale, bias=bias, requant=rq)
    for cfg in CONFIGS:
        (out,) = run_poisoned(poison, RAW_SENTINELS[:1], a=a, a_scale=0.01, a_zp=3, w=w, raw=True, config=cfg)
        assert torch.equal(out, ref), (cfg, tma_eligible(a, w, cfg))
        (out,) = run_poisoned(poison, (-9,), a=a, a_scale=0.002, a_zp=250, w=w, bias=bias, requant=rq, config=cfg)
        assert_codes_equal_or_ties(out, ref_q, y.double() / rq.scale.cpu().double())


@pytest.mark.parametrize("bits", LOW_BITS)
def test_a_corrupted_layout_byte_is_caught(device, bits):
    """Flipping one bit of one interleaved byte changes one code: the bit-exact check must see it."""
    m, n, k = 9, 16, 256
    g = gen("corrupt", bits)
    codes, scale, w = make_weight(bits, n, k, g, device)
    a = make_acts(m, k, g, device)
    a[:, :] = 127  # every activation nonzero after the zero point: any weight change moves the accumulator
    ref = qgemm_reference(a, 0.01, 0, codes, scale, raw=True)
    w.interleaved[3, 40] ^= 1 << (8 - LAYOUTS[bits].lane)  # lowest bit of the top field of byte 40 in row 3
    out = qgemm(a, 0.01, 0, w, raw=True, config=CONFIGS[0]).cpu()
    assert not torch.equal(out, ref) and (out != ref).sum() == m  # exactly column 3 moved, in every row


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_every_gpu_candidate_is_exact(device, bits):
    """Every tile the GPU tuner may pick (both kernels, both orders, two programs per SM) computes the exact
    accumulator: the tuner chooses by speed alone, so each one must be right."""
    from p4q_engine.kernels.tuning import GPU_CANDIDATES

    m, n, k = 70, 40, 256
    g = gen("candidates", bits)
    codes, scale, w = make_weight(bits, n, k, g, device)
    a = make_acts(m, k, g, device)
    ref = qgemm_reference(a, 0.01, 9, codes, scale, raw=True)
    for cfg in GPU_CANDIDATES:
        assert torch.equal(qgemm(a, 0.01, 9, w, raw=True, config=cfg).cpu(), ref), cfg


@pytest.mark.parametrize("lane", [4, 2])
def test_packed_field_arithmetic_matches_the_per_byte_fields(lane):
    """The GPU-only packed unpack (``_field_packed``: ``(word << SH) & mask-per-byte`` on four bytes per register)
    computes every byte's field exactly as ``_field`` does per byte, for every byte value in every position: a
    shift's spill into the next byte is cleared by the mask. (The PTX itself runs only on a GPU:
    ``test_gpu_packed_fields_raw_exact`` in test_qgemm.py.)"""
    import numpy as np

    g = np.random.default_rng(lane)
    words = np.concatenate([np.arange(256, dtype=np.uint32) * 0x01010101, g.integers(0, 2**32, 4096, dtype=np.uint32)])
    hi = (-(1 << (8 - lane))) & 0xFF
    mask = np.uint32(hi * 0x01010101)
    for i in range(8 // lane):
        sh = 8 - lane * (i + 1)
        packed = ((words << np.uint32(sh)) & mask).astype(np.uint32)  # what the PTX computes
        for pos in range(4):
            byte = (words >> np.uint32(8 * pos)) & np.uint32(0xFF)
            want = (byte << np.uint32(sh)) & np.uint32(0xFF)  # _field: the int8 shift drops the bits above
            if i > 0:
                want &= np.uint32(hi)
            assert np.array_equal((packed >> np.uint32(8 * pos)) & np.uint32(0xFF), want), (lane, i, pos)
