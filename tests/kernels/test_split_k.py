"""Split-K (``kernels/split_k.py``, ``TileConfig.split_k``): several programs per output tile, their partial int32
sums published in per-split workspace slots, the epilogue run once by the tile's last program (which adds them).

Integer addition is exact in any order, so the raw accumulator must equal the reference bit for bit, and every
epilogue must give exactly what the same tile without split-K gives (under the interpreter: one numpy evaluation of
one epilogue; on a GPU two compilations may contract the epilogue differently: codes equal or a traced tie, floats
within fp32 ulps). Each call must leave the shared counters at zero (a counter left at 1 makes the next call's first
arrival take itself for the last: the control below); the slots may hold anything, they are written before read.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from p4q_engine.kernels import arrival, split_k
from p4q_engine.kernels import qgemm as qgemm_mod
from p4q_engine.kernels.qgemm import effective_config, qgemm, qgemm_reference
from p4q_engine.kernels.tuning import SPLIT_K_CANDIDATES, TileConfig, _fits, config_entries, config_json

from tests.kernels.test_qgemm import RAW_SENTINELS, gen, make_acts, make_weight, run_poisoned
from tests.kernels.test_wide_int8 import assert_same_epilogues

#: (M, N, K): K not a multiple of the step or of the split (the last range is short, some ranges empty), M and N
#: partial tiles; every K above one 2-bit interleaved group (256), so every layout splits
SHAPES = ((37, 48, 300), (1, 33, 520), (50, 40, 600))
BASE = TileConfig(32, 32, 32, 4, 4, 1)


def _workspaces_zero() -> bool:
    """Every arrival counter is back at zero (the slots need not be)."""
    return all(int(c.abs().sum()) == 0 for c in arrival.all_counters())


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("split", (2, 3))
@pytest.mark.parametrize("swap", (False, True), ids=("plain", "swap"))
def test_split_equals_one_program_per_tile(poison, device, bits, shape, split, swap):
    """Raw = the reference, twice in a row (the workspace reset); requant, float and GELU epilogues = the unsplit
    tile's, on fresh random inputs with poisoned outputs; the workspace is zero afterwards."""
    m, n, k = shape
    g = gen("split", bits, shape, split, swap)
    codes, scale, w = make_weight(bits, n, k, g, device)
    a = make_acts(m, k, g, device)
    base = replace(BASE, swap=swap)
    cfg = replace(base, split_k=split)
    assert effective_config(cfg, w).split_k > 1, "the case must really split"
    ref = qgemm_reference(a, 0.01, 77, codes, scale, raw=True)
    for out in run_poisoned(poison, RAW_SENTINELS, a=a, a_scale=0.01, a_zp=77, w=w, raw=True, config=cfg):
        assert torch.equal(out, ref)
    assert_same_epilogues(poison, device, g, a, codes, scale, w, base, cfg, ("none", "gelu"))
    assert _workspaces_zero()


def test_dirty_slots_do_not_matter_and_a_dirty_counter_is_seen(device):
    """Slots full of garbage change nothing (each is written before it is read). Positive control: a counter not
    zero at the start changes the result - tile 0's first arrival takes itself for the last and adds a slot that
    split 1 has not written yet (under the interpreter programs run in order, so deterministically); that tile's
    counter then ends at 1 (the dirt persists: only a kernel killed mid-flight leaves one, and that kills the CUDA
    context too), the others at 0."""
    codes, scale, w = make_weight(8, 40, 256, gen("dirty"), device)
    a = make_acts(9, 256, gen("dirty-a"), device)
    cfg = replace(BASE, split_k=2)
    ref = qgemm_reference(a, 0.01, 3, codes, scale, raw=True)
    assert torch.equal(qgemm(a, 0.01, 3, w, raw=True, config=cfg).cpu(), ref)
    tiles = 1 * 2  # ceil(9 / 32) x ceil(40 / 32)
    ws, cnt = split_k.workspace(torch.device(device), 2 * 9 * 40, tiles)
    ws.fill_(123456)
    assert torch.equal(qgemm(a, 0.01, 3, w, raw=True, config=cfg).cpu(), ref)
    if torch.device(device).type != "cpu":
        return  # the control needs the interpreter's program order
    ws.zero_()
    cnt[0] = 1
    out = qgemm(a, 0.01, 3, w, raw=True, config=cfg).cpu()
    assert not torch.equal(out[:, :32], ref[:, :32]) and torch.equal(out[:, 32:], ref[:, 32:])
    assert int(cnt[0]) == 1 and int(cnt[1:].abs().sum()) == 0
    cnt.zero_()


def test_split_shrinks_to_what_k_allows():
    """At least one K step per split; no split on TMA; a K of one step runs unsplit."""
    _, _, w = make_weight(8, 16, 768, gen("shrink"), "cpu")
    assert effective_config(TileConfig(32, 64, 128, split_k=8), w).split_k == 6  # 6 steps
    assert effective_config(TileConfig(32, 64, 64, split_k=8), w).split_k == 8
    assert effective_config(TileConfig(32, 64, 128, kernel="tma", split_k=4), w).split_k == 1
    assert split_k.usable_split(8, 100, 128) == 1
    assert split_k.k_per_split(300, 32, 3) == 128 and split_k.k_per_split(768, 128, 3) == 256


def test_split_candidates_only_at_small_m():
    """Split-K candidates fit M buckets up to SPLIT_K_MAX_M (a large batch has tiles for every SM)."""
    splits = SPLIT_K_CANDIDATES
    assert splits and all(c.kernel == "ptr" and c.split_k > 1 for c in splits)
    assert all(_fits(c, 50) for c in splits)
    assert not any(_fits(c, 51200) for c in splits)


def test_config_json_round_trip():
    """``split_k = 1`` keeps the old entry format; a split entry round-trips."""
    plain, split = TileConfig(32, 64, 128), TileConfig(32, 64, 128, split_k=4)
    assert "split_k" not in config_json(plain) and config_json(split)["split_k"] == 4
    assert config_entries({"a": config_json(plain), "b": config_json(split)}) == {"a": plain, "b": split}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("cfg", SPLIT_K_CANDIDATES, ids=str)
@pytest.mark.parametrize("bits", (8, 4))
def test_gpu_split_candidates_at_batch_1(cfg, bits):
    """Every split-K candidate on ViT-B/32's c_proj (3072 -> 768) and out_proj (768 -> 768) at batch 1: raw
    accumulators equal the reference; the residual epilogue's floats equal the unsplit tile's within fp32 ulps."""
    for n, k in ((768, 3072), (768, 768)):
        g = gen("gpu-split", bits, n, k)
        codes, scale, w = make_weight(bits, n, k, g, "cuda")
        a = make_acts(50, k, g, "cuda")
        for _ in range(3):
            raw = qgemm(a, 0.003, 130, w, raw=True, config=cfg)
            assert torch.equal(raw.cpu(), qgemm_reference(a, 0.003, 130, codes, scale, raw=True))
        res = torch.randn(50, n, generator=g).cuda()
        whole = qgemm(a, 0.003, 130, w, residual=res, config=replace(cfg, split_k=1))
        torch.testing.assert_close(qgemm(a, 0.003, 130, w, residual=res, config=cfg), whole, rtol=1e-5, atol=1e-4)
    torch.cuda.synchronize()
    assert _workspaces_zero()


def test_split_candidates_are_tuned_only_when_asked(monkeypatch):
    """``P4Q_SPLIT_K`` (default 0): the tuner's candidate list has the split-K tiles only under ``1``; a bad value
    is a clear error."""
    from p4q_engine.errors import ConfigError

    codes, scale, w = make_weight(8, 48, 256, gen("switch"), "cpu")
    a = make_acts(20, 256, gen("switch-a"), "cpu")
    seen: list = []

    def fake_pick(name, m, n, k, bits, dev, bench, cands, fit_m=None):
        seen.append(cands)
        return cands[0]

    monkeypatch.setattr(qgemm_mod, "pick_config", fake_pick)
    ref = qgemm_reference(a, 0.01, 3, codes, scale, raw=True)
    for flag, expect in ((None, False), ("0", False), ("1", True)):
        qgemm_mod._RESOLVED.clear()
        seen.clear()
        if flag is None:
            monkeypatch.delenv("P4Q_SPLIT_K", raising=False)
        else:
            monkeypatch.setenv("P4Q_SPLIT_K", flag)
        assert torch.equal(qgemm(a, 0.01, 3, w, raw=True).cpu(), ref)
        assert any(c.split_k > 1 for c in seen[0]) is expect
    monkeypatch.setenv("P4Q_SPLIT_K", "yes")
    qgemm_mod._RESOLVED.clear()
    with pytest.raises(ConfigError, match="P4Q_SPLIT_K"):
        qgemm(a, 0.01, 3, w, raw=True)
    qgemm_mod._RESOLVED.clear()
