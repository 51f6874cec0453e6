"""Full (two's complement) vs restricted signed weight grid, measured on the reference task before choosing one.

    python benchmarks/weight_grid.py --out benchmarks/results/weight_grid

For each grid: Table 1's PTQ rows for the observers whose weight ranges can clip (percentile, OMSE; MinMax and EMA
set every weight range to max|w|, where both grids give the same codes) at every bit config and both scopes, plus
P4Q 4-4-8 (full scope, the default 50 epochs) - the grid is switched through ``p4q_engine.quant.spec.WEIGHT_GRID``,
the single definition every weight quantizer reads. Also the fraction of weight codes at the full grid's extra
level ``-2^(b-1)`` (what the restricted grid clamps away). CPU, no downloads, about 15 minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from p4q_engine.quant import spec as spec_mod

BITS = ("8-8-8", "4-4-8", "3-3-8", "2-2-8")
OBSERVERS = ("percentile", "omse")
SCOPES = ("full", "release")


def _extra_level_fraction(qmodel) -> float:
    """Fraction of all quantized block/patch weights at the code ``-2^(b-1)``."""
    from p4q_engine.quant.modules import QuantConv2d, QuantLinear

    hit = total = 0
    for m in qmodel.modules():
        if isinstance(m, (QuantLinear, QuantConv2d)) and m.w_spec is not None:
            codes, _ = m.weight_codes()
            hit += int((codes.to(torch.int32) == -(1 << (m.w_spec.bits - 1))).sum())
            total += codes.numel()
    return hit / max(total, 1)


def run(grid: str, args: argparse.Namespace) -> dict:
    from p4q_engine.clip.loading import load_clip
    from p4q_engine.clip.recipe import QuantRecipe
    from p4q_engine.data.datasets import load_dataset
    from p4q_engine.p4q.pipeline import Source, prepare
    from p4q_engine.p4q.trainer import P4QConfig, train
    from p4q_engine.ptq import PTQSettings, build_quantized, zero_shot_accuracy

    spec_mod.WEIGHT_GRID = grid
    s = PTQSettings(progress=False)
    loaded = load_clip("P4Q-Ref-Tiny")
    calib = load_dataset("reference", "calib", transform=loaded.preprocess)
    test = load_dataset("reference", "test", transform=loaded.preprocess)
    rows = []
    for bits in BITS:
        for obs in OBSERVERS:
            for scope in SCOPES:
                q = build_quantized(
                    loaded.model, loaded.tokenizer, QuantRecipe(bits, scope=scope, observer=obs), calib, s
                )
                acc = zero_shot_accuracy(q, loaded.tokenizer, test, s)
                rows.append(
                    {
                        "bits": bits,
                        "observer": obs,
                        "scope": scope,
                        "top1": acc["top1"],
                        "top5": acc["top5"],
                        "extra_level_fraction": _extra_level_fraction(q),
                    }
                )
                print(grid, rows[-1], flush=True)
    p4q = None
    if not args.no_p4q:
        p = prepare(Source(), QuantRecipe("4-4-8"), s, loaded=loaded)
        t0 = time.perf_counter()
        r = train(p.student, loaded.tokenizer, p.data, P4QConfig(epochs=args.epochs), progress=False)
        p4q = {
            "bits": "4-4-8",
            "scope": "full",
            "observer": "omse",
            "epochs": args.epochs,
            "top1": r.metrics["test"]["top1"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(grid, p4q, flush=True)
    return {"grid": grid, "ptq": rows, "p4q": p4q}


def markdown(res: dict) -> str:
    g = {r["grid"]: r for r in res["runs"]}
    lines = [
        "# Signed weight grid: full `[-2^(b-1), 2^(b-1)-1]` vs restricted `[-(2^(b-1)-1), 2^(b-1)-1]`",
        "",
        f"Produced by `{res['command']}` on {res['date']} ({res['device']}, torch {res['torch']}, "
        f"{res['wall_seconds']:.0f} s). Reference task (P4Q-Ref-Tiny), `test` split (2 000 images) for PTQ, "
        "`adapt_test` for P4Q. MinMax and EMA weight ranges are max|w|, where both grids give identical codes, "
        "so they are not repeated here (see ptq_reference.md).",
        "",
        "| observer | bits | scope | full top-1 | restricted top-1 | full - restricted | weights at -2^(b-1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for a, b in zip(g["full"]["ptq"], g["restricted"]["ptq"]):
        lines.append(
            f"| {a['observer']} | {a['bits']} | {a['scope']} | {a['top1']:.2f} | {b['top1']:.2f} | "
            f"{a['top1'] - b['top1']:+.2f} | {100 * a['extra_level_fraction']:.2f}% |"
        )
    if g["full"]["p4q"]:
        a, b = g["full"]["p4q"], g["restricted"]["p4q"]
        lines.append(
            f"| P4Q ({a['epochs']} epochs) | 4-4-8 | full | {a['top1']:.2f} | {b['top1']:.2f} | "
            f"{a['top1'] - b['top1']:+.2f} | |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/weight_grid")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--no-p4q", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    saved = spec_mod.WEIGHT_GRID
    try:
        runs = [run(grid, args) for grid in ("full", "restricted")]
    finally:
        spec_mod.WEIGHT_GRID = saved
    res = {
        "command": "python benchmarks/weight_grid.py " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "device": "cpu",
        "torch": torch.__version__,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "runs": runs,
    }
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=2) + "\n")
    Path(f"{args.out}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
