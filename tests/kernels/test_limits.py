"""Operands past the kernels' int32 offsets are a clear error before any launch (``p4q_engine.kernels.limits``).

Meta tensors stand in for the huge operands: nothing is allocated, and a check that ran after an allocation or a
launch would fail on them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from p4q_engine.kernels import limits
from p4q_engine.kernels.layernorm import layernorm_quant, quantize_rows
from p4q_engine.kernels.qattention import AttnSites, qattention
from p4q_engine.kernels.qgemm import qgemm

BIG = limits.MAX_ELEMENTS + 1


def test_qattention_rejects_a_qkv_past_int32():
    qkv = torch.empty(BIG // (3 * 64) + 1, 1, 3 * 64, dtype=torch.int8, device="meta")
    sites = AttnSites((0.1, 128), (0.1, 128), (0.1, 128), (1 / 255, 0), (0.1, 128))
    with pytest.raises(ValueError, match="qkv holds .* int32"):
        qattention(qkv, 1, sites)


def test_qgemm_rejects_an_output_past_int32():
    a = torch.empty(BIG // 4096 + 1, 64, dtype=torch.int8, device="meta")
    with pytest.raises(ValueError, match="output holds .* int32"):
        qgemm(a, 0.1, 128, SimpleNamespace(k=64, n=4096))


@pytest.mark.parametrize("fn", [quantize_rows, layernorm_quant])
def test_row_kernels_reject_inputs_past_int32(fn):
    x = torch.empty(BIG // 1024 + 1, 1024, device="meta")
    args = (torch.empty(1024, device="meta"), torch.empty(1024, device="meta"), 1e-5) if fn is layernorm_quant else ()
    with pytest.raises(ValueError, match="x holds .* int32"):
        fn(x, *args, 0.1, 128)


def test_below_the_limit_passes_the_check():
    limits.check_extent("k", x=limits.MAX_ELEMENTS)
