"""The int8 copy of low-bit weights (``PackedWeight.wide``, ``TileConfig.wide``): the 8-bit main loop on the same
integers, chosen per shape by the tuner against the packed loop.

Both loops accumulate exact integers and share the epilogue, so every output (raw accumulator, float, codes) must be
*bit-identical* between them and the raw one equal to the reference: no tolerance anywhere in this file.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from p4q_engine.kernels import qgemm as qgemm_mod
from p4q_engine.kernels.qgemm import Requant, qgemm, qgemm_reference
from p4q_engine.kernels.tuning import INTERPRET_CONFIG, TileConfig, config_entries, config_json
from p4q_engine.kernels.weight_layout import wide_copy

from p4q_engine.errors import ConfigError
from p4q_engine.quant.ties import assert_codes_equal_or_ties
from tests.kernels.test_qgemm import RAW_SENTINELS, gen, make_acts, make_weight, run_poisoned

LOW_BITS = (2, 3, 4)
SHAPES = ((37, 48, 100), (1, 33, 128), (50, 40, 256))
#: the persistent TMA kernel too (K a multiple of 16 bytes), 32 x 32 tiles so each program walks several tiles
TMA_CONFIG = TileConfig(32, 32, 128, 2, 4, 1, "tma")


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("P4Q_WIDE_INT8", "1")


def test_policy(monkeypatch):
    """``auto`` keeps the copy on GPUs only, while a quarter of the GPU's memory stays free after it; ``0`` / ``1``
    force it; anything else is a clear error."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("P4Q_WIDE_INT8", raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 << 30, 80 << 30))
    assert wide_copy(gpu) and wide_copy(gpu, 40 << 30) and not wide_copy(cpu)
    assert not wide_copy(gpu, (40 << 30) + 1)  # would leave less than 20 of 80 GiB free
    monkeypatch.setenv("P4Q_WIDE_INT8", "0")
    assert not wide_copy(gpu)
    monkeypatch.setenv("P4Q_WIDE_INT8", "1")
    assert wide_copy(cpu) and wide_copy(gpu, 1 << 50)
    monkeypatch.setenv("P4Q_WIDE_INT8", "yes")
    with pytest.raises(ConfigError, match="P4Q_WIDE_INT8"):
        wide_copy(cpu)


@pytest.mark.parametrize("bits", (*LOW_BITS, 8))
def test_copy_holds_the_codes(wide, device, bits):
    """The copy is the signed codes as int8; its view is an 8-bit weight sharing scales and column sums; 8-bit
    weights (already plain int8) get none."""
    codes, _, w = make_weight(bits, 40, 100, gen("copy", bits), device)
    if bits == 8:
        assert w.wide is None
        with pytest.raises(ValueError, match="no int8 copy"):
            w.wide_view()
        return
    assert w.wide.dtype == torch.int8 and torch.equal(w.wide.cpu(), codes)
    v = w.wide_view()
    assert v.bits == 8 and v.direct is w.wide and v.scale is w.scale and v.colsum is w.colsum
    assert v.interleaved is None and v.wide is None and w.wide_view() is v  # built once


def test_no_copy_when_off(monkeypatch, device):
    monkeypatch.setenv("P4Q_WIDE_INT8", "0")
    _, _, w = make_weight(4, 40, 100, gen("off"), device)
    assert w.wide is None


def _requant(n: int, g: torch.Generator, device: str) -> Requant:
    scale = torch.rand(n, generator=g) * 0.05 + 0.02
    return Requant(scale.to(device), torch.randint(0, 256, (n,), generator=g, dtype=torch.int32).to(device))


def assert_same_epilogues(poison, device, g, a, codes, scale, w, base, other, acts) -> None:
    """Two configurations that accumulate the same integers (``base``, ``other``) give the same requantized codes
    (bias + residual, poisoned outputs) and the same float outputs for each activation in ``acts``: bit for bit
    under the interpreter (one numpy evaluation of one epilogue); on a GPU two compilations may contract the
    epilogue's multiply-adds differently, so there codes equal or a traced tie and floats within fp32 ulps."""
    m, n = a.shape[0], w.n
    bias = (torch.randn(n, generator=g) * 0.5).to(device)
    res = (torch.randn(m, n, generator=g) * 2).to(device)
    rq = _requant(n, g, device)
    args = dict(a=a, a_scale=0.003, a_zp=200, w=w, bias=bias, residual=res, requant=rq)
    first = run_poisoned(poison, (77,), config=base, **args)[0]
    y = qgemm_reference(a, 0.003, 200, codes, scale, bias=bias, residual=res)
    for out in run_poisoned(poison, (77, -5), config=other, **args):
        if device == "cpu":
            assert torch.equal(out, first)
        else:
            assert_codes_equal_or_ties(out, first, y.double() / rq.scale.cpu().double())
    for act in acts:
        f_base = qgemm(a, 0.003, 200, w, bias, act=act, residual=res, config=base)
        f_other = qgemm(a, 0.003, 200, w, bias, act=act, residual=res, config=other)
        if device == "cpu":
            assert torch.equal(f_other, f_base)
        else:
            torch.testing.assert_close(f_other, f_base, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", LOW_BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "base",
    (INTERPRET_CONFIG, replace(INTERPRET_CONFIG, swap=True), TMA_CONFIG, replace(TMA_CONFIG, swap=True)),
    ids=("ptr", "ptr-swap", "tma", "tma-swap"),
)
def test_wide_equals_packed_loop(wide, poison, device, bits, shape, base):
    """Raw accumulator = the reference; the requantizing epilogue (bias, residual) gives the packed loop's codes and
    the float epilogues its floats, on fresh random inputs with poisoned outputs. Bit for bit under the interpreter
    (one numpy evaluation of one epilogue); on a GPU two compilations may contract the epilogue's multiply-adds
    differently, so there: codes equal or a traced tie, floats within fp32 ulps (as test_qgemm.py)."""
    m, n, k = shape
    g = gen("wide", bits, shape, base.kernel)
    codes, scale, w = make_weight(bits, n, k, g, device)
    a = make_acts(m, k, g, device)
    wcfg = replace(base, wide=True)
    (out,) = run_poisoned(poison, RAW_SENTINELS[:1], a=a, a_scale=0.01, a_zp=77, w=w, raw=True, config=wcfg)
    assert torch.equal(out, qgemm_reference(a, 0.01, 77, codes, scale, raw=True))
    assert_same_epilogues(poison, device, g, a, codes, scale, w, base, wcfg, ("none", "gelu", "quick_gelu"))


def test_wide_config_reads_the_copy(wide, device):
    """Positive control: a flipped code in the copy changes the wide result and not the packed one - the wide
    configuration really runs the 8-bit loop on ``w.wide``."""
    codes, scale, w = make_weight(4, 40, 128, gen("control"), device)
    a = make_acts(9, 128, gen("control-a"), device)
    ref = qgemm_reference(a, 0.01, 3, codes, scale, raw=True)
    w.wide[5, 17] = -w.wide[5, 17] - 1  # still a 4-bit code, another one
    wcfg = replace(INTERPRET_CONFIG, wide=True)
    assert not torch.equal(qgemm(a, 0.01, 3, w, raw=True, config=wcfg).cpu(), ref)
    assert torch.equal(qgemm(a, 0.01, 3, w, raw=True, config=INTERPRET_CONFIG).cpu(), ref)


def test_wide_config_without_copy_runs_packed_loop(monkeypatch, device):
    """A table's wide entry on a weight without the copy (``P4Q_WIDE_INT8=0``) runs the weight's own loop."""
    monkeypatch.setenv("P4Q_WIDE_INT8", "0")
    codes, scale, w = make_weight(3, 33, 128, gen("nocopy"), device)
    a = make_acts(7, 128, gen("nocopy-a"), device)
    out = qgemm(a, 0.01, 9, w, raw=True, config=replace(INTERPRET_CONFIG, wide=True))
    assert torch.equal(out.cpu(), qgemm_reference(a, 0.01, 9, codes, scale, raw=True))


def test_tuner_chooses_between_the_two_loops(wide, monkeypatch, device):
    """``_tuned_config`` takes the packed loop's tile, the 8-bit loop's tile (its own key: 8 bits, the direct8
    layout), then lets ``pick_config`` time the two under a ``-wide`` key; whichever it returns is what runs."""
    codes, scale, w = make_weight(4, 48, 128, gen("tuner"), device)
    a = make_acts(20, 128, gen("tuner-a"), device)
    calls: list[tuple] = []
    launched: list[dict] = []
    nib_cfg, w8_cfg = TileConfig(32, 32, 128, 2, 4, 1), TileConfig(16, 32, 64, 2, 4, 1)
    pick_wide = {"value": True}

    def fake_pick(name, m, n, k, bits, dev, bench, cands, fit_m=None):
        calls.append((name, bits, cands))
        if name.endswith("-wide"):
            return cands[0] if pick_wide["value"] else cands[1]
        return w8_cfg if bits == 8 else nib_cfg

    real_launch = qgemm_mod.launch

    def spy_launch(kernel, grid, *args, **kw):
        launched.append(kw)
        return real_launch(kernel, grid, *args, **kw)

    monkeypatch.setattr(qgemm_mod, "pick_config", fake_pick)
    monkeypatch.setattr(qgemm_mod, "launch", spy_launch)
    ref = qgemm_reference(a, 0.01, 3, codes, scale, raw=True)
    for choose_wide in (True, False):
        qgemm_mod._RESOLVED.clear()
        calls.clear()
        launched.clear()
        pick_wide["value"] = choose_wide
        assert torch.equal(qgemm(a, 0.01, 3, w, raw=True).cpu(), ref)
        names = [c[0] for c in calls]
        assert names == ["qgemm-nib4-raw", "qgemm-direct8-raw", "qgemm-nib4-raw-wide"], names
        assert calls[1][1] == 8 and calls[2][1] == 4
        assert calls[2][2] == (replace(w8_cfg, wide=True), replace(nib_cfg, block_k=128))
        assert launched[-1]["DIRECT8"] is choose_wide and (launched[-1]["NIB"] == 0) is choose_wide
        assert launched[-1]["BLOCK_M"] == (w8_cfg if choose_wide else nib_cfg).block_m
    # a shipped / cached choice is taken as it is: neither loop's own key is looked up or tuned
    qgemm_mod._RESOLVED.clear()
    calls.clear()
    shipped = replace(TileConfig(16, 64, 64, 2, 4, 1), wide=True)
    looked: list = []
    monkeypatch.setattr(qgemm_mod, "lookup", lambda name, *a: looked.append(name) or shipped)
    assert torch.equal(qgemm(a, 0.01, 3, w, raw=True).cpu(), ref)
    assert looked == ["qgemm-nib4-raw-wide"] and calls == [] and launched[-1]["DIRECT8"] is True
    assert launched[-1]["BLOCK_N"] == 64
    qgemm_mod._RESOLVED.clear()


def test_config_json_round_trip():
    """Entries without ``wide`` keep the old table format; a wide entry round-trips."""
    plain, wide = TileConfig(64, 64, 128), TileConfig(64, 64, 128, wide=True)
    assert "wide" not in config_json(plain) and config_json(wide)["wide"] is True
    assert config_entries({"a": config_json(plain), "b": config_json(wide)}) == {"a": plain, "b": wide}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("bits", LOW_BITS)
@pytest.mark.parametrize("m", (50, 51200))
def test_gpu_wide_matches_packed_at_full_shape(bits, m):
    """ViT-B/32's c_fc (768 -> 3072) at batch 1 and 1024: the raw accumulators of the wide loop equal the reference
    (a slice on the CPU) and the packed loop's; the tuned choice, the forced wide loop and an explicit packed-loop
    tile give the same requantized GELU codes - equal, or one step apart at a float tie of the float64 pre-rounding
    value (two compilations of the same epilogue may contract its multiply-adds differently)."""
    g = gen("gpu-wide", bits, m)
    codes, scale, w = make_weight(bits, 3072, 768, g, "cuda")
    assert w.wide is not None  # auto: on for GPUs with room
    a = make_acts(m, 768, g, "cuda")
    rq = _requant(3072, g, "cuda")
    bias = (torch.randn(3072, generator=g) * 0.5).cuda()
    packed_tile = TileConfig(64, 128, 128, 8, 4, 3)  # a pointer-kernel tile of GPU_CANDIDATES, not wide
    w8raw = qgemm_mod._tuned_config(a, 0.003, 130, w.wide_view(), None, "none", None, None, torch.float32, True)
    raw = qgemm(a, 0.003, 130, w, raw=True, config=replace(w8raw, wide=True))  # an int32 tile has its own smem
    assert torch.equal(raw, qgemm(a, 0.003, 130, w, raw=True, config=packed_tile))
    rows = slice(0, 512)  # the reference on the CPU: a slice is enough for every tile position in N
    assert torch.equal(raw[rows].cpu(), qgemm_reference(a[rows], 0.003, 130, codes, scale, raw=True))
    y = raw.double() * (0.003 * w.scale.double()) + bias.double()
    v = torch.nn.functional.gelu(y) / rq.scale.double()  # the pre-rounding values, float64 (on the GPU)
    tuned = qgemm(a, 0.003, 130, w, bias, act="gelu", requant=rq)
    w8 = qgemm_mod._tuned_config(a, 0.003, 130, w.wide_view(), bias, "gelu", None, rq, torch.float32, False)
    forced = qgemm(a, 0.003, 130, w, bias, act="gelu", requant=rq, config=replace(w8, wide=True))
    packed = qgemm(a, 0.003, 130, w, bias, act="gelu", requant=rq, config=packed_tile)
    assert_codes_equal_or_ties(tuned, forced, v, what="tuned vs wide")
    assert_codes_equal_or_ties(packed, forced, v, what="packed vs wide")
