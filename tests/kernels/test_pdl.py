"""Programmatic dependent launch (``kernels/pdl.py``, ``P4Q_PDL``): the switch, and on a Hopper GPU a chain of
dependent engine kernels replayed from a CUDA graph with PDL on, equal to the same chain with it off.

Every kernel waits for its predecessor before touching memory, so the answers cannot change. The exact comparison
is not a lucky match: the two builds differ only by the ``griddepcontrol`` instructions at the kernel's start (no
float operation, so the same contractions and reduction order), hence the same floats and codes bit for bit; a
difference means a kernel read or wrote before its wait. A kernel
that read its input before the wait would race the producer and fail the repeated-replay comparison below.
"""

from __future__ import annotations

import pytest
import torch
from p4q_engine.kernels import pdl
from p4q_engine.kernels.layernorm import layernorm_quant
from p4q_engine.kernels.qgemm import Requant, qgemm

from p4q_engine.errors import ConfigError
from tests.kernels.test_qgemm import gen, make_weight


def test_switch(monkeypatch):
    """Off by default, off on the CPU and under the interpreter whatever the variable says; a bad value raises."""
    monkeypatch.delenv("P4Q_PDL", raising=False)
    assert not pdl.wanted() and pdl.options(torch.device("cpu")) == {"GDC": False}
    monkeypatch.setenv("P4Q_PDL", "1")
    assert pdl.wanted() and pdl.options(torch.device("cpu")) == {"GDC": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.options(torch.device("cuda")) == {"GDC": False}
    monkeypatch.setenv("P4Q_PDL", "on")
    with pytest.raises(ConfigError, match="P4Q_PDL"):
        pdl.wanted()


def _chain(x, ln_w, ln_b, w1, rq1, w2, s1):
    """LayerNorm + quantize -> GEMM requantized (the next site's codes) -> GEMM + fp32 residual: each kernel reads
    what the previous one wrote."""
    a = layernorm_quant(x, ln_w, ln_b, 1e-5, 0.05, 128)
    h = qgemm(a, 0.05, 128, w1, requant=rq1)
    return qgemm(h, s1, 120, w2, residual=x), h  # 120: rq1's zero point (no device read inside a capture)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs a Hopper GPU"
)
@pytest.mark.parametrize("m", (50, 4096))
def test_gpu_chain_in_a_graph_equals_without_pdl(monkeypatch, m):
    g = gen("pdl", m)
    x = torch.randn(m, 768, generator=g).cuda()
    ln_w, ln_b = torch.rand(768, generator=g).cuda() + 0.5, torch.randn(768, generator=g).cuda() * 0.1
    _, _, w1 = make_weight(8, 3072, 768, g, "cuda")
    _, _, w2 = make_weight(4, 768, 3072, g, "cuda")
    rq1 = Requant(torch.full((3072,), 0.04).cuda(), torch.full((3072,), 120, dtype=torch.int32).cuda())
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("P4Q_PDL", flag)
        _chain(x, ln_w, ln_b, w1, rq1, w2, 0.04)  # compile and tune outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, h = _chain(x, ln_w, ln_b, w1, rq1, w2, 0.04)
        runs = []
        for _ in range(5):
            y.zero_()
            graph.replay()
            runs.append((y.clone(), h.clone()))
        torch.cuda.synchronize()
        for y2, h2 in runs[1:]:
            assert torch.equal(y2, runs[0][0]) and torch.equal(h2, runs[0][1])
        outs[flag] = runs[0]
    assert torch.equal(outs["1"][1], outs["0"][1])
    assert torch.equal(outs["1"][0], outs["0"][0])
