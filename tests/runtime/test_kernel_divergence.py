"""The GPU-vs-CPU divergence tracer's tie rule (``p4q_engine.runtime.kernel_divergence``) on hand-made codes.

The attention output may differ for two reasons that are both float ties: its own value on a rounding boundary
(the kernel multiplies by ``1 / s_o``), or a probability code that flipped on a tie inside the kernel. A site where
some outputs differ for one reason and others for the other is still a tie; one untied difference is not."""

from __future__ import annotations

import torch

from p4q_engine.runtime import kernel_divergence as kd


def _cpu_call(v: torch.Tensor) -> tuple:
    return (v, 0, 0, 255)


def test_own_ties_are_not_left_for_the_probability_rule():
    v = torch.tensor([10.2, 20.5000001, 30.7, 40.1])  # the second is on a tie of its own value
    gpu = (torch.tensor([10, 21, 31, 40]) - 128).to(torch.int8)  # reference codes: 10, 21, 31, 40 ...
    assert kd._compare(gpu, _cpu_call(v), lambda t: t) is None
    gpu = (torch.tensor([10, 20, 31, 40]) - 128).to(torch.int8)  # ... the tie rounded the other way
    r = kd._compare(gpu, _cpu_call(v), lambda t: t)
    assert r["tie"] and not bool(r["diff"].any())
    gpu = (torch.tensor([10, 20, 32, 40]) - 128).to(torch.int8)  # + one untied difference (30.7 -> 32)
    r = kd._compare(gpu, _cpu_call(v), lambda t: t)
    assert not r["tie"] and r["diff"].tolist() == [False, False, True, False]


def _attention_cpu_sites(p_over_sp: torch.Tensor) -> list:
    """The CPU site list of one block as ``_attention_flip_is_tie`` reads it: index 1 + 3 is the p site."""
    sites = [None] * (1 + kd._CPU_PER_BLOCK)
    sites[4] = (p_over_sp, 0, 0, 255)
    return sites


def test_attention_rows_with_a_probability_tie_excuse_only_their_own_outputs():
    b, heads, length, hd = 1, 1, 2, 2
    p = torch.full((b, heads, length, length), 100.2)
    p[0, 0, 1, 0] = 50.5000002  # query row 1 has a probability on a tie; row 0 has none
    cpu = _attention_cpu_sites(p)
    row1 = torch.zeros(b, length, heads * hd, dtype=torch.bool)
    row1[0, 1, 0] = True
    assert kd._attention_flip_is_tie(row1.reshape(-1), cpu, "block 0 attention output", b)
    row0 = torch.zeros_like(row1)
    row0[0, 0, 1] = True
    assert not kd._attention_flip_is_tie(row0.reshape(-1), cpu, "block 0 attention output", b)
