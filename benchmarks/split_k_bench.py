"""Split-K at small M, kernel by kernel: ViT-B/32's four GEMMs (8-bit weights, the engine's epilogues) at M = 50
and 400 (batch 1 and 8), the shipped tile against every split-K candidate, each timed from a CUDA graph.

    python benchmarks/split_k_bench.py --out results_dir
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p4q_engine.kernels import qgemm as q  # noqa: E402
from p4q_engine.kernels.tuning import SPLIT_K_CANDIDATES, TileConfig  # noqa: E402

#: ``--sweep``: thin tiles x splits beyond the tuner's candidates (the slot reduction's cost per split is one tile
#: store and, for the last arrival, one tile load per other split, so deeper splits may pay where the atomics lost)
SWEEP = tuple(
    TileConfig(bm, bn, 128, 8, 4, 4, swap=swap, split_k=split)
    for bm, bn, swap in ((16, 64, True), (16, 32, True), (32, 64, False))
    for split in (2, 4, 8)
)

#: (name, N, K, epilogue): in_proj (requant), out_proj (+fp32 residual), c_fc (GELU, requant), c_proj (+residual)
SITES = (
    ("in_proj", 2304, 768, "requant"),
    ("out_proj", 768, 768, "res"),
    ("c_fc", 3072, 768, "gelu"),
    ("c_proj", 768, 3072, "res"),
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", type=lambda v: [int(x) for x in v.split(",")], default=[50, 400])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--sweep", action="store_true", help="also time SWEEP (thin tiles x splits 2, 4, 8)")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, n, k, epi in SITES:
        codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int16).to(torch.int8).cuda()
        w = q.PackedWeight.from_codes(codes, torch.rand(n, generator=g).cuda() * 1e-3, 8)
        rq = q.Requant(torch.full((n,), 0.05).cuda(), torch.full((n,), 128, dtype=torch.int32).cuda())
        for m in args.ms:
            a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int16).to(torch.int8).cuda()
            res = torch.randn(m, n).cuda()
            kw = dict(
                residual=res if epi == "res" else None,
                requant=rq if epi in ("requant", "gelu") else None,
                act="gelu" if epi == "gelu" else "none",
            )
            shipped = q._tuned_config(
                a, 0.01, 128, w, None, kw["act"], kw["residual"], kw["requant"], torch.float32, False
            )
            ref = q.qgemm(a, 0.01, 128, w, config=shipped, **kw)
            pool = tuple(dict.fromkeys(SPLIT_K_CANDIDATES + (SWEEP if args.sweep else ())))
            cands = [("shipped", shipped)] + [(f"split{c.split_k}", c) for c in pool]
            for label, cfg in cands:
                try:
                    out = q.qgemm(a, 0.01, 128, w, config=cfg, **kw)
                    same = bool(torch.equal(out, ref)) if epi != "res" else bool(torch.allclose(out, ref, 1e-5, 1e-4))
                    us = 1e3 * triton.testing.do_bench_cudagraph(
                        lambda: q.qgemm(a, 0.01, 128, w, config=cfg, **kw), rep=30, return_mode="median"
                    )
                except Exception as e:  # noqa: BLE001 - reported as a row
                    rows.append(dict(site=name, m=m, config=label, error=f"{type(e).__name__}: {e}"[:200]))
                    continue
                eff = q.effective_config(cfg, w)
                rows.append(dict(site=name, m=m, config=label, us=round(us, 2), same=same, tile=asdict(eff)))
                print(
                    f"{name:9s} m={m:4d} {label:8s} {us:7.2f} us  split={eff.split_k} "
                    f"{eff.block_m}x{eff.block_n}x{eff.block_k} swap={eff.swap} same={same}",
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "split_k_bench.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
