"""``P4Q_BATCH_INVARIANT=1`` (``kernels.tuning.batch_invariant``): the kernels whose float reductions follow their
tile - LayerNorm rows, attention row sums - take one tile per shape whatever the batch, looked up and never timed.

The tile choice is checked on a stand-in CUDA operand (no GPU needed: the lookup is recorded, not run); that the
features then do not depend on the batch is a GPU test in ``tests/runtime/test_kernel_engine.py``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from p4q_engine.kernels import layernorm, qattention, tuning

SITES = qattention.AttnSites((0.1, 128), (0.1, 128), (0.1, 128), (1 / 255, 0), (0.1, 128))


def fake(*shape):
    return SimpleNamespace(shape=shape, device=torch.device("cuda"))  # a device name: no GPU needed


@pytest.fixture
def lookups(monkeypatch):
    calls = []

    def record(name, m, n, k, bits, device, bench=None, candidates=(), fit_m=None):
        calls.append((name, m, bench is None))
        return candidates[0]

    monkeypatch.setattr(layernorm, "pick_config", record)
    monkeypatch.setattr(qattention, "pick_config", record)
    monkeypatch.setattr(layernorm, "_RESOLVED", {})
    return calls


@pytest.mark.parametrize("invariant", [False, True])
def test_layernorm_tile_follows_the_batch_only_when_allowed(monkeypatch, lookups, invariant):
    monkeypatch.setenv("P4Q_BATCH_INVARIANT", "1" if invariant else "0")
    for rows in (50, 3200, 12800, 51200):
        layernorm._config(fake(rows, 768), None, None, 1e-5, 0.1, 128, 8, True)
    ms = {m for _, m, _ in lookups}
    assert ms == ({tuning.INVARIANT_ROWS} if invariant else {50, 3200, 12800, 51200})
    assert all(untimed for *_, untimed in lookups) == invariant
    lookups.clear()
    layernorm._config(fake(50, 768), None, None, 0.0, 0.1, 128, 8, False)  # quantize only: elementwise, any tile
    assert lookups == [("quant-rows", 50, False)]


@pytest.mark.parametrize("invariant", [False, True])
@pytest.mark.parametrize("length,kernel", [(50, "short"), (197, "tiled")])
def test_attention_tile_follows_the_batch_only_when_allowed(monkeypatch, lookups, invariant, length, kernel):
    monkeypatch.setenv("P4Q_BATCH_INVARIANT", "1" if invariant else "0")
    cands = qattention.SHORT_CANDIDATES if kernel == "short" else qattention.ATTN_CANDIDATES
    name = qattention.SHORT_TUNE_NAME if kernel == "short" else qattention.TILED_TUNE_NAME
    for b in (1, 8, 256, 1024):
        qattention._tune(name, fake(b, length, 3 * 768), 12, SITES, False, kernel, cands)
    ms = [m for _, m, _ in lookups]
    assert ms == ([tuning.INVARIANT_HEADS] * 4 if invariant else [12, 96, 3072, 12288])
    assert all(untimed for *_, untimed in lookups) == invariant
