"""Packed low-bit GEMM (``p4q_engine.kernels.qgemm``) against its torch definition ``qgemm_reference``.

Every case draws fresh random inputs from a generator seeded by the case's parameters, and runs the kernel with its
output allocation *poisoned* (``torch.empty`` inside the qgemm module returns a sentinel-filled, padded,
non-contiguous view), so an element the kernel forgets to write, or a write outside the output, fails the test.

Tolerances (stated once, used below):

* raw int32 accumulator: bit-exact, interpreter and GPU alike (integer arithmetic);
* float epilogue (bias, GELU, QuickGELU, residual): ``rtol=1e-5, atol=1e-4`` (fp32 transcendental ulps);
* requantized codes: equal, or one step apart where the reference's pre-rounding value ``y / s`` lies within
  ``TIE_EPS`` code units of a ``.5`` boundary (a float tie, ``p4q_engine.quant.ties``): ``erf``/``exp`` of the
  interpreter's numpy, of the GPU and of torch may differ by an ulp. Anything else fails, interpreter and GPU alike.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import triton
from p4q_engine.kernels import qgemm as qgemm_mod
from p4q_engine.kernels.qgemm import PackedWeight, Requant, qgemm, qgemm_reference, tma_eligible
from p4q_engine.kernels.tuning import GPU_CANDIDATES, TileConfig
from p4q_engine.kernels.weight_layout import LAYOUTS, unpack_interleaved

from p4q_engine.quant.ties import assert_codes_equal_or_ties

HAS_CUDA = torch.cuda.is_available()
#: QuickGELU's sigmoid overflows exp() for very negative inputs in the numpy interpreter (correctly giving 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

BITS = (2, 3, 4, 8)
#: (M, N, K): M not a multiple of the 32-row tile (1, 37, 50, 17, 5), N not a multiple of 32 (48, 72, 40, 33),
#: K a partial tile / partial word (100, 72, 160, 24, 8 < one 2-bit word), all with M*N*K <= ~200k.
SHAPES = ((1, 72, 100), (37, 48, 100), (50, 48, 72), (17, 40, 160), (5, 33, 24), (3, 16, 8))
FLOAT_TOL = dict(rtol=1e-5, atol=1e-4)
RAW_SENTINELS = (-123456789, 987654321)


def gen(*key) -> torch.Generator:
    """A generator seeded by the test's parameters: fresh, reproducible inputs per case."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_weight(
    bits: int, n: int, k: int, g: torch.Generator, device: str
) -> tuple[torch.Tensor, torch.Tensor, PackedWeight]:
    """Signed codes over the whole stored range ``[-2^(b-1), 2^(b-1))``, first row at the minimum and second at the
    maximum (worst-case accumulator magnitude), per-channel scales, and their packed form."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int16)
    codes[0] = lo
    if n > 1:
        codes[1] = hi
    codes = codes.to(torch.int8)
    scale = (torch.rand(n, generator=g) * 0.02 + 0.001) / (1 << (bits - 1))
    return codes, scale, PackedWeight.from_codes(codes.to(device), scale.to(device), bits)


def make_acts(m: int, k: int, g: torch.Generator, device: str, a_bits: int = 8) -> torch.Tensor:
    """Shifted int8 codes of unsigned ``a_bits``-bit activations spanning the full range; row 0 all zeros and the
    last row all ``2^a_bits - 1`` (the extremes)."""
    qmax = (1 << a_bits) - 1
    u = torch.randint(0, qmax + 1, (m, k), generator=g, dtype=torch.int32)
    u[0] = 0
    if m > 1:
        u[-1] = qmax
    return (u - 128).to(torch.int8).to(device)


def run_poisoned(poison, sentinels, **kwargs) -> list[torch.Tensor]:
    """Run ``qgemm`` once per sentinel with a poisoned, padded output; check nothing was written outside it."""
    outs = []
    for s in sentinels:
        with poison(qgemm_mod, s, pad=3) as alloc:
            out = qgemm(**kwargs)
        alloc.assert_padding_untouched()
        outs.append(out.cpu())
    return outs


def assert_codes_match(out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor, rq: Requant) -> None:
    """``out`` equals the reference codes ``ref`` up to float ties of ``y / s`` (``y``: the reference's float
    epilogue output before requantization)."""
    assert_codes_equal_or_ties(out.cpu(), ref, y.double() / rq.scale.cpu().double())


# ---------------------------------------------------------------------------------------------- raw accumulator
#: Activation sites: (bits, zero point). 8-bit with zero points at both extremes and the middle; a 4-bit site.
A_SITES = ((8, 0), (8, 128), (8, 255), (8, 37), (4, 0), (4, 15))


#: Every width with each main loop it has: low-bit weights from the interleaved device layout (default) and from the
#: artifact's planes (``P4Q_WEIGHT_LAYOUT=planes``); 8-bit weights always from plain int8 (their plane path:
#: test_8bit_packed_planes_path).
BITS_LAYOUTS = [(b, lay) for b in BITS for lay in (("nib", "planes") if b < 8 else ("direct",))]


def use_layout(monkeypatch, layout: str) -> None:
    monkeypatch.setenv("P4Q_WEIGHT_LAYOUT", "planes" if layout == "planes" else "nib")


@pytest.mark.parametrize("bits,layout", BITS_LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_raw_accumulator_bit_exact(poison, device, monkeypatch, bits, layout, shape):
    """The int32 accumulator equals the exact integer ``sum (a_u - zp) * code`` for every activation site. The
    sentinel is beyond any reachable accumulator (|acc| <= 160 * 255 * 128 here), so one run detects every
    unwritten element."""
    use_layout(monkeypatch, layout)
    m, n, k = shape
    for a_bits, a_zp in A_SITES:
        g = gen("raw", bits, shape, a_bits, a_zp)
        codes, scale, w = make_weight(bits, n, k, g, device)
        a = make_acts(m, k, g, device, a_bits)
        ref = qgemm_reference(a, 0.01, a_zp, codes, scale, raw=True)
        (out,) = run_poisoned(poison, RAW_SENTINELS[:1], a=a, a_scale=0.01, a_zp=a_zp, w=w, raw=True)
        assert out.dtype == torch.int32 and out.shape == (m, n)
        assert torch.equal(out, ref), f"a_bits={a_bits} a_zp={a_zp}: {(out != ref).sum()} elements differ"


def test_packed_weight_layout_matches_artifact_packer():
    """``PackedWeight.from_codes`` packs exactly what the artifact stores (the C++ packer / torch reference)."""
    from p4q_engine.artifact.bitpack import pack, unpack_reference

    g = gen("layout")
    for bits in BITS:
        codes, scale, w = make_weight(bits, 9, 100, g, "cpu")
        stored = (codes.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
        assert all(torch.equal(p, q) for p, q in zip(w.artifact_planes(), pack(stored, bits)))
        assert torch.equal(unpack_reference(w.artifact_planes(), bits, 100), stored)
        for p, q in zip(w.planes, pack(stored, bits)):  # device copy: rows padded with zero words to 16 bytes
            assert p.shape[1] % 4 == 0 and p.shape[1] - q.shape[1] < 4 and not p[:, q.shape[1] :].any()
        assert torch.equal(w.colsum, codes.to(torch.int32).sum(1))
        assert (w.direct is not None) == (bits == 8)
        assert (w.interleaved is not None) == (bits < 8)
        if bits < 8:
            assert torch.equal(unpack_interleaved(w.interleaved, LAYOUTS[bits], 100), codes)
        if bits == 8:
            assert torch.equal(w.direct, codes)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_8bit_packed_planes_path(poison, device, shape):
    """8-bit weights normally take the direct int8 path (``PackedWeight.direct``); the packed-plane path for 8 bits
    (``direct=None``) must give the same accumulator."""
    m, n, k = shape
    g = gen("8-packed", shape)
    codes, scale, w = make_weight(8, n, k, g, device)
    assert w.direct is not None and torch.equal(w.direct.cpu(), codes)
    w.direct = None
    a = make_acts(m, k, g, device)
    ref = qgemm_reference(a, 0.01, 201, codes, scale, raw=True)
    (out,) = run_poisoned(poison, RAW_SENTINELS[:1], a=a, a_scale=0.01, a_zp=201, w=w, raw=True)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------------- float epilogue
EPILOGUES = [
    dict(),
    dict(bias=True),
    dict(bias=True, act="gelu"),
    dict(bias=True, act="quick_gelu"),
    dict(residual=True),
    dict(bias=True, act="gelu", residual=True),
    dict(act="quick_gelu", residual=True),
]


def _epilogue_args(ep: dict, m: int, n: int, g: torch.Generator, device: str) -> dict:
    args = {"act": ep.get("act", "none")}
    args["bias"] = (torch.randn(n, generator=g) * 0.5).to(device) if ep.get("bias") else None
    args["residual"] = (torch.randn(m, n, generator=g) * 2).to(device) if ep.get("residual") else None
    return args


def _a_scale_for(a, a_zp, codes, scale) -> float:
    """An activation scale that puts typical outputs around 1.5 (where GELU and QuickGELU are far from linear)."""
    acc = qgemm_reference(a, 1.0, a_zp, codes, scale, raw=True).float() * scale
    return float(1.5 / acc.abs().mean().clamp_min(1e-6))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "case", range(len(EPILOGUES)), ids=[("-".join(f"{k}={v}" for k, v in e.items()) or "plain") for e in EPILOGUES]
)
def test_float_epilogue(poison, device, bits, case):
    """Each (bits, epilogue) runs on one of the odd shapes, cycling, so every bit width sees every shape."""
    ep = EPILOGUES[case]
    m, n, k = SHAPES[(case + bits) % 4]
    g = gen("float", bits, case)
    codes, scale, w = make_weight(bits, n, k, g, device)
    a_zp = (0, 128, 255, 61)[case % 4]
    a = make_acts(m, k, g, device)
    a_scale = _a_scale_for(a, a_zp, codes, scale)
    args = _epilogue_args(ep, m, n, g, device)
    ref = qgemm_reference(a, a_scale, a_zp, codes, scale, **args)
    (out,) = run_poisoned(poison, (float("nan"),), a=a, a_scale=a_scale, a_zp=a_zp, w=w, **args)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    torch.testing.assert_close(out, ref, **FLOAT_TOL)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_half_output(poison, device, out_dtype):
    m, n, k = 37, 48, 100
    g = gen("half", str(out_dtype))
    codes, scale, w = make_weight(4, n, k, g, device)
    a = make_acts(m, k, g, device)
    bias = torch.randn(n, generator=g).to(device)
    ref = qgemm_reference(a, 0.02, 99, codes, scale, bias=bias, act="gelu").to(out_dtype)
    (out,) = run_poisoned(
        poison, (float("nan"),), a=a, a_scale=0.02, a_zp=99, w=w, bias=bias, act="gelu", out_dtype=out_dtype
    )
    assert out.dtype == out_dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------- requantization
def _requant_for(ref_float: torch.Tensor, g: torch.Generator, bits: int, device: str) -> Requant:
    """Per-column output sites chosen so the codes use the whole grid and clamp at both ends on some columns."""
    n = ref_float.shape[1]
    qmax = (1 << bits) - 1
    # a column whose values are all ~0 (GELU's negative tail) still gets a step of at least 1% of the tensor's range:
    # a real site's step is never ~1e-5 of its tensor's values, where float32 noise of ~1e-6 (the GPU's erf vs
    # torch's, seen on an H200) would move values by hundredths of a code and no tolerance in code units could hold
    spread = ref_float.abs().amax(dim=0).clamp_min(0.01 * float(ref_float.abs().max()) + 1e-3)
    scale = spread * 1.5 / qmax * (0.3 + torch.rand(n, generator=g))  # some columns saturate, some do not
    zp = torch.randint(0, qmax + 1, (n,), generator=g, dtype=torch.int32)
    zp[0], zp[-1] = 0, qmax  # extreme zero points
    return Requant(scale.float().to(device), zp.to(device), bits)


REQUANT_EPILOGUES = [
    dict(bias=True),
    dict(bias=True, act="gelu"),
    dict(bias=True, act="quick_gelu"),
    dict(residual=True),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("out_bits", [8, 4])
@pytest.mark.parametrize(
    "case", range(len(REQUANT_EPILOGUES)), ids=["-".join(f"{k}={v}" for k, v in e.items()) for e in REQUANT_EPILOGUES]
)
def test_requant_codes(poison, device, bits, out_bits, case):
    """Requantization to per-column output sites (extreme zero points 0 and 2^b - 1 on the first and last column),
    8-bit and 4-bit. A 4-bit site's codes are ``[0, 15]``, so its sentinel (77 -> u = 205) can never be a result;
    8-bit results can be any code, so they run with two different sentinels."""
    ep = REQUANT_EPILOGUES[case]
    m, n, k = SHAPES[(case + bits + out_bits) % 4]
    g = gen("requant", bits, out_bits, case)
    codes, scale, w = make_weight(bits, n, k, g, device)
    a_zp = (0, 128, 255)[(case + bits) % 3]
    a = make_acts(m, k, g, device)
    a_scale = _a_scale_for(a, a_zp, codes, scale)
    args = _epilogue_args(ep, m, n, g, device)
    y = qgemm_reference(a, a_scale, a_zp, codes, scale, **args)
    rq = _requant_for(y, g, out_bits, device)
    ref = qgemm_reference(a, a_scale, a_zp, codes, scale, requant=rq, **args)
    u = ref.to(torch.int32) + 128
    if m > 1:  # the grid is used end to end
        assert int(u.min()) == 0 and int(u.max()) == (1 << out_bits) - 1
    sentinels = (77, -5) if out_bits == 8 else (77,)
    for out in run_poisoned(poison, sentinels, a=a, a_scale=a_scale, a_zp=a_zp, w=w, requant=rq, **args):
        assert out.dtype == torch.int8 and out.shape == (m, n)
        uo = out.to(torch.int32) + 128
        assert int(uo.min()) >= 0 and int(uo.max()) <= (1 << out_bits) - 1
        assert_codes_match(out, ref, y, rq)


def test_requant_exact_half_steps(poison, device):
    """Values exactly on a half step round half to even (``kernels/rounding.py``: the magic-number round has no
    ``floor``), where the reference rounds half up: a one-step difference at boundary distance 0, a float tie by the
    tie rule, and nowhere else. With an activation scale of 1, weight scales of 0.5 and an output scale of 1 every
    product is exact and ``y = acc / 2`` lands on half steps whenever ``acc`` is odd."""
    m, n, k = 4, 16, 32
    codes = torch.zeros(n, k, dtype=torch.int8)
    codes[:, 0] = torch.arange(-8, 8, dtype=torch.int8)  # acc = (a_u - zp) * code: one term
    scale = torch.full((n,), 0.5)
    w = PackedWeight.from_codes(codes.to(device), scale.to(device), 8)
    u = torch.full((m, k), 128, dtype=torch.int32)
    u[:, 0] = torch.tensor([129, 127, 131, 125])  # a_u - zp = +1, -1, +3, -3 with zp = 128
    a = (u - 128).to(torch.int8).to(device)
    rq = Requant(torch.ones(n, device=device), torch.full((n,), 128, dtype=torch.int32, device=device), 8)
    y = qgemm_reference(a, 1.0, 128, codes, scale)
    half = (y - y.floor()) == 0.5
    assert half.sum() > 10 and (~half).sum() > 10
    ref = qgemm_reference(a, 1.0, 128, codes, scale, requant=rq)
    assert torch.equal(ref.to(torch.int32), torch.floor(y + 0.5).to(torch.int32))  # the reference: half up
    even = torch.round(y).to(torch.int32)  # torch.round: half to even
    for out in run_poisoned(poison, (3, -7), a=a, a_scale=1.0, a_zp=128, w=w, requant=rq):
        assert torch.equal(out.cpu().to(torch.int32), even)
        assert int((out.cpu() != ref)[~half].sum()) == 0
        assert_codes_equal_or_ties(out.cpu(), ref, y + 128)  # every difference is a tie


# ---------------------------------------------------------------------------------------------- TMA kernel
#: Shapes the persistent TMA kernel can take (K a multiple of 16 bytes) with M, N off the tile and K a partial tile.
TMA_SHAPES = ((17, 40, 160), (70, 40, 256), (1, 33, 128), (45, 72, 48))
#: 32 x 32 tiles so the persistent loop walks several tiles per program; BLOCK_K 128 so every plane qualifies.
TMA_CONFIG = TileConfig(32, 32, 128, 2, 4, 1, "tma")


@pytest.mark.parametrize("bits,layout", BITS_LAYOUTS)
@pytest.mark.parametrize("shape", TMA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tma_kernel_raw_and_requant(poison, device, monkeypatch, bits, layout, shape):
    """The persistent TMA kernel (out-of-bounds tiles read as zero, no masks in the main loop) gives the same
    accumulator and requantized codes as the reference."""
    use_layout(monkeypatch, layout)
    m, n, k = shape
    g = gen("tma", bits, shape)
    codes, scale, w = make_weight(bits, n, k, g, device)
    a = make_acts(m, k, g, device)
    assert tma_eligible(a, w, TMA_CONFIG)
    ref = qgemm_reference(a, 0.01, 77, codes, scale, raw=True)
    (out,) = run_poisoned(poison, RAW_SENTINELS[:1], a=a, a_scale=0.01, a_zp=77, w=w, raw=True, config=TMA_CONFIG)
    assert torch.equal(out, ref)
    a_scale = _a_scale_for(a, 200, codes, scale)
    args = _epilogue_args(dict(bias=True, residual=True), m, n, g, device)  # no erf: exact on the interpreter
    y = qgemm_reference(a, a_scale, 200, codes, scale, **args)
    rq = _requant_for(y, g, 8, device)
    ref = qgemm_reference(a, a_scale, 200, codes, scale, requant=rq, **args)
    for out in run_poisoned(
        poison, (77, -5), a=a, a_scale=a_scale, a_zp=200, w=w, requant=rq, config=TMA_CONFIG, **args
    ):
        assert_codes_match(out, ref, y, rq)


def test_tma_ineligible_falls_back_to_pointer_kernel(poison, device, monkeypatch):
    """K = 100 int8 rows are not 16-byte aligned for TMA, and a 1-bit plane with BLOCK_K 64 is an 8-byte box: a
    "tma" configuration then runs the pointer kernel with the same tiles, and the result is still exact."""
    monkeypatch.setenv("P4Q_WEIGHT_LAYOUT", "planes")
    g = gen("tma-fallback")
    codes, scale, w = make_weight(4, 48, 100, g, device)
    a = make_acts(37, 100, g, device)
    assert not tma_eligible(a, w, TMA_CONFIG)
    (out,) = run_poisoned(poison, RAW_SENTINELS[:1], a=a, a_scale=0.01, a_zp=5, w=w, raw=True, config=TMA_CONFIG)
    assert torch.equal(out, qgemm_reference(a, 0.01, 5, codes, scale, raw=True))
    codes3, _, w3 = make_weight(3, 48, 128, g, device)
    assert not tma_eligible(make_acts(4, 128, g, device), w3, TileConfig(32, 32, 64, 2, 4, 1, "tma"))
    assert tma_eligible(make_acts(4, 128, g, device), w3, TMA_CONFIG)


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise(device):
    g = gen("errors")
    _, _, w = make_weight(4, 16, 40, g, device)
    a = make_acts(3, 40, g, device)
    with pytest.raises(ValueError):
        qgemm(a.to(torch.uint8), 0.1, 0, w)
    with pytest.raises(ValueError):
        qgemm(a.to(torch.int32), 0.1, 0, w)
    with pytest.raises(ValueError):
        qgemm(a.float(), 0.1, 0, w)
    with pytest.raises(ValueError):
        qgemm(make_acts(3, 41, g, device), 0.1, 0, w)  # wrong K
    with pytest.raises(ValueError):
        qgemm(a[:, :32].contiguous(), 0.1, 0, w)  # wrong K (shorter)
    with pytest.raises(ValueError):
        qgemm(a.view(1, 3, 40), 0.1, 0, w)  # not 2-D
    with pytest.raises(ValueError):
        qgemm(a, 0.1, 0, w, residual=torch.zeros(3, 15, device=device))  # residual shape


# ---------------------------------------------------------------------------------------------- GPU, full shapes
VIT_B32 = [
    (51200, 2304, 768),
    (51200, 768, 768),
    (51200, 3072, 768),
    (51200, 768, 3072),
    (50, 2304, 768),
    (50, 768, 768),
    (50, 3072, 768),
    (50, 768, 3072),
]


def gpu_raw_reference(a: torch.Tensor, a_zp: int, codes: torch.Tensor) -> torch.Tensor:
    """The exact accumulator on the GPU: float64 products and sums of integers (|acc| < 2^31 << 2^53 for these
    shapes, so every partial sum is exact)."""
    return ((a.to(torch.float64) + (128 - a_zp)) @ codes.to(torch.float64).t()).to(torch.int64)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", VIT_B32, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_full_shape_raw_exact(bits, shape):
    m, n, k = shape
    g = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(("gpu", bits, shape)).encode()))
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (n, k), generator=g, device="cuda", dtype=torch.int16).to(torch.int8)
    codes[0] = lo
    codes[1] = hi
    scale = torch.rand(n, generator=g, device="cuda") * 0.01 + 1e-3
    w = PackedWeight.from_codes(codes, scale, bits)
    a = torch.randint(-128, 128, (m, k), generator=g, device="cuda", dtype=torch.int16).to(torch.int8)
    a[0] = -128
    a[-1] = 127
    ref = {a_zp: gpu_raw_reference(a, a_zp, codes) for a_zp in (0, 255)}
    for a_zp in (0, 255):
        out = qgemm(a, 0.01, a_zp, w, raw=True)  # the autotuned configuration
        torch.cuda.synchronize()
        assert torch.equal(out.to(torch.int64), ref[a_zp])
    for cfg in [c for c in GPU_CANDIDATES if c.kernel == "tma" and c.block_m <= max(64, m)]:  # each TMA candidate
        try:
            out = qgemm(a, 0.01, 255, w, raw=True, config=cfg)
        except triton.runtime.errors.OutOfResources:  # too much shared memory for this epilogue: the autotuner
            continue  # skips such a candidate too
        torch.cuda.synchronize()
        assert torch.equal(out.to(torch.int64), ref[255]), cfg


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(50, 2304, 768), (51200, 768, 3072)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_packed_fields_raw_exact(monkeypatch, bits, shape):
    """``P4Q_NIB_PACKED=1``: the interleaved low-bit fields unpacked four bytes per register by inline PTX give the
    exact accumulator, with the tuned tile, every TMA candidate and a pointer-kernel tile of each orientation."""
    monkeypatch.setenv("P4Q_NIB_PACKED", "1")
    m, n, k = shape
    g = torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(("gpu-packed", bits, shape)).encode()))
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (n, k), generator=g, device="cuda", dtype=torch.int16).to(torch.int8)
    codes[0], codes[1] = lo, hi
    w = PackedWeight.from_codes(codes, torch.rand(n, generator=g, device="cuda") * 0.01 + 1e-3, bits)
    assert w.interleaved is not None  # the layout the packed unpack reads
    a = torch.randint(-128, 128, (m, k), generator=g, device="cuda", dtype=torch.int16).to(torch.int8)
    ref = gpu_raw_reference(a, 255, codes)
    ptr = [TileConfig(32, 64, 128, 8, 4, 3), TileConfig(32, 64, 128, 8, 4, 3, swap=True)]
    for cfg in [None, *ptr, *[c for c in GPU_CANDIDATES if c.kernel == "tma" and c.block_m <= max(64, m)]]:
        try:
            out = qgemm(a, 0.01, 255, w, raw=True, config=cfg)
        except triton.runtime.errors.OutOfResources:
            continue
        torch.cuda.synchronize()
        assert torch.equal(out.to(torch.int64), ref), cfg


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", [50, 51200])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_full_shape_epilogues(bits, m):
    """in_proj-like (requant to per-column q|k|v sites) and c_fc-like (GELU + requant) and c_proj-like (bias +
    residual, float) GEMMs at ViT-B/32 shapes against the CPU reference on a row sample."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(("gpu-ep", bits, m)).encode()))
    rows = torch.randperm(m, generator=g)[:256].sort().values
    for n, k, act, res, out_bits in (
        (2304, 768, "none", False, 8),
        (3072, 768, "gelu", False, 4),
        (768, 3072, "none", True, None),
    ):
        codes, scale, w = make_weight(bits, n, k, g, "cuda")
        a = make_acts(m, k, g, "cuda")
        bias = (torch.randn(n, generator=g) * 0.5).cuda()
        residual = torch.randn(m, n, generator=g).cuda() if res else None
        kw = dict(bias=bias, act=act, residual=residual)
        if out_bits is None:
            out = qgemm(a, 0.02, 3, w, **kw)
            ref = qgemm_reference(a[rows], 0.02, 3, codes, scale, bias=bias, act=act, residual=residual[rows])
            torch.testing.assert_close(out[rows].cpu(), ref, **FLOAT_TOL)
        else:
            sub = dict(bias=bias, act=act)
            y = qgemm_reference(a[rows], 0.02, 3, codes, scale, **sub)
            rq = _requant_for(y, g, out_bits, "cuda")
            out = qgemm(a, 0.02, 3, w, requant=rq, **kw)
            ref = qgemm_reference(a[rows], 0.02, 3, codes, scale, requant=rq, **sub)
            assert_codes_match(out[rows].cpu(), ref, y, rq)


@pytest.mark.parametrize("mutation", ["scale+1%", "zero_point+1"])
def test_tie_rule_catches_a_wrong_requant_site(device, mutation):
    """The relaxed code comparison still fails when the kernel requantizes with a site 1% or one zero point off."""
    m, n, k = SHAPES[1]
    g = gen("tie-rule", mutation)
    codes, scale, w = make_weight(4, n, k, g, device)
    a = make_acts(m, k, g, device)
    args = _epilogue_args(dict(bias=True, act="gelu"), m, n, g, device)
    a_scale = _a_scale_for(a, 128, codes, scale)
    y = qgemm_reference(a, a_scale, 128, codes, scale, **args)
    rq = _requant_for(y, g, 8, device)
    ref = qgemm_reference(a, a_scale, 128, codes, scale, requant=rq, **args)
    bad = (
        Requant(rq.scale * 1.01, rq.zero_point, 8)
        if mutation == "scale+1%"
        else Requant(rq.scale, rq.zero_point + 1, 8)
    )
    out = qgemm(a, a_scale, 128, w, requant=bad, **args)
    with pytest.raises(AssertionError, match="without a float tie"):
        assert_codes_match(out, ref, y, rq)
