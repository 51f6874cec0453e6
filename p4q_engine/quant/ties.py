"""When two correct float evaluations may round a quantization code differently: the *float tie*.

Every code is ``floor(v + 0.5)`` of a pre-rounding value ``v = x / scale``. Two correct computations of ``x`` (an
exact integer accumulation scaled once vs a dequantized float matmul; a Triton ``erf`` vs torch's) agree to a few
float32 ulps, so a ``v`` that lies that close to a ``.5`` boundary may round either way. Such a code is one step
apart and nothing is wrong; any other difference is a bug. Parity tests and the divergence tracer
(:mod:`p4q_engine.runtime.divergence`) decide with the functions below, so "a tie" means one thing everywhere.
"""

from __future__ import annotations

import torch

#: How close (in code units) to a ``.5`` boundary a pre-rounding value must be for a one-step code difference to
#: count as a float tie. float32 carries ~7 digits, so for |v| <= 255 a few ulps are <= 1e-4 code units; 1e-3 leaves
#: room for transcendental (erf/exp) ulps and stays 500x below the 0.5 a real bug (a 1% scale error at v ~ 50) moves.
TIE_EPS = 1e-3


def boundary_distance(v: torch.Tensor) -> torch.Tensor:
    """Distance of each pre-rounding value from its nearest ``.5`` rounding boundary, in code units (float64)."""
    v = v.double()
    return (v - torch.floor(v) - 0.5).abs()


def untied_mismatches(out: torch.Tensor, ref: torch.Tensor, v: torch.Tensor, eps: float = TIE_EPS) -> torch.Tensor:
    """Mask of the codes where ``out`` and ``ref`` differ *not* by a float tie: more than one step apart, or one step
    apart although ``v`` (the reference's pre-rounding value, broadcastable to the codes) is farther than ``eps``
    from a ``.5`` boundary. An all-False mask means "identical, or every differing code was a tie"."""
    d = (out.to(torch.int64) - ref.to(torch.int64)).abs()
    tie = boundary_distance(v).expand_as(d) <= eps
    return (d > 1) | ((d == 1) & ~tie)


def assert_codes_equal_or_ties(
    out: torch.Tensor, ref: torch.Tensor, v: torch.Tensor, eps: float = TIE_EPS, what: str = "codes"
) -> int:
    """Raise ``AssertionError`` unless every differing code is a float tie; return how many codes were ties."""
    bad = untied_mismatches(out, ref, v, eps)
    if bool(bad.any()):
        d = (out.to(torch.int64) - ref.to(torch.int64)).abs()
        dist = boundary_distance(v).expand_as(d)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {d.numel()} codes differ without a float tie (max step {int(d.max())}, "
            f"boundary distance of the worst {float(dist[bad].max()):.3g} > eps {eps})"
        )
    return int((out != ref).sum())
