"""Fused LayerNorm + quantize (``p4q_engine.kernels.layernorm``) against ``layernorm_quant_reference``.

Tolerance: ``quantize_rows`` (a division and a floor) is bit-exact. ``layernorm_quant`` computes the mean and
variance with its own reduction order, so its fp32 ``y`` may differ from ``F.layer_norm`` by a few ulps; that
moves a code only where ``y / s`` is within those ulps of a rounding boundary. Codes must therefore be equal
everywhere except at float ties (``p4q_engine.quant.ties``: within ``TIE_EPS`` code units of a ``.5`` boundary),
where they may differ by one.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from p4q_engine.kernels import layernorm as ln_mod
from p4q_engine.kernels.layernorm import layernorm_quant, layernorm_quant_reference, quantize_rows

from p4q_engine.quant.ties import assert_codes_equal_or_ties

HAS_CUDA = torch.cuda.is_available()
EPS = 1e-5
#: (bits, zero point): extremes, the middle, and a 4-bit site.
SITES = ((8, 0), (8, 128), (8, 255), (4, 0), (4, 8), (4, 15))


def gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_rows(rows: int, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual-stream-like rows (offset, varied scale per row, one large outlier channel), LN weight and bias."""
    x = torch.randn(rows, d, generator=g) * (0.5 + 3 * torch.rand(rows, 1, generator=g)) + 1.0
    x[:, 3] += 20.0  # an outlier channel: the row statistics must not be dominated by the lanes past D
    w = torch.randn(d, generator=g) * 0.5 + 1.0
    b = torch.randn(d, generator=g) * 0.2
    return x, w, b


def assert_codes_match(out: torch.Tensor, ref: torch.Tensor, y_over_s: torch.Tensor) -> None:
    assert_codes_equal_or_ties(out.cpu(), ref, y_over_s)


def run_poisoned(poison, fn, sentinels, *args, pad=2, **kwargs) -> list[torch.Tensor]:
    outs = []
    for s in sentinels:
        with poison(ln_mod, s, pad=pad) as alloc:
            out = fn(*args, **kwargs)
        alloc.assert_padding_untouched()
        outs.append(out.cpu())
    return outs


@pytest.mark.parametrize("d", [64, 100, 768])
@pytest.mark.parametrize("bits,zp", SITES)
def test_layernorm_quant(poison, device, d, bits, zp):
    g = gen("ln", d, bits, zp)
    x, w, b = make_rows(37 if d < 512 else 9, d, g)
    qmax = (1 << bits) - 1
    scale = 6.0 / qmax  # y spans about +-3: with zp at an extreme, half the codes clamp
    ref = layernorm_quant_reference(x, w, b, EPS, scale, zp, bits)
    y = F.layer_norm(x, (d,), w, b, EPS) / torch.tensor(scale, dtype=torch.float32)
    u = ref.to(torch.int32) + 128
    assert int(u.min()) == 0 or int(u.max()) == qmax  # clamping is exercised at the extreme zero points
    sentinels = (77,) if bits < 8 else (77, -5)  # a 4-bit code is u in [0, 15]: 77 (u = 205) is impossible
    for out in run_poisoned(
        poison, layernorm_quant, sentinels, x.to(device), w.to(device), b.to(device), EPS, scale, zp, bits
    ):
        assert out.dtype == torch.int8 and out.shape == x.shape
        assert int((out.to(torch.int32) + 128).max()) <= qmax
        assert_codes_match(out, ref, y)


@pytest.mark.parametrize("d", [64, 100, 768])
@pytest.mark.parametrize("bits,zp", SITES)
def test_quantize_rows_exact(poison, device, d, bits, zp):
    g = gen("q", d, bits, zp)
    x = torch.randn(9, d, generator=g) * 3
    x[0, : d // 2] = torch.arange(d // 2) * 0.5 - 7.25  # exact half steps: ties must round up
    scale = 0.5
    ref = layernorm_quant_reference(x, None, None, 0.0, scale, zp, bits, norm=False)
    sentinels = (77,) if bits < 8 else (77, -5)
    for out in run_poisoned(poison, quantize_rows, sentinels, x.to(device), scale, zp, bits):
        assert torch.equal(out, ref)


def test_layernorm_quant_keeps_leading_dims(poison, device):
    """``[B, L, D]`` input (the engine's layout): rows of the last dimension, same shape back."""
    g = gen("3d")
    x, w, b = make_rows(2 * 5, 100, g)
    x3 = x.view(2, 5, 100)
    ref = layernorm_quant_reference(x3, w, b, EPS, 0.05, 131)
    (out,) = run_poisoned(
        poison, layernorm_quant, (77,), x3.to(device), w.to(device), b.to(device), EPS, 0.05, 131, pad=0
    )
    assert out.shape == (2, 5, 100)
    y = F.layer_norm(x3, (100,), w, b, EPS) / torch.tensor(0.05, dtype=torch.float32)
    assert_codes_match(out, ref, y)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits,zp", [(8, 0), (8, 255), (4, 7)])
def test_gpu_vit_b32_rows(bits, zp):
    """51200 rows x 768 (batch 1024 x 50 tokens of ViT-B/32)."""
    g = gen("gpu-ln", bits, zp)
    x, w, b = make_rows(51200, 768, g)
    scale = 6.0 / ((1 << bits) - 1)
    out = layernorm_quant(x.cuda(), w.cuda(), b.cuda(), EPS, scale, zp, bits)
    ref = layernorm_quant_reference(x, w, b, EPS, scale, zp, bits)
    assert_codes_match(out, ref, F.layer_norm(x, (768,), w, b, EPS) / torch.tensor(scale, dtype=torch.float32))
    assert torch.equal(
        quantize_rows(x.cuda(), scale, zp, bits).cpu(),
        layernorm_quant_reference(x, w, b, EPS, scale, zp, bits, norm=False),
    )


@pytest.mark.parametrize("cfg", ln_mod.LN_CANDIDATES, ids=lambda c: f"rows{c.block_m}-w{c.num_warps}")
def test_every_tuning_candidate(poison, device, cfg):
    """Each rows-per-program candidate the GPU tuner may pick gives the reference's codes (37 rows: a partial last
    program for every candidate above one row), for the LayerNorm and the plain quantize."""
    g = gen("cand", cfg.block_m, cfg.num_warps)
    x, w, b = make_rows(37, 100, g)
    ref = layernorm_quant_reference(x, w, b, EPS, 0.05, 131)
    y = F.layer_norm(x, (100,), w, b, EPS) / torch.tensor(0.05, dtype=torch.float32)
    dev = [t.to(device) for t in (x, w, b)]
    (out,) = run_poisoned(poison, ln_mod._launch, (77,), *dev, EPS, 0.05, 131, 8, True, config=cfg)
    assert_codes_match(out, ref, y)
    (out,) = run_poisoned(poison, ln_mod._launch, (77,), dev[0], None, None, 0.0, 0.5, 7, 8, False, config=cfg)
    assert torch.equal(out, layernorm_quant_reference(x, w, b, EPS, 0.5, 7, 8, norm=False))
