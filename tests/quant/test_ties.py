"""The float-tie rule every code-parity test uses (``p4q_engine.quant.ties``)."""

from __future__ import annotations

import pytest
import torch

from p4q_engine.quant.ties import TIE_EPS, assert_codes_equal_or_ties, boundary_distance, untied_mismatches


def _codes(v: torch.Tensor) -> torch.Tensor:
    return torch.floor(v + 0.5).to(torch.int32)


def test_boundary_distance():
    v = torch.tensor([2.5, 2.4999, 3.0, -1.5, -1.2])
    assert torch.allclose(
        boundary_distance(v), torch.tensor([0.0, 1e-4, 0.5, 0.0, 0.3], dtype=torch.float64), atol=1e-6
    )


def test_identical_codes_pass():
    v = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 50
    assert assert_codes_equal_or_ties(_codes(v), _codes(v), v) == 0


def test_a_one_step_difference_at_a_tie_passes():
    v = torch.tensor([10.5 - TIE_EPS / 2, 3.2, 7.5 + TIE_EPS / 4])
    other = _codes(v).clone()
    other[0] += 1  # the other evaluation rounded 10.4995 up
    other[2] -= 1
    assert assert_codes_equal_or_ties(other, _codes(v), v) == 2


@pytest.mark.parametrize("change,v0", [(1, 10.4), (2, 10.5), (-1, 10.2)])
def test_other_differences_fail(change, v0):
    v = torch.tensor([v0, 3.2])
    other = _codes(v).clone()
    other[0] += change
    assert bool(untied_mismatches(other, _codes(v), v).any())
    with pytest.raises(AssertionError, match="without a float tie"):
        assert_codes_equal_or_ties(other, _codes(v), v)


def test_a_one_percent_scale_error_is_never_a_tie():
    """Codes of the same values at a 1% different scale: many differ, none of them at a tie."""
    v = torch.rand(10000, generator=torch.Generator().manual_seed(1)) * 255
    with pytest.raises(AssertionError, match="without a float tie"):
        assert_codes_equal_or_ties(_codes(v * 1.01), _codes(v), v)
