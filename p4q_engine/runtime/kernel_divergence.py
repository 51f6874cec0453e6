"""Where the GPU (kernel) engine first quantizes an image differently from the CPU engine, and whether that is a tie.

The CPU engine is the reference. Its activation sites are recorded with the divergence tracer of
:mod:`p4q_engine.runtime.divergence` (pre-rounding values ``x / scale``); the kernel engine's are the int8 codes its
kernels return (``quantize_rows``, ``layernorm_quant``, the requantizing ``qgemm`` epilogues, ``qattention``),
recorded by wrapping those names in :mod:`p4q_engine.runtime.kernel_engine` (a residual ``qgemm`` with a LayerNorm
tail returns the next site's codes too: recorded where ``layernorm_quant``'s would be, so the order is the same).
For the fully fused image tower (every
block Linear and attention quantized: the full scope) the two sequences pair up as::

    patches | per block: ln_1 -> in_proj input, in_proj -> q|k|v, qattention -> out_proj input,
              ln_2 -> c_fc input, c_fc -> c_proj input | the projection's input

At the first site where a code differs, every differing code must be a float tie of the CPU engine's value
(:mod:`p4q_engine.quant.ties`). The attention output is the exception to "its own value": its codes also move when
a *probability* code flipped at a tie inside the kernel (probabilities never leave it), so a differing attention
output is a tie when it is one of its own value or its (image, head, query row) has a probability within
``TIE_EPS`` of a rounding boundary.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from p4q_engine.quant.ties import TIE_EPS, boundary_distance
from p4q_engine.runtime.divergence import _SiteTrace

_KERNELS = ("quantize_rows", "layernorm_quant", "qgemm", "qattention")
#: CPU engine sites per fused block, in call order: in_proj input, q, k (transposed), p, v, out_proj input, c_fc
#: input, c_proj input.
_CPU_PER_BLOCK = 8


@contextmanager
def _record_kernel_codes() -> Iterator[list[torch.Tensor]]:
    """Every int8 code tensor a kernel returns inside the block, in call order (CPU copies)."""
    from p4q_engine.runtime import kernel_engine as ke

    calls: list[torch.Tensor] = []
    saved = {name: getattr(ke, name) for name in _KERNELS}

    def wrap(fn):
        def recorded(*args, **kwargs):
            out = fn(*args, **kwargs)
            for t in out if isinstance(out, tuple) else (out,):  # a GEMM with a LayerNorm tail: (rows, codes)
                if isinstance(t, torch.Tensor) and t.dtype == torch.int8:
                    calls.append(t.detach().cpu())
            return out

        return recorded

    try:
        for name, fn in saved.items():
            setattr(ke, name, wrap(fn))
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(ke, name, fn)


def _cpu_codes(call: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    v, zp, lo, hi = call
    return torch.clamp(torch.floor(v + 0.5) + zp, lo, hi).to(torch.int64), v


def _compare(gpu: torch.Tensor, cpu_call: tuple, layout) -> dict | None:
    """``None`` when equal; else what differs. ``layout`` maps the CPU value tensor to the GPU codes' layout."""
    codes, v = _cpu_codes(cpu_call)
    codes, v = layout(codes), layout(v)
    g = gpu.to(torch.int64).reshape(codes.shape) + 128
    diff = g != codes
    if not bool(diff.any()):
        return None
    steps = (g - codes).abs()
    dist = boundary_distance(v)
    own_tie = (steps == 1) & (dist <= TIE_EPS)
    return {
        "codes_differ": int(diff.sum()),
        "codes": int(diff.numel()),
        "max_step": int(steps.max()),
        "max_boundary_distance_of_flipped": float(dist[diff].max()),
        "diff": diff & ~own_tie,  # the differences that are not a tie of their own value
        "tie": bool((steps <= 1).all() and (dist[diff] <= TIE_EPS).all()),
    }


def kernel_first_divergence(kernel_engine, cpu_engine, image: torch.Tensor) -> dict:
    """Run one image through both engines and return where their codes first differ (``site`` None: nowhere) and
    whether that is a float tie (``tie``)."""
    if image.dim() == 3:
        image = image[None]
    with torch.no_grad(), _SiteTrace() as tc:
        cpu_engine.logits(image)
    with torch.no_grad(), _record_kernel_codes() as gk:
        kernel_engine._tower(image.to(kernel_engine.device))
    layers = int(cpu_engine.cfg["layers"])
    cpu = tc.calls
    if len(gk) < 2 + 5 * layers or len(cpu) < 2 + _CPU_PER_BLOCK * layers:  # (+ adapter sites)
        return {"aligned": False, "gpu_calls": len(gk), "cpu_calls": len(cpu)}
    b = image.shape[0]
    flat = lambda t: t.reshape(-1)  # noqa: E731

    def heads_to_tokens(t: torch.Tensor) -> torch.Tensor:  # [B, H, L, hd] -> [B, L, H*hd]
        return t.transpose(1, 2).reshape(b, t.shape[2], -1)

    pairs = [("patches", gk[0], cpu[0], flat)]
    for i in range(layers):
        g, c = gk[1 + 5 * i : 6 + 5 * i], cpu[1 + _CPU_PER_BLOCK * i : 1 + _CPU_PER_BLOCK * (i + 1)]
        n = c[0][0].shape[1]
        d = c[0][0].shape[2]
        qkv = g[1].reshape(b, n, 3 * d)
        pairs += [
            (f"block {i} in_proj input", g[0], c[0], flat),
            (f"block {i} q", qkv[..., :d], c[1], heads_to_tokens),
            (f"block {i} k", qkv[..., d : 2 * d], c[2], lambda t: heads_to_tokens(t.transpose(-1, -2))),
            (f"block {i} v", qkv[..., 2 * d :], c[4], heads_to_tokens),
            (f"block {i} attention output", g[2], c[5], flat),
            (f"block {i} c_fc input", g[3], c[6], flat),
            (f"block {i} c_proj input", g[4], c[7], flat),
        ]
    pairs.append(("projection input", gk[1 + 5 * layers], cpu[1 + _CPU_PER_BLOCK * layers], flat))
    for k, (name, g, c, layout) in enumerate(pairs):
        r = _compare(g, c, layout)
        if r is None:
            continue
        diff = r.pop("diff")
        if not r["tie"] and name.endswith("attention output"):
            r["tie"] = _attention_flip_is_tie(diff, cpu, name, b)
        return {"aligned": True, "site": name, "index": k, "sites": len(pairs), **r}
    return {"aligned": True, "site": None, "sites": len(pairs)}


def _attention_flip_is_tie(diff: torch.Tensor, cpu: list, name: str, b: int) -> bool:
    """Attention outputs that differ not on a tie of their own value are ties when each one's (image, query row,
    head) has a probability on a tie."""
    i = int(name.split()[1])
    v, _zp, _lo, _hi = cpu[1 + _CPU_PER_BLOCK * i + 3]  # the p site: [B, H, L, L] of p / s_p
    heads, length = v.shape[1], v.shape[2]
    near = (boundary_distance(v) <= TIE_EPS).any(dim=-1)  # [B, H, L]
    rows = diff.reshape(b, length, heads, -1).any(dim=-1).transpose(1, 2)  # [B, H, L]
    return bool(near[rows].all())


def untied_kernel_divergences(kernel_engine, cpu_engine, images: torch.Tensor) -> list[dict]:
    """The images whose codes differ between the engines other than by a float tie (empty for correct kernels)."""
    out = []
    for i in range(images.shape[0]):
        t = kernel_first_divergence(kernel_engine, cpu_engine, images[i])
        if not t["aligned"] or (t["site"] is not None and not t["tie"]):
            out.append({"image": i, **t})
    return out
