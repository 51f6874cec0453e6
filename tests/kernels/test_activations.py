"""The epilogue GELU (``kernels/activations.py``) against the exact erf GELU in float64: within its stated bound on
a dense grid and at the extremes, on the interpreter and the GPU; the bound check rejects a slightly wrong
approximation (positive control)."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from p4q_engine.kernels import activations
from p4q_engine.kernels.activations import ABS_ERR_PER_UNIT, gelu, gelu_reference


@triton.jit
def _gelu_kernel(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(o_ptr + offs, gelu(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


def run_gelu(y: torch.Tensor, device: str) -> torch.Tensor:
    x = y.float().to(device)
    out = torch.full_like(x, float("nan"))
    _gelu_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out.cpu()


def excess(approx: torch.Tensor, y: torch.Tensor) -> float:
    """Largest ``|approx - exact| / max(|y|, 1)`` over the finite points, relative to the bound (> 1: outside)."""
    exact = torch.nn.functional.gelu(y.double())
    err = (approx.double() - exact).abs() / y.double().abs().clamp_min(1.0)
    return float(err.max()) / ABS_ERR_PER_UNIT


def grid(n: int = 200_001) -> torch.Tensor:
    y = torch.cat([torch.linspace(-12, 12, n), torch.linspace(-0.01, 0.01, 2001), torch.tensor([0.0, -0.0])])
    return y.float()  # the kernel's inputs are fp32: compare against the exact GELU of those fp32 values


def test_gelu_within_bound(device):
    y = grid()
    assert excess(run_gelu(y, device), y) <= 1.0


def test_gelu_matches_its_torch_twin(device):
    """The kernel computes what ``gelu_reference`` computes (fp32, a few ulps of ``y`` apart: FMA contraction)."""
    y = grid(20_001)
    torch.testing.assert_close(run_gelu(y, device), gelu_reference(y), rtol=2e-6, atol=2e-7)


def test_gelu_extremes(device):
    y = torch.tensor([float("inf"), -float("inf"), 1e30, -1e30, 40.0, -40.0, 1e-30, -1e-30, float("nan")])
    out = run_gelu(y, device)
    assert out[0] == float("inf") and math.isnan(out[1])  # as y * (1 + erf(y / sqrt 2)): -inf * 0
    assert out[2] == 1e30 and out[3] == 0.0 and out[4] == 40.0 and out[5] == 0.0
    assert abs(float(out[6]) - 5e-31) <= 1e-36 and abs(float(out[7]) + 5e-31) <= 1e-36
    assert math.isnan(out[8])


def test_bound_catches_a_wrong_coefficient(monkeypatch):
    """Positive control: a 1e-4 relative change of one coefficient (an erf off by ~1e-5) is outside the bound."""
    y = grid(20_001)
    assert excess(gelu_reference(y), y) <= 1.0
    monkeypatch.setattr(activations, "A2", triton.language.constexpr(float(activations.A2.value) * (1 + 1e-4)))
    assert excess(gelu_reference(y), y) > 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_gelu_dense():
    """The GPU's arithmetic (FMA contraction, ``ex2.approx``, the fp32 reciprocal) on 24M points, extremes included."""
    y = torch.cat([torch.linspace(-12, 12, 24_000_001), torch.tensor([float("inf"), -40.0, 40.0])]).float()
    out = run_gelu(y, "cuda")
    assert excess(out[:-3], y[:-3]) <= 1.0
    assert out[-3] == float("inf") and out[-2] == 0.0 and out[-1] == 40.0
