"""The GEMMs' LayerNorm tail (``kernels/epilogue.py``): ``qgemm(..., residual=x, ln=RowNorm(...))`` returns the
fp32 output rows and, computed by each row block's last tile, the codes of LayerNorm + quantize of those rows.

Reference: the same GEMM without the tail (its fp32 output must be the very same), then LayerNorm + quantize of that
output. Under the interpreter the tail and ``layernorm_quant`` are one numpy evaluation of one definition
(``layernorm.ln_codes``), so the codes are equal exactly; on a GPU the row sums' reduction order follows the tile,
so codes are equal or a float tie against ``layernorm_quant_reference`` (``p4q_engine.quant.ties``). Outputs are
poisoned and padded; the arrival counters must be back at zero after every call.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from p4q_engine.kernels import arrival
from p4q_engine.kernels import qgemm as qgemm_mod
from p4q_engine.kernels.epilogue import LN_MAX_D, ln_rows
from p4q_engine.kernels.layernorm import RowNorm, layernorm_quant, layernorm_quant_reference
from p4q_engine.kernels.qgemm import Requant, qgemm
from p4q_engine.kernels.tuning import TileConfig

from p4q_engine.quant.ties import assert_codes_equal_or_ties
from tests.kernels.test_qgemm import TMA_CONFIG, gen, make_acts, make_weight

EPS = 1e-5
#: (M, N, K): several row blocks and column tiles, partial ones, N not a power of two
SHAPES = ((37, 100, 64), (1, 48, 96), (70, 40, 128))
BASE = TileConfig(32, 32, 32, 4, 4, 1)
#: the pointer kernel plain, swapped and split over K, and a TMA tile (which a tail runs on the pointer kernel)
CONFIGS = {
    "ptr": BASE,
    "swap": replace(BASE, swap=True),
    "split2": replace(BASE, split_k=2),
    "tma": TMA_CONFIG,
}


def _counters_zero() -> bool:
    return all(int(c.abs().sum()) == 0 for c in arrival.all_counters())


def _norm(n: int, g: torch.Generator, device: str, bits: int, zp: int) -> RowNorm:
    w = (torch.randn(n, generator=g) * 0.5 + 1.0).to(device)
    b = (torch.randn(n, generator=g) * 0.2).to(device)
    return RowNorm(w, b, EPS, 6.0 / ((1 << bits) - 1), zp, bits)


def _case(shape, bits, tag, device):
    """Activations, an 8-bit or low-bit weight, a bias and residual on the residual-stream scale, a norm."""
    m, n, k = shape
    g = gen("ln-tail", shape, bits, tag)
    codes, scale, w = make_weight(bits, n, k, g, device)
    a = make_acts(m, k, g, device)
    bias = (torch.randn(n, generator=g) * 0.1).to(device)
    res = (torch.randn(m, n, generator=g) * 2 + 1).to(device)
    return a, w, bias, res, g


def _expected_codes(y: torch.Tensor, ln: RowNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference codes of ``ln`` on rows ``y`` and their pre-rounding values ``y_ln / s`` (for the tie rule)."""
    ref = layernorm_quant_reference(y, ln.weight, ln.bias, ln.eps, ln.scale, ln.zero_point, ln.bits)
    yn = F.layer_norm(y.cpu().float(), y.shape[-1:], ln.weight.cpu(), ln.bias.cpu(), ln.eps)
    return ref, yn.double() / ln.scale


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("bits,ln_bits,zp", ((8, 8, 128), (4, 8, 3), (2, 4, 9), (3, 8, 250)))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ln_tail_equals_gemm_then_layernorm(poison, device, cfg_name, bits, ln_bits, zp, shape):
    """Fresh random inputs, every weight width, poisoned outputs: the fused call's fp32 rows are the unfused GEMM's,
    its codes those of LayerNorm + quantize of them."""
    cfg = CONFIGS[cfg_name]
    if cfg_name == "tma" and shape[2] % 16:
        pytest.skip("TMA needs K a multiple of 16 bytes")
    a, w, bias, res, g = _case(shape, bits, cfg_name, device)
    ln = _norm(shape[1], g, device, ln_bits, zp)
    plain = qgemm(a, 0.02, 140, w, bias, residual=res, config=cfg)
    for sentinel in (77, -5) if ln_bits == 8 else (77,):
        with poison(qgemm_mod, sentinel, pad=3) as alloc:
            y, codes = qgemm(a, 0.02, 140, w, bias, residual=res, config=cfg, ln=ln)
        alloc.assert_padding_untouched()
        if device == "cpu":  # one numpy evaluation of one definition
            assert torch.equal(y, plain)
            assert torch.equal(codes, layernorm_quant(y, ln.weight, ln.bias, EPS, ln.scale, zp, ln_bits))
        else:  # two compilations of the epilogue may contract its float ops differently
            torch.testing.assert_close(y, plain, rtol=1e-5, atol=1e-5)
        ref, v = _expected_codes(y, ln)
        assert_codes_equal_or_ties(codes.cpu(), ref, v)
        assert int((codes.to(torch.int32) + 128).max()) <= (1 << ln_bits) - 1
    assert _counters_zero()


def test_a_dirty_counter_is_seen(poison, device):
    """Positive control: a row block's counter left at 1 makes its first tile take itself for the last and
    normalise rows whose other columns are not written yet (under the interpreter programs run in order; the
    poisoned output holds 100 there), so the tests above would catch a tail that does not wait for its rows."""
    if device != "cpu":
        pytest.skip("needs the interpreter's program order")
    a, w, bias, res, g = _case((20, 40, 64), 8, "dirty", device)  # one row block, two column tiles
    ln = _norm(40, g, device, 8, 128)
    _, good = qgemm(a, 0.02, 140, w, bias, residual=res, config=BASE, ln=ln)
    cnt = arrival.counters(torch.device(device), 1, "ln-tail")
    cnt[0] = 1
    with poison(qgemm_mod, 100):
        _, bad = qgemm(a, 0.02, 140, w, bias, residual=res, config=BASE, ln=ln)
    assert not torch.equal(bad, good)
    cnt.zero_()


def test_rows_per_step():
    """A tail step holds at most LN_STEP elements and never more rows than the tile."""
    assert ln_rows(16, 768) == 4 and ln_rows(2, 768) == 2 and ln_rows(64, 5000) == 1


def test_bad_tail_requests_raise(device):
    """Clear errors, nothing launched: a tail needs the float32 output, a norm of the right width on the device."""
    a, w, bias, res, g = _case((5, 40, 64), 8, "bad", device)
    ln = _norm(40, g, device, 8, 128)
    rq = Requant(torch.full((40,), 0.1, device=device), torch.full((40,), 3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="float32 output"):
        qgemm(a, 0.02, 140, w, requant=rq, ln=ln)
    with pytest.raises(ValueError, match="float32 output"):
        qgemm(a, 0.02, 140, w, raw=True, ln=ln)
    with pytest.raises(ValueError, match="LayerNorm weight"):
        qgemm(a, 0.02, 140, w, ln=replace(ln, weight=ln.weight[:39]))
    with pytest.raises(ValueError, match="LayerNorm bias"):
        qgemm(a, 0.02, 140, w, ln=replace(ln, bias=ln.bias.double()))
    assert LN_MAX_D >= 1664  # ViT-bigG/14's width


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("m", (50, 400, 12800))
@pytest.mark.parametrize("k", (768, 3072))
@pytest.mark.parametrize("bits", (8, 4))
def test_gpu_vit_b32_shapes(m, k, bits):
    """ViT-B/32's out_proj (768 -> 768) and c_proj (3072 -> 768) with the tuned tile, batch 1, 8 and 256."""
    a, w, bias, res, g = _case((m, 768, k), bits, "gpu", "cuda")
    ln = _norm(768, g, "cuda", 8, 128)
    plain = qgemm(a, 0.002, 140, w, bias, residual=res)
    for _ in range(2):
        y, codes = qgemm(a, 0.002, 140, w, bias, residual=res, ln=ln)
        torch.testing.assert_close(y, plain, rtol=1e-5, atol=1e-5)
        ref, v = _expected_codes(y, ln)
        assert_codes_equal_or_ties(codes.cpu(), ref, v)
    torch.cuda.synchronize()
    assert _counters_zero()
