"""Calibrators: they watch a tensor over calibration batches and choose its clipping range.

Each observer accumulates statistics with :meth:`Observer.observe` and turns them into a range with
:meth:`Observer.compute_range`; :meth:`Observer.qparams` maps the range onto a :class:`QuantSpec`. Per-channel specs
reduce over every axis but ``spec.ch_axis``. Observers are looked up by name in :data:`OBSERVERS`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from p4q_engine.errors import CalibrationError, ConfigError
from p4q_engine.quant.quantizer import QParams, fake_quantize, qparams_from_range
from p4q_engine.quant.spec import QuantSpec


def _rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``x`` as ``[C, N]`` (per channel) or ``[1, N]`` (per tensor), in float32."""
    x = x.detach().float()
    if spec.per_channel:
        return x.movedim(spec.ch_axis % x.dim(), 0).reshape(x.shape[spec.ch_axis % x.dim()], -1)
    return x.reshape(1, -1)


def _squeeze(v: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return v if spec.per_channel else v.reshape(())


class Observer:
    """Base class: checks inputs, tracks the exact min/max, and converts a range to :class:`QParams`."""

    name = "base"

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.min: Optional[torch.Tensor] = None
        self.max: Optional[torch.Tensor] = None
        self.batches = 0

    def observe(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        rows = _rows(x, self.spec)
        if not torch.isfinite(rows).all():
            raise CalibrationError(f"{self.name} observer saw NaN or inf values during calibration")
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        if self.min is not None and self.min.shape != lo.shape:
            raise CalibrationError(f"observer expected {self.min.numel()} channels, got {lo.numel()}")
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self._update(rows, lo, hi)
        self.batches += 1

    def _update(self, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Subclasses accumulate their own statistics here."""

    def _require_data(self) -> None:
        if self.min is None or self.max is None:
            raise CalibrationError(f"{self.name} observer has seen no data; run calibration first")

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data()
        return _squeeze(self.min, self.spec), _squeeze(self.max, self.spec)  # type: ignore[arg-type]

    def qparams(self) -> QParams:
        lo, hi = self.compute_range()
        return qparams_from_range(lo, hi, self.spec)


class MinMaxObserver(Observer):
    """Range = the global minimum and maximum seen over all calibration batches."""

    name = "minmax"


class EMAObserver(Observer):
    """Range = exponential moving average of per-batch min/max (Jacob et al., 2018), ``momentum`` on the old value."""

    name = "ema"

    def __init__(self, spec: QuantSpec, momentum: float = 0.9) -> None:
        super().__init__(spec)
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"EMA momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.ema_min: Optional[torch.Tensor] = None
        self.ema_max: Optional[torch.Tensor] = None

    def _update(self, rows, lo, hi) -> None:
        if self.ema_min is None:
            self.ema_min, self.ema_max = lo, hi
        else:
            m = self.momentum
            self.ema_min = m * self.ema_min + (1 - m) * lo
            self.ema_max = m * self.ema_max + (1 - m) * hi

    def compute_range(self):
        self._require_data()
        return _squeeze(self.ema_min, self.spec), _squeeze(self.ema_max, self.spec)


def _subsample(rows: torch.Tensor, cap: int, gen: torch.Generator) -> torch.Tensor:
    """At most ``cap`` columns of ``rows`` chosen at random with a fixed generator (deterministic calibration)."""
    n = rows.shape[1]
    if n <= cap:
        return rows
    idx = torch.randperm(n, generator=gen)[:cap].to(rows.device)
    return rows[:, idx]


class PercentileObserver(Observer):
    """Range = the ``(100 - p)``-th and ``p``-th percentiles of each batch, averaged over batches (Li et al., 2019).

    Percentiles are exact for tensors up to ``max_samples`` values per channel and taken on a fixed random subsample
    above that (``torch.quantile`` cannot take more than 2^24 elements).
    """

    name = "percentile"

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, max_samples: int = 1 << 22) -> None:
        super().__init__(spec)
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self.max_samples = max_samples
        self._gen = torch.Generator().manual_seed(0)
        self._sum_lo: Optional[torch.Tensor] = None
        self._sum_hi: Optional[torch.Tensor] = None

    def _update(self, rows, lo, hi) -> None:
        sample = _subsample(rows, self.max_samples, self._gen)
        q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0], device=sample.device)
        qs = torch.quantile(sample, q, dim=1)  # [2, C]
        self._sum_lo = qs[0] if self._sum_lo is None else self._sum_lo + qs[0]
        self._sum_hi = qs[1] if self._sum_hi is None else self._sum_hi + qs[1]

    def compute_range(self):
        self._require_data()
        return _squeeze(self._sum_lo / self.batches, self.spec), _squeeze(self._sum_hi / self.batches, self.spec)


class OMSEObserver(Observer):
    """Range minimising the quantization MSE (OMSE, Choukroun et al., 2019).

    The paper's Eq. 4-5 are garbled (they set the range from the variance and round the variance into a zero
    point), so this implements what OMSE actually is: candidate clipping ranges ``[a * min, a * max]``, ``a`` in
    ``(0, 1]``, are scored by ``||x - Q(x)||^2`` on the calibration data and the best is kept - independently per
    channel for per-channel specs. The search is coarse-to-fine: ``n_grid`` evenly spaced values of ``a``, then
    ``n_grid`` more within one coarse step of the best (resolution ``1 / n_grid^2``, 2 * n_grid evaluations).
    Per-tensor activations are scored on a deterministic subsample of at most ``max_samples`` values
    (``samples_per_batch`` per batch) plus each batch's exact extremes, so memory stays bounded on ViT-B/32-sized
    calibration sets.
    """

    name = "omse"

    def __init__(
        self, spec: QuantSpec, n_grid: int = 20, samples_per_batch: int = 1 << 17, max_samples: int = 1 << 21
    ) -> None:
        super().__init__(spec)
        if n_grid < 2:
            raise ConfigError(f"OMSE needs n_grid >= 2, got {n_grid}")
        self.n_grid = n_grid
        self.samples_per_batch = samples_per_batch
        self.max_samples = max_samples
        self._gen = torch.Generator().manual_seed(0)
        self._samples: list[torch.Tensor] = []

    def _update(self, rows, lo, hi) -> None:
        cap = rows.shape[1] if self.spec.per_channel else self.samples_per_batch
        sample = _subsample(rows, cap, self._gen)
        # Re-append the exact extremes only when subsampling may have dropped them: duplicating them in complete
        # data would double their clipping error and bias the search towards too wide a range.
        if sample.shape[1] < rows.shape[1]:
            sample = torch.cat([sample, lo[:, None], hi[:, None]], dim=1)
        self._samples.append(sample)

    def _sq_error(self, data: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Per-row ``||x - Q(x)||^2`` for clipping ranges ``[a * min, a * max]`` (``a`` per row)."""
        spec = QuantSpec(self.spec.bits, self.spec.signed, per_channel=True, ch_axis=0)
        qp = qparams_from_range(self.min * a, self.max * a, spec)
        s, zp = qp.scale[:, None], qp.zero_point[:, None].float()
        q = torch.clamp(torch.floor(data / s + 0.5) + zp, spec.qmin, spec.qmax)
        return ((q - zp) * s - data).pow_(2).sum(dim=1)

    def _search(self, data: torch.Tensor, centres: torch.Tensor, step: float) -> tuple[torch.Tensor, torch.Tensor]:
        best_err = torch.full_like(centres, float("inf"))
        best_a = centres.clone()
        for k in range(self.n_grid):
            a = torch.clamp(centres + step * (k - (self.n_grid - 1) / 2), 1e-4, 1.0)
            err = self._sq_error(data, a)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_a = torch.where(better, a, best_a)
        return best_a, best_err

    def compute_range(self):
        self._require_data()
        data = _subsample(torch.cat(self._samples, dim=1), self.max_samples, self._gen)
        coarse = 1.0 / self.n_grid
        a, _ = self._search(data, torch.full_like(self.min, 0.5 + coarse / 2), coarse)
        a, _ = self._search(data, a, 2 * coarse / self.n_grid)
        return _squeeze(self.min * a, self.spec), _squeeze(self.max * a, self.spec)


#: Calibrators by name, as accepted by ``--observer``.
OBSERVERS: dict[str, Callable[..., Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "omse": OMSEObserver,
}


def make_observer(name: str, spec: QuantSpec, **kwargs) -> Observer:
    """Build the observer registered under ``name`` (case-insensitive)."""
    try:
        cls = OBSERVERS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown observer {name!r}; choose from {', '.join(OBSERVERS)}") from None
    return cls(spec, **kwargs)
