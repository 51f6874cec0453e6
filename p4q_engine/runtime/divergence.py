"""Where the CPU engine and the fake-quant model first quantize an image differently, and whether that is a tie.

Both paths end every activation quantization in :func:`~p4q_engine.quant.quantizer.round_half_up` right after
:meth:`~p4q_engine.quant.quantizer.QParams.view_for`, so recording those two calls sees every site of either path.
Aligning the two records site by site finds the first differing code; :mod:`p4q_engine.quant.ties` decides whether
it is a float tie (a correct implementation may produce it) or a real difference (a bug). Parity tests assert
"every disagreement is a traced tie" with :func:`untied_disagreements`; ``benchmarks/engine_parity_reference.py``
reports the traces.
"""

from __future__ import annotations

from typing import Callable

import torch

from p4q_engine.quant.ties import TIE_EPS, boundary_distance
from p4q_engine.runtime.engine import Engine, patchify

#: A top-1 flip with no differing code anywhere comes from the float logits alone: allowed only where the two best
#: reference logits are this close (float32 noise of a scaled cosine is ~1e-5).
LOGIT_TIE = 1e-3


class _SiteTrace:
    """Records, for every activation quantization of one forward pass, the pre-rounding values ``x / scale`` and the
    site's zero point and code range. Both paths end in ``quantizer.round_half_up`` right after ``QParams.view_for``,
    so patching those two sees the engine's and the fake-quant model's sites alike."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, float, int, int]] = []

    def __enter__(self) -> "_SiteTrace":
        from p4q_engine.quant import quantizer as q

        self._q, self._round, self._view = q, q.round_half_up, q.QParams.view_for
        current: dict = {}

        def view_for(qp, x):
            current["qp"] = qp
            return self._view(qp, x)

        def round_half_up(v):
            qp = current.pop("qp", None)
            if qp is not None and not qp.spec.per_channel:  # activation sites (weights are per-channel)
                self.calls.append((v.detach().double().clone(), float(qp.zero_point), qp.spec.qmin, qp.spec.qmax))
            return self._round(v)

        q.QParams.view_for, q.round_half_up = view_for, round_half_up
        return self

    def __exit__(self, *exc) -> None:
        self._q.QParams.view_for, self._q.round_half_up = self._view, self._round


def _codes(v: torch.Tensor, zp: float, qmin: int, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.floor(v + 0.5) + zp, qmin, qmax)


def _align(fq: list, eng: list, patch: tuple[int, int]) -> list[tuple[int, int, bool]]:
    """Pairs (fake-quant call, engine call, transpose?) of the same site. The two paths visit the sites in nearly the
    same order: the engine takes the image as patches, k transposed, and the probabilities before v; an engine call
    with no fake-quant partner nearby (the adapter input quantized again for fc1) stays unpaired."""
    if fq and eng and fq[0][0].dim() == 4 and eng[0][0].dim() == 3:  # the patch-embedding input
        fq[0] = (patchify(fq[0][0], patch),) + fq[0][1:]
    pairs, used = [], set()
    for j, (v, *_rest) in enumerate(eng):
        for i in (j, j - 1, j + 1):
            if 0 <= i < len(fq) and i not in used:
                if fq[i][0].shape == v.shape:
                    pairs.append((i, j, False))
                elif v.dim() >= 2 and fq[i][0].shape == v.transpose(-1, -2).shape:
                    pairs.append((i, j, True))
                else:
                    continue
                used.add(i)
                break
    return pairs


def _record(engine: Engine, encode: Callable, images: torch.Tensor) -> tuple[list, list]:
    """Every activation site's pre-rounding values of one batch, fake-quant path and engine."""
    with torch.no_grad(), _SiteTrace() as tf:
        encode(images)
    with torch.no_grad(), _SiteTrace() as te:
        engine.logits(images, batch_size=len(images))
    return tf.calls, te.calls


def _image_of(calls: list, index: int, batch: int) -> list:
    """The calls restricted to image ``index`` of a ``batch``-image forward: its slice along the batch dimension
    (dim 0, or dim 1 for sequence-first activations)."""
    out = []
    for v, *rest in calls:
        if v.dim() and v.shape[0] == batch:
            v = v[index : index + 1]
        elif v.dim() > 1 and v.shape[1] == batch:
            v = v[:, index : index + 1]
        out.append((v, *rest))
    return out


def first_divergence(
    engine: Engine, encode: Callable, image: torch.Tensor, batch: torch.Tensor | None = None, index: int = 0
) -> dict:
    """Where the engine and the fake-quant model first quantize one image differently, and whether that is a float
    tie: the flipped elements' pre-rounding values lie within float rounding of a .5 boundary. ``batch`` (with the
    image's ``index`` in it): the batch the image was compared in, replayed whole - float results depend on the
    batch size (matmul blocking), so a tie met in a batch of 64 need not recur in a batch of one."""
    if batch is None:
        batch, index = image[None], 0
    return _divergence(*_record(engine, encode, batch), engine, index, len(batch))


def _divergence(fq_calls: list, eng_calls: list, engine: Engine, index: int, size: int) -> dict:
    tf_calls, te_calls = _image_of(fq_calls, index, size), _image_of(eng_calls, index, size)
    pairs = _align(tf_calls, te_calls, engine.patch)
    if len(pairs) != len(tf_calls):  # every fake-quant site paired (the engine may quantize z twice: adapter, fc1)
        return {"aligned": False, "sites_fake_quant": len(tf_calls), "sites_engine": len(te_calls)}
    for n, (i, j, tr) in enumerate(pairs):
        vf, zp, lo, hi = tf_calls[i]
        ve = te_calls[j][0].transpose(-1, -2) if tr else te_calls[j][0]
        diff = _codes(vf, zp, lo, hi) != _codes(ve, zp, lo, hi)
        if diff.any():
            dv = (vf - ve).abs()
            boundary = boundary_distance(vf)  # of the fake-quant value from its .5 boundary
            return {
                "aligned": True,
                "site": n,
                "sites": len(pairs),
                "shape": list(vf.shape),
                "codes_differ": int(diff.sum()),
                "codes": int(diff.numel()),
                "max_boundary_distance_of_flipped": float(boundary[diff].max()),
                "max_abs_input_diff_of_flipped": float(dv[diff].max()),
                "max_abs_input_diff_before_rounding": float(dv.max()),
                # a tie: each flipped value is nearer the boundary than the two paths' float difference there,
                # that difference is float noise (< TIE_EPS code units everywhere at this site), and one step
                "float_tie": bool(
                    (boundary[diff] <= dv[diff] + 1e-12).all()
                    and float(dv.max()) < TIE_EPS
                    and bool(((_codes(vf, zp, lo, hi) - _codes(ve, zp, lo, hi)).abs() <= 1).all())
                ),
            }
    return {"aligned": True, "site": None, "sites": len(pairs)}


def _margins(ref: torch.Tensor) -> torch.Tensor:
    top2 = ref.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def trace_disagreements(
    engine: Engine,
    encode: Callable,
    images: torch.Tensor,
    out: torch.Tensor,
    ref: torch.Tensor,
    noise: float | None = None,
    batch_size: int = 64,
) -> list[dict]:
    """:func:`first_divergence` of every image whose engine top-1 (``out``) differs from the reference's (``ref``) -
    and, with ``noise``, of every image whose logits differ by more than that - with the image's index and reference
    top-1/top-2 margin. ``tie`` says whether a correct engine may produce the difference. Each image is traced in
    its ``batch_size`` chunk of ``images`` (``Engine.logits``' default chunk), recorded once per chunk."""
    margins = _margins(ref)
    suspect = out.argmax(1) != ref.argmax(1)
    if noise is not None:
        suspect |= (out - ref).abs().amax(dim=1) > noise
    traces, recorded = [], {}
    for i in torch.nonzero(suspect).flatten().tolist():
        c = i // batch_size
        chunk = images[c * batch_size : (c + 1) * batch_size]
        if c not in recorded:
            recorded = {c: _record(engine, encode, chunk)}  # one chunk's records at a time (memory)
        t = _divergence(*recorded[c], engine, i - c * batch_size, len(chunk))
        t.update(
            index=i,
            margin=float(margins[i]),
            max_logit_diff=float((out[i] - ref[i]).abs().max()),
            top1_differs=bool(suspect[i] and out[i].argmax() != ref[i].argmax()),
        )
        if t["aligned"] and t["site"] is None:  # same codes everywhere: only the float logits differ
            t["tie"] = t["margin"] <= LOGIT_TIE and (noise is None or t["max_logit_diff"] <= noise)
        else:
            t["tie"] = bool(t["aligned"] and t["float_tie"])
        traces.append(t)
    return traces


def untied_disagreements(
    engine: Engine,
    encode: Callable,
    images: torch.Tensor,
    out: torch.Tensor,
    ref: torch.Tensor,
    noise: float | None = None,
    batch_size: int = 64,
) -> list[dict]:
    """The differences that are *not* traced float ties (empty for a correct engine): see
    :func:`trace_disagreements`."""
    return [t for t in trace_disagreements(engine, encode, images, out, ref, noise, batch_size) if not t["tie"]]
