"""Bit packing throughput: the C++ extension (1 thread and all threads) against the torch reference.

Throughput is GB/s of *unpacked* uint8 codes (``rows * K`` bytes per call) for pack (codes -> bit planes) and unpack
(planes -> codes), median of ``--repeat`` timed calls after one warm-up, on ViT-B/32-sized weight matrices
(``c_fc`` 3072 x 768 and ``c_proj`` 768 x 3072 by default). Every configuration is checked bit-exact against the
reference before it is timed.

    python benchmarks/bench_bitpack.py --out benchmarks/results/bitpack
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from p4q_engine.artifact import bitpack
from p4q_engine.artifact.bitpack import pack, pack_reference, unpack, unpack_reference


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up (allocator, page faults, thread start-up)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_one(rows: int, k: int, bits: int, repeat: int, threads_all: int, reference: bool) -> list[dict]:
    g = torch.Generator().manual_seed(rows * 31 + k * 7 + bits)
    codes = torch.randint(0, 1 << bits, (rows, k), generator=g, dtype=torch.int64).to(torch.uint8)
    planes = pack_reference(codes, bits)
    impls: dict[str, tuple[Callable, Callable]] = {}
    if bitpack.have_extension():
        impls["c++ 1 thread"] = (lambda: pack(codes, bits, threads=1), lambda: unpack(planes, bits, k, threads=1))
        impls[f"c++ {threads_all} threads"] = (
            lambda: pack(codes, bits, threads=threads_all),
            lambda: unpack(planes, bits, k, threads=threads_all),
        )
    if reference:
        impls["torch reference"] = (lambda: pack_reference(codes, bits), lambda: unpack_reference(planes, bits, k))
    nbytes = rows * k
    out = []
    for name, (p, u) in impls.items():
        got = p()
        if len(got) != len(planes) or not all(torch.equal(a, b) for a, b in zip(got, planes)):
            raise SystemExit(f"{name}: pack differs from the reference at {rows}x{k}, {bits} bits")
        if not torch.equal(u(), codes):
            raise SystemExit(f"{name}: unpack does not invert pack at {rows}x{k}, {bits} bits")
        tp, tu = median_seconds(p, repeat), median_seconds(u, repeat)
        out.append(
            {
                "rows": rows,
                "k": k,
                "bits": bits,
                "impl": name,
                "pack_ms": tp * 1e3,
                "unpack_ms": tu * 1e3,
                "pack_gbps": nbytes / tp / 1e9,
                "unpack_gbps": nbytes / tu / 1e9,
                "packed_bytes": sum(pl.numel() * 4 for pl in planes),
            }
        )
        print(
            f"{rows}x{k} {bits}-bit {name:18s} pack {out[-1]['pack_gbps']:7.3f} GB/s  "
            f"unpack {out[-1]['unpack_gbps']:7.3f} GB/s",
            flush=True,
        )
    return out


def markdown(res: dict) -> str:
    env = res["env"]
    lines = [
        "# Bit packing throughput",
        "",
        f"Produced by `{res['command']}` on {res['date']} ({env['cpu_count']} CPUs: {env['cpu']}, "
        f"torch {env['torch']}, Python {env['python']}; load average at start {env['loadavg']}).",
        "",
        "GB/s of unpacked uint8 codes (rows x K bytes per call), median of "
        f"{res['repeat']} calls after a warm-up; every result checked bit-exact against the torch reference. "
        "Timings on a shared machine are noisy: compare within one run.",
        "",
        "| matrix (rows x K) | bits | implementation | pack GB/s | unpack GB/s | pack ms | unpack ms |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in res["results"]:
        lines.append(
            f"| {r['rows']} x {r['k']} | {r['bits']} | {r['impl']} | {r['pack_gbps']:.3f} | "
            f"{r['unpack_gbps']:.3f} | {r['pack_ms']:.2f} | {r['unpack_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[3072, 768], help="matrix rows, paired with --k")
    ap.add_argument("--k", type=int, nargs="+", default=[768, 3072], help="K (packed axis), paired with --rows")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="'all threads' count (0: hardware concurrency)")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) torch reference")
    ap.add_argument("--out", default="benchmarks/results/bitpack", help="output path without suffix")
    args = ap.parse_args(argv)
    if len(args.rows) != len(args.k):
        ap.error("--rows and --k must have the same number of values")
    if not bitpack.have_extension():
        print("warning: C++ extension not built; only the torch reference is measured", file=sys.stderr)
    threads_all = args.threads or os.cpu_count() or 1
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    t0 = time.perf_counter()
    results = []
    for rows, k in zip(args.rows, args.k):
        for bits in args.bits:
            results.append(bench_one(rows, k, bits, args.repeat, threads_all, not args.no_reference))
    res = {
        "command": "python "
        + " ".join(shlex.quote(a) for a in ["benchmarks/bench_bitpack.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "repeat": args.repeat,
        "threads_all": threads_all,
        "env": env,
        "wall_s": round(time.perf_counter() - t0, 2),
        "results": [r for rs in results for r in rs],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
