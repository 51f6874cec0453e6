"""The affine quantizer: codes, rounding, dequantization error, per-channel scales and the clipped STE."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p4q_engine.quant.quantizer import (
    MIN_SCALE,
    QParams,
    dequantize,
    fake_quantize,
    qparams_from_range,
    quantize,
    round_half_up,
)
from p4q_engine.quant.spec import QuantSpec


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: on a shared 2-core box, OpenMP threads waiting for each other cost ~16 ms per op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


HYP = settings(max_examples=12, deadline=None, database=None, derandomize=True)
BITS = st.sampled_from([2, 3, 4, 8])


def _data(seed: int, shape=(6, 33), spread: float = 3.0, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * spread + offset


def _qp(x: torch.Tensor, spec: QuantSpec) -> QParams:
    """Min/max qparams computed directly (not through an observer)."""
    if spec.per_channel:
        rows = x.movedim(spec.ch_axis % x.dim(), 0).reshape(x.shape[spec.ch_axis % x.dim()], -1)
        return qparams_from_range(rows.amin(1), rows.amax(1), spec)
    return qparams_from_range(x.min(), x.max(), spec)


def _spec(bits: int, signed: bool, per_channel: bool) -> QuantSpec:
    return QuantSpec(bits, signed=signed, per_channel=per_channel, ch_axis=0 if signed else -1)


# ----------------------------------------------------------------------------------------------- rounding
def test_round_half_up_ties_go_up():
    v = torch.tensor([0.5, -0.5, 2.5, -2.5, 1.5, -1.5, 0.49, -0.51, 3.0, -3.0])
    expected = torch.tensor([1.0, 0.0, 3.0, -2.0, 2.0, -1.0, 0.0, -1.0, 3.0, -3.0])
    assert torch.equal(round_half_up(v), expected)
    # torch.round is half-to-even: the project convention must differ from it on these ties.
    assert not torch.equal(round_half_up(v), torch.round(v))


def test_quantize_uses_half_up_on_exact_ties():
    spec = QuantSpec(8, signed=True)
    qp = QParams(torch.tensor(0.5), torch.tensor(0, dtype=torch.int32), spec)
    # x / scale = 0.5, 1.5, -0.5, -1.5, 2.5 exactly
    x = torch.tensor([0.25, 0.75, -0.25, -0.75, 1.25])
    assert quantize(x, qp).tolist() == [1, 2, 0, -1, 3]


# ----------------------------------------------------------------------------------------------- codes
@HYP
@given(
    seed=st.integers(0, 10_000),
    bits=BITS,
    signed=st.booleans(),
    per_channel=st.booleans(),
    scale_factor=st.sampled_from([1.0, 0.2, 3.0]),
)
def test_codes_in_range_and_dtype(seed, bits, signed, per_channel, scale_factor):
    spec = _spec(bits, signed, per_channel)
    x = _data(seed)
    # Calibrate on a narrower copy so the real data contains values that must be clipped.
    qp = _qp(x * 0.5, spec)
    codes = quantize(x * scale_factor, qp)
    assert codes.dtype == (torch.int8 if signed else torch.uint8)
    assert codes.shape == x.shape
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    # Clipping really happened at both ends for large inputs.
    if scale_factor == 3.0:
        lo_code = -spec.qmax if signed else spec.qmin  # restricted-range symmetric: -qmax is the lowest used code
        assert (codes.int() == spec.qmax).any()
        assert (codes.int() <= lo_code).any()


@HYP
@given(
    seed=st.integers(0, 10_000),
    bits=BITS,
    signed=st.booleans(),
    per_channel=st.booleans(),
    offset=st.sampled_from([0.0, 2.0, -5.0]),
)
def test_dequantization_error_at_most_half_step_inside_range(seed, bits, signed, per_channel, offset):
    spec = _spec(bits, signed, per_channel)
    x = _data(seed, offset=offset)
    qp = _qp(x, spec)  # the range covers every value of x
    err = (dequantize(quantize(x, qp), qp) - x).abs()
    scale, _ = qp.view_for(x)
    bound = scale / 2 + 1e-5 * (1 + x.abs())
    assert bool((err <= bound).all()), float((err - bound).max())


@HYP
@given(seed=st.integers(0, 10_000), bits=BITS, signed=st.booleans(), per_channel=st.booleans())
def test_quantize_dequantize_quantize_is_idempotent(seed, bits, signed, per_channel):
    spec = _spec(bits, signed, per_channel)
    x = _data(seed)
    qp = _qp(x * 0.7, spec)
    c1 = quantize(x, qp)
    c2 = quantize(dequantize(c1, qp), qp)
    assert torch.equal(c1, c2)
    y = dequantize(c1, qp)
    assert torch.equal(dequantize(quantize(y, qp), qp), y)


@HYP
@given(seed=st.integers(0, 10_000), bits=BITS, signed=st.booleans(), per_channel=st.booleans())
def test_fake_quantize_equals_dequantize_of_quantize(seed, bits, signed, per_channel):
    spec = _spec(bits, signed, per_channel)
    x = _data(seed)
    qp = _qp(x * 0.8, spec)
    fq = fake_quantize(x, qp)
    assert fq.dtype == x.dtype and fq.shape == x.shape
    torch.testing.assert_close(fq, dequantize(quantize(x, qp), qp), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------- qparams
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_signed_is_symmetric_restricted_range(bits):
    spec = QuantSpec(bits, signed=True)
    qp = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), spec)
    assert int(qp.zero_point) == 0
    assert float(qp.scale) == pytest.approx(3.0 / (2 ** (bits - 1) - 1))
    codes = quantize(torch.tensor([-3.0, 3.0, 0.0]), qp)
    assert codes.tolist() == [-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1, 0]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("lo, hi", [(-1.0, 3.0), (0.5, 4.0), (-7.0, -0.25), (-0.3, 0.3), (-1.234, 0.017)])
def test_unsigned_zero_exactly_representable(bits, lo, hi):
    spec = QuantSpec(bits, signed=False)
    qp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)
    assert qp.zero_point.dtype == torch.int32
    assert spec.qmin <= int(qp.zero_point) <= spec.qmax
    assert float(qp.scale) == pytest.approx((max(hi, 0.0) - min(lo, 0.0)) / (2**bits - 1))
    zero = torch.zeros(5)
    assert torch.equal(quantize(zero, qp).int(), torch.full((5,), int(qp.zero_point), dtype=torch.int32))
    assert torch.equal(dequantize(quantize(zero, qp), qp), zero)
    assert torch.equal(fake_quantize(zero, qp), zero)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("channel", [0, 3, 5])
def test_per_channel_scales_are_per_channel(signed, channel):
    spec = QuantSpec(4, signed=signed, per_channel=True, ch_axis=0)
    x = _data(11, shape=(6, 40))
    if not signed:
        x = x.abs()  # lo = 0 after widening, so the scale is exactly proportional to the channel max
    qp1 = _qp(x, spec)
    x2 = x.clone()
    x2[channel] *= 10.0
    qp2 = _qp(x2, spec)
    assert qp1.scale.shape == (6,)
    others = [c for c in range(6) if c != channel]
    assert torch.equal(qp2.scale[others], qp1.scale[others])
    assert torch.equal(qp2.zero_point[others], qp1.zero_point[others])
    assert float(qp2.scale[channel] / qp1.scale[channel]) == pytest.approx(10.0, rel=1e-5)
    # Codes of the other channels are unchanged; the scaled channel gets the same codes as before.
    assert torch.equal(quantize(x2, qp2), quantize(x, qp1))


def test_per_channel_along_last_axis():
    spec = QuantSpec(8, signed=False, per_channel=True, ch_axis=-1)
    x = _data(3, shape=(2, 5, 7)).abs()
    x[..., 2] *= 100.0
    qp = _qp(x, spec)
    assert qp.scale.shape == (7,)
    assert int(qp.scale.argmax()) == 2
    assert qp.view_for(x)[0].shape == (1, 1, 7)
    codes = quantize(x, qp)
    assert int(codes[..., 2].max()) == 255 and int(codes[..., 0].max()) == 255


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_all_zero_channel_does_not_produce_nan(signed, bits):
    spec = QuantSpec(bits, signed=signed, per_channel=True, ch_axis=0)
    x = _data(5, shape=(4, 16))
    x[1] = 0.0
    qp = _qp(x, spec)
    assert torch.isfinite(qp.scale).all() and (qp.scale >= MIN_SCALE).all()
    for out in (dequantize(quantize(x, qp), qp), fake_quantize(x, qp)):
        assert torch.isfinite(out).all()
        assert torch.equal(out[1], torch.zeros(16))
    # Per tensor, an all-zero tensor too.
    spec_t = QuantSpec(bits, signed=signed)
    z = torch.zeros(3, 3)
    qpt = qparams_from_range(z.min(), z.max(), spec_t)
    assert torch.equal(fake_quantize(z, qpt), z)


def test_non_finite_range_is_rejected():
    from p4q_engine.errors import CalibrationError

    spec = QuantSpec(8, signed=False)
    with pytest.raises(CalibrationError):
        qparams_from_range(torch.tensor(float("nan")), torch.tensor(1.0), spec)
    with pytest.raises(CalibrationError):
        qparams_from_range(torch.tensor(0.0), torch.tensor(float("inf")), spec)


def test_per_channel_mismatch_is_rejected():
    from p4q_engine.errors import CalibrationError

    spec = QuantSpec(4, signed=True, per_channel=True)
    qp = _qp(_data(0, shape=(4, 8)), spec)
    with pytest.raises(CalibrationError):
        quantize(_data(1, shape=(5, 8)), qp)


# ----------------------------------------------------------------------------------------------- STE
@HYP
@given(seed=st.integers(0, 10_000), bits=BITS, signed=st.booleans(), per_channel=st.booleans())
def test_ste_gradient_is_one_inside_and_zero_when_clipped(seed, bits, signed, per_channel):
    spec = _spec(bits, signed, per_channel)
    base = _data(seed)
    qp = _qp(base * 0.5, spec)  # narrow range: many values get clipped
    x = base.clone().requires_grad_(True)
    fake_quantize(x, qp).sum().backward()
    grad = x.grad
    # Independent "inside" mask: the unclipped code lies in [qmin, qmax].
    scale, zp = qp.view_for(base)
    v = torch.floor(base / scale + 0.5) + zp
    inside = (v >= spec.qmin) & (v <= spec.qmax)
    assert inside.any() and (~inside).any()
    assert torch.equal(grad, inside.float())
    assert grad.abs().sum() > 0


def test_ste_gradient_scales_upstream_gradient():
    spec = QuantSpec(4, signed=True)
    x = torch.linspace(-2, 2, 41, requires_grad=True)
    qp = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), spec)
    up = torch.arange(41, dtype=torch.float32)
    (fake_quantize(x, qp) * up).sum().backward()
    # scale = 1/7; codes -8..7 are legal, so x/scale must round into [-8, 7]: x in [-8.5/7, 7.5/7).
    t = x.detach() * 7
    inside = (t >= -8.5) & (t < 7.5)
    assert torch.allclose(x.grad, up * inside.float())
    assert x.grad[20] == up[20] and x.grad[0] == 0 and x.grad[-1] == 0
    assert x.grad[8] == up[8]  # x = -1.2 rounds to code -8: legal (unused by the symmetric scale, but not clipped)
