"""Observers: known answers for min/max, EMA and percentile ranges, and OMSE optimality."""
import pytest
import torch

from p4q_engine.errors import CalibrationError, ConfigError
from p4q_engine.quant.observers import OBSERVERS, make_observer
from p4q_engine.quant.quantizer import fake_quantize, qparams_from_range
from p4q_engine.quant.spec import QuantSpec, act_spec, weight_spec


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: on a shared 2-core box, OpenMP threads waiting for each other cost ~16 ms per op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mse(x: torch.Tensor, lo, hi, spec: QuantSpec) -> float:
    """Per-tensor quantization MSE of x for clipping range [lo, hi] (independent of the observers)."""
    qp = qparams_from_range(torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32), spec)
    return float((fake_quantize(x, qp) - x).pow(2).mean())


def _best_on_grid(x: torch.Tensor, spec: QuantSpec, grid: torch.Tensor) -> float:
    """Smallest per-tensor MSE over clipping ranges [a * min(x), a * max(x)], a in grid (all candidates at once)."""
    row_spec = QuantSpec(spec.bits, spec.signed, per_channel=True, ch_axis=0)
    best = float("inf")
    for a in grid.split(100):
        qp = qparams_from_range(a * x.min(), a * x.max(), row_spec)
        xs = x.reshape(1, -1).expand(a.numel(), -1)
        best = min(best, float((fake_quantize(xs, qp) - xs).pow(2).mean(dim=1).min()))
    return best


# ----------------------------------------------------------------------------------------------- min/max
@pytest.mark.parametrize("signed", [True, False])
def test_minmax_known_range_over_batches(signed):
    spec = QuantSpec(8, signed=signed)
    obs = make_observer("minmax", spec)
    b1 = torch.rand(50, generator=_gen(0)) * 2 - 1  # in (-1, 1)
    b2 = torch.rand(50, generator=_gen(1)) * 2 - 1
    b1[7], b2[3] = -4.25, 6.5
    obs.observe(b1)
    obs.observe(b2.view(5, 10))
    lo, hi = obs.compute_range()
    assert lo.shape == () and hi.shape == ()
    assert float(lo) == -4.25 and float(hi) == 6.5
    qp = obs.qparams()
    expected = 6.5 / 127 if signed else (6.5 + 4.25) / 255
    assert float(qp.scale) == pytest.approx(expected)


def test_minmax_per_channel():
    spec = weight_spec(4)
    w = torch.randn(5, 12, generator=_gen(2))
    obs = make_observer("minmax", spec)
    obs.observe(w)
    lo, hi = obs.compute_range()
    assert torch.equal(lo, w.amin(1)) and torch.equal(hi, w.amax(1))


def test_minmax_per_channel_last_axis():
    spec = act_spec(8, per_channel=True)
    x = torch.randn(3, 4, 6, generator=_gen(3))
    obs = make_observer("minmax", spec)
    obs.observe(x)
    lo, hi = obs.compute_range()
    assert torch.equal(lo, x.reshape(-1, 6).amin(0)) and torch.equal(hi, x.reshape(-1, 6).amax(0))


# ----------------------------------------------------------------------------------------------- EMA
@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99])
def test_ema_two_batches_hand_formula(momentum):
    spec = QuantSpec(8, signed=False)
    obs = make_observer("ema", spec, momentum=momentum)
    b1 = torch.randn(100, generator=_gen(4))
    b2 = torch.randn(100, generator=_gen(5)) * 3 + 1
    obs.observe(b1)
    obs.observe(b2)
    lo, hi = obs.compute_range()
    exp_lo = momentum * b1.min() + (1 - momentum) * b2.min()
    exp_hi = momentum * b1.max() + (1 - momentum) * b2.max()
    assert float(lo) == pytest.approx(float(exp_lo), rel=1e-6)
    assert float(hi) == pytest.approx(float(exp_hi), rel=1e-6)


def test_ema_three_batches_and_first_batch_initialises():
    spec = QuantSpec(8, signed=False)
    obs = make_observer("ema", spec, momentum=0.8)
    bs = [torch.randn(64, generator=_gen(10 + i)) * (i + 1) for i in range(3)]
    obs.observe(bs[0])
    assert float(obs.compute_range()[1]) == pytest.approx(float(bs[0].max()))
    obs.observe(bs[1])
    obs.observe(bs[2])
    exp = float(bs[0].max())
    for b in bs[1:]:
        exp = 0.8 * exp + 0.2 * float(b.max())
    assert float(obs.compute_range()[1]) == pytest.approx(exp, rel=1e-6)


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
def test_ema_bad_momentum(momentum):
    with pytest.raises(ConfigError):
        make_observer("ema", QuantSpec(8, signed=False), momentum=momentum)


# ----------------------------------------------------------------------------------------------- percentile
@pytest.mark.parametrize("percentile", [99.0, 99.9, 95.0, 75.0])
def test_percentile_on_uniform_grid(percentile):
    n = 10_001
    x = torch.arange(n, dtype=torch.float32)
    x = x[torch.randperm(n, generator=_gen(6))]  # order must not matter
    obs = make_observer("percentile", QuantSpec(8, signed=False), percentile=percentile)
    obs.observe(x)
    lo, hi = obs.compute_range()
    p = percentile / 100
    assert abs(float(hi) - p * (n - 1)) <= 1.0
    assert abs(float(lo) - (1 - p) * (n - 1)) <= 1.0


def test_percentile_ignores_outlier_but_minmax_does_not():
    n = 1001
    x = torch.arange(n, dtype=torch.float32)
    x[-1] = 1e6
    spec = QuantSpec(8, signed=False)
    pct = make_observer("percentile", spec, percentile=99.0)
    mm = make_observer("minmax", spec)
    pct.observe(x)
    mm.observe(x)
    assert float(mm.compute_range()[1]) == 1e6
    hi = float(pct.compute_range()[1])
    assert abs(hi - 0.99 * (n - 1)) <= 1.0
    assert float(pct.qparams().scale) < float(mm.qparams().scale) / 500


def test_percentile_averages_batches():
    spec = QuantSpec(8, signed=False)
    obs = make_observer("percentile", spec, percentile=90.0)
    a = torch.arange(101, dtype=torch.float32)  # 90th pct = 90, 10th = 10
    obs.observe(a)
    obs.observe(a * 2)  # 180, 20
    lo, hi = obs.compute_range()
    assert float(hi) == pytest.approx(135.0, abs=1e-3)
    assert float(lo) == pytest.approx(15.0, abs=1e-3)


def test_percentile_subsampled_close_to_exact():
    spec = QuantSpec(8, signed=False)
    x = torch.randn(50_000, generator=_gen(7))
    exact = make_observer("percentile", spec, percentile=99.0)
    sub = make_observer("percentile", spec, percentile=99.0, max_samples=20_000)
    exact.observe(x)
    sub.observe(x)
    assert float(exact.compute_range()[1]) == pytest.approx(float(torch.quantile(x, 0.99)), rel=1e-5)
    assert float(sub.compute_range()[1]) == pytest.approx(float(exact.compute_range()[1]), abs=0.1)


@pytest.mark.parametrize("percentile", [50.0, 10.0, 100.5])
def test_percentile_bad_value(percentile):
    with pytest.raises(ConfigError):
        make_observer("percentile", QuantSpec(8, signed=False), percentile=percentile)


# ----------------------------------------------------------------------------------------------- OMSE
def _outlier_data(seed: int) -> torch.Tensor:
    x = torch.randn(20_000, generator=_gen(seed))
    x[:3] = torch.tensor([25.0, -18.0, 30.0])
    return x[torch.randperm(x.numel(), generator=_gen(seed + 1))]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_omse_beats_minmax_and_matches_fine_grid(bits, signed):
    spec = QuantSpec(bits, signed=signed)
    x = _outlier_data(bits * 7 + signed)
    omse = make_observer("omse", spec)
    for chunk in x.chunk(2):
        omse.observe(chunk)
    lo, hi = omse.compute_range()
    lo, hi = float(lo), float(hi)
    xmin, xmax = float(x.min()), float(x.max())
    # Strictly inside the min/max range (the outliers are clipped) ...
    assert xmin < lo < 0 < hi < xmax
    assert hi < xmax - 1e-3 and lo > xmin + 1e-3
    # ... and no worse than min/max.
    err = _mse(x, lo, hi, spec)
    err_mm = _mse(x, xmin, xmax, spec)
    assert err <= err_mm
    if bits <= 4:
        assert err < 0.5 * err_mm  # outliers make min/max far from optimal at low bits
    # No candidate ratio on an independent fine grid is more than 1% better.
    assert err <= _best_on_grid(x, spec, torch.linspace(0.002, 1.0, 500)) * 1.01


def test_omse_per_channel_weights():
    spec = weight_spec(4)
    scales = torch.tensor([0.01, 0.1, 1.0, 10.0])
    w = torch.randn(4, 256, generator=_gen(8)) * scales[:, None]
    w[:, 0] *= 8.0  # one outlier per channel
    obs = make_observer("omse", spec)
    obs.observe(w)
    lo, hi = obs.compute_range()
    assert lo.shape == (4,) and hi.shape == (4,)
    amax = torch.maximum(lo.abs(), hi.abs())
    # Ranges follow the channel scales (monotone, each ~10x the previous).
    ratios = amax[1:] / amax[:-1]
    assert ((ratios > 3) & (ratios < 30)).all(), ratios
    # Every channel clips (outliers) and is inside its own min/max.
    assert (hi < w.amax(1)).all() and (lo > w.amin(1)).all()
    # Each channel's range is (near) MSE-optimal for that channel alone.
    for c in range(4):
        row_spec = QuantSpec(4, signed=True)
        row = w[c]
        err = _mse(row, lo[c], hi[c], row_spec)
        best = _best_on_grid(row, row_spec, torch.linspace(0.01, 1, 200))
        assert err <= best * 1.02, (c, err, best)
        assert err <= _mse(row, row.min(), row.max(), row_spec)


def test_omse_per_channel_independent_of_other_channels():
    spec = weight_spec(3)
    w = torch.randn(3, 128, generator=_gen(9))
    obs1 = make_observer("omse", spec)
    obs1.observe(w)
    w2 = w.clone()
    w2[1] *= 50.0
    obs2 = make_observer("omse", spec)
    obs2.observe(w2)
    lo1, hi1 = obs1.compute_range()
    lo2, hi2 = obs2.compute_range()
    assert torch.allclose(hi2[[0, 2]], hi1[[0, 2]]) and torch.allclose(lo2[[0, 2]], lo1[[0, 2]])
    assert float(hi2[1] / hi1[1]) == pytest.approx(50.0, rel=1e-3)


@pytest.mark.parametrize("n_grid", [1, 0])
def test_omse_bad_grid(n_grid):
    with pytest.raises(ConfigError):
        make_observer("omse", QuantSpec(4, signed=True), n_grid=n_grid)


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", sorted(OBSERVERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(name, bad):
    obs = make_observer(name, QuantSpec(8, signed=False))
    x = torch.randn(32, generator=_gen(12))
    x[5] = bad
    with pytest.raises(CalibrationError):
        obs.observe(x)


@pytest.mark.parametrize("name", sorted(OBSERVERS))
@pytest.mark.parametrize("spec", [QuantSpec(8, signed=False), weight_spec(4)])
def test_qparams_before_data_raises(name, spec):
    obs = make_observer(name, spec)
    with pytest.raises(CalibrationError):
        obs.qparams()
    with pytest.raises(CalibrationError):
        obs.compute_range()
    obs.observe(torch.empty(0))  # empty tensors are ignored, still no data
    with pytest.raises(CalibrationError):
        obs.qparams()


@pytest.mark.parametrize("name", ["mse", "", "min-max", "kl"])
def test_unknown_observer_raises(name):
    with pytest.raises(ConfigError):
        make_observer(name, QuantSpec(8, signed=False))


@pytest.mark.parametrize("name", ["MinMax", "OMSE", "Percentile", "ema"])
def test_observer_names_case_insensitive(name):
    assert make_observer(name, QuantSpec(8, signed=False)).name == name.lower()


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_channel_count_change_raises(name):
    obs = make_observer(name, weight_spec(4))
    obs.observe(torch.randn(4, 8, generator=_gen(13)))
    with pytest.raises(CalibrationError):
        obs.observe(torch.randn(5, 8, generator=_gen(14)))


@pytest.mark.parametrize("name", sorted(OBSERVERS))
@pytest.mark.parametrize("signed", [True, False])
def test_every_observer_range_within_minmax_and_qparams_valid(name, signed):
    spec = QuantSpec(4, signed=signed)
    x = torch.randn(4000, generator=_gen(15)) * 2 + 0.5
    obs = make_observer(name, spec)
    for c in x.chunk(4):
        obs.observe(c)
    lo, hi = obs.compute_range()
    assert float(x.min()) - 1e-6 <= float(lo) <= float(hi) <= float(x.max()) + 1e-6
    qp = obs.qparams()
    assert float(qp.scale) > 0 and spec.qmin <= int(qp.zero_point) <= spec.qmax
