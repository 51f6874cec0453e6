"""qgemm main loops before/after, in one process: the artifact-plane path vs the interleaved device layouts (both
operand orders), every weight width, against bf16 cuBLAS and row-wise fp8 ``_scaled_mm`` on the same shapes.

    P4Q_TUNE_CACHE=$OUT/tuning.json python benchmarks/gemm_bench.py --out $OUT

Each GEMM runs with the epilogue it has in the engine (in_proj: requantize to q|k|v codes; c_fc: bias + GELU +
requantize; out_proj and c_proj: bias + fp32 residual, fp32 out), autotuned over the candidates of
``kernels/tuning.py`` (the winner is recorded). ``planes`` rows use ``P4Q_WEIGHT_LAYOUT=planes`` (the main loop before
the interleaved layouts) and only the non-swapped candidates (the kernels before operand swapping). Prediction
(written before the run): W4/W3/W2 at M = 51200 within 10% of W8 (one shift or mask per weight instead of shift,
mask, reshape, subtract), faster than W8 at M <= 400 (half the weight bytes or less); swap wins at M = 50.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.gpu_bench import INT8_PEAK_TOPS, env, env_var, log

#: ViT-B/32 block GEMMs (N, K) and the epilogue each has in the engine.
SHAPES = {
    "in_proj": (2304, 768, "requant"),
    "out_proj": (768, 768, "residual"),
    "c_fc": (3072, 768, "gelu_requant"),
    "c_proj": (768, 3072, "residual"),
}
MS = (51200, 400, 50)  # ViT-B/32 batch 1024 (and ViT-B/16 batch 256's bucket), batch 8, batch 1


def bench_ms(fn) -> float:
    """Median GPU ms replayed from a CUDA graph (what the engine does; plain launches would time Python at small M)."""
    import triton
    from p4q_engine.kernels.tuning import _time

    return _time(fn, triton)


def references(m: int, n: int, k: int) -> dict:
    a16 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    out = {"bf16_cublas_ms": bench_ms(lambda: a16 @ w16.t())}
    try:
        af = a16.to(torch.float8_e4m3fn)
        wf = w16.to(torch.float8_e4m3fn).t()
        sa = torch.rand(m, 1, device="cuda") + 0.5
        sb = torch.rand(1, n, device="cuda") + 0.5
        out["fp8_rowwise_ms"] = bench_ms(
            lambda: torch._scaled_mm(af, wf, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        )
    except (RuntimeError, TypeError) as e:
        out["fp8_error"] = str(e).splitlines()[0][:200]
    return out


def run_qgemm(m: int, n: int, k: int, epi: str, bits: int, layout: str) -> dict:
    """One autotuned qgemm: ``epi`` is the epilogue (``requant``, ``gelu_requant`` or ``residual``)."""
    from p4q_engine.kernels import qgemm as qg
    from p4q_engine.kernels import tuning

    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    # "wide": the engine's default on a GPU (the int8 copy, the faster loop per shape); the others time one loop
    with env_var("P4Q_WEIGHT_LAYOUT", "nib" if layout in ("packed", "wide") else layout):
        with env_var("P4Q_WIDE_INT8", "auto" if layout == "wide" else "0"):
            codes = torch.randint(lo, hi + 1, (n, k), device="cuda", dtype=torch.int8)
            w = qg.PackedWeight.from_codes(codes, torch.rand(n, device="cuda") * 0.01, bits)
    a = torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8)
    bias = torch.randn(n, device="cuda")
    kw: dict = {"bias": bias}
    if epi == "residual":
        kw["residual"] = torch.randn(m, n, device="cuda")
    else:
        kw["requant"] = qg.Requant(torch.full((n,), 0.05, device="cuda"), torch.full((n,), 128, device="cuda").int())
        if epi == "gelu_requant":
            kw["act"] = "gelu"
    saved = tuning.GPU_CANDIDATES
    if layout == "planes":  # the candidates before operand swapping existed
        qg.GPU_CANDIDATES = tuple(c for c in saved if not c.swap)
    try:
        with env_var("P4Q_NIB_PACKED", "1" if layout == "packed" else "0"):
            qg._RESOLVED.clear()  # the tile this call resolves is the one new entry (layout, epilogue and M exact)
            t0 = time.perf_counter()
            qg.qgemm(a, 0.01, 128, w, **kw)  # tunes (or reads the table)
            tune_s = time.perf_counter() - t0
            chosen = list(qg._RESOLVED.values())
            ms = bench_ms(lambda: qg.qgemm(a, 0.01, 128, w, **kw))
    finally:
        qg.GPU_CANDIDATES = saved
    return {"ms": ms, "tune_s": round(tune_s, 1), "config": str(chosen[-1]) if chosen else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", type=lambda v: [int(x) for x in v.split(",")], default=list(MS))
    ap.add_argument(
        "--engine-epilogues",
        action="store_true",
        help="each shape with its engine epilogue (default: requantize everywhere, one compile set per layout)",
    )
    ap.add_argument("--bits", type=lambda v: [int(x) for x in v.split(",")], default=[8, 4, 3, 2])
    ap.add_argument(
        "--layouts",
        type=lambda v: v.split(","),
        default=["nib", "packed", "planes", "wide"],
        help="main loops: nib (interleaved low-bit / direct 8-bit), packed (nib with P4Q_NIB_PACKED=1), planes (the "
        "artifact's), wide (the engine's choice between nib and the 8-bit loop on an int8 copy)",
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for m in args.ms:
        for name, (n, k, epi) in SHAPES.items():
            ops = 2.0 * m * n * k
            used = epi if args.engine_epilogues else "requant"
            row = {"m": m, "layer": name, "n": n, "k": k, "epilogue": used, **references(m, n, k)}
            for bits in args.bits:
                for layout in args.layouts if bits < 8 else ["nib"]:
                    r = run_qgemm(m, n, k, epi if args.engine_epilogues else "requant", bits, layout)
                    tag = f"w{bits}" + ("" if layout == "nib" else f"_{layout}")
                    row[f"{tag}_ms"], row[f"{tag}_config"], row[f"{tag}_tune_s"] = r["ms"], r["config"], r["tune_s"]
            for key in [x for x in list(row) if x.endswith("_ms")]:
                row[key.replace("_ms", "_tops")] = ops / (row[key] * 1e-3) / 1e12
            if "w8_tops" in row:
                row["w8_pct_of_int8_peak"] = 100 * row["w8_tops"] / INT8_PEAK_TOPS
            rows.append(row)
            log("gemm", {x: (round(v, 4) if isinstance(v, float) else v) for x, v in row.items()})
            Path(args.out, "gemm.json").write_text(json.dumps({"env": env(), "rows": rows}, indent=1))
    Path(args.out, "gemm.md").write_text(table(rows))
    print(table(rows))
    return 0


def table(rows: list) -> str:
    """Milliseconds per path (the columns the run measured, in its order); W8's TOP/s beside it."""
    cols = list(dict.fromkeys(key for r in rows for key in r if key.endswith("_ms")))
    names = [c[: -len("_ms")].replace("_cublas", "").replace("_rowwise", "").replace("_", " ") for c in cols]
    lines = ["| M | layer | " + " | ".join(f"{n} ms" for n in names) + " |", "|" + "---|" * (2 + len(cols))]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cell = f"{v:.4f}" if isinstance(v, float) else "-"
            if c == "w8_ms" and "w8_tops" in r:
                cell += f" ({r['w8_tops']:.0f} TOP/s)"
            cells.append(cell)
        lines.append(f"| {r['m']} | {r['layer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
