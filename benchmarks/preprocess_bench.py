"""Decode + preprocess throughput of 224 px JPEGs in N concurrent decode threads (what ``p4q serve`` does per
request), open_clip's eval transform (torch ToTensor + Normalize: torch's intra-op pool) vs the fast path
(the same float32 operations in numpy, bit-identical) vs the 8-bit path the server now takes (``raw=True``:
normalisation left to the engine, a quarter of the bytes), per torch thread count.

    python benchmarks/preprocess_bench.py --out benchmarks/results/preprocess_cpu

Why: on a 16-core GPU machine the server ran 16 decode threads with 4 torch threads each, and every torch op on a
224 px image fans out to the pool - 64 threads on 16 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CFG = {
    "size": 224,
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "resize_mode": "shortest",
    "interpolation": "bicubic",
}


def one(torch_threads: int, workers: int, mode: str, n: int) -> float:
    """Images/s of ``Preprocess.load`` on one JPEG, ``n`` times over ``workers`` threads (run in a fresh process:
    torch's thread count is per process)."""
    import numpy as np
    import torch
    from PIL import Image

    from p4q_engine.runtime.images import build_transform

    torch.set_num_threads(torch_threads)
    pre = build_transform(CFG)
    if mode == "reference":
        pre.transform = pre.reference_transform
    raw = mode == "raw"
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).resize((224, 224), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(lambda _: pre.load(data, raw=raw), range(50)))
        t0 = time.perf_counter()
        list(ex.map(lambda _: pre.load(data, raw=raw), range(n)))
        return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default="1x2,4x8,16x16", help="torch threads x decode threads, comma-separated")
    p.add_argument("--images", type=int, default=800)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/preprocess_cpu"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "threads,workers,mode": child process
    args = p.parse_args(argv)
    if args.one:
        t, w, mode = args.one.split(",")
        print(json.dumps(one(int(t), int(w), mode, args.images)))
        return 0
    rows = []
    for cell in args.grid.split(","):
        t, w = (int(v) for v in cell.split("x"))
        row = {"torch_threads": t, "decode_threads": w}
        for name in ("reference", "fast", "raw"):
            cmd = [sys.executable, __file__, "--one", f"{t},{w},{name}", "--images", str(args.images)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
            row[name] = round(json.loads(out.stdout.strip().splitlines()[-1]), 1)
        row["speedup"] = round(row["fast"] / row["reference"], 2)
        row["raw_speedup"] = round(row["raw"] / row["reference"], 2)
        rows.append(row)
        print(row, flush=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "command": "python benchmarks/preprocess_bench.py " + " ".join(argv or sys.argv[1:]),
    }
    Path(args.out + ".json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    md = [
        "# Decode + preprocess of 224 px JPEGs in concurrent threads: open_clip's transform vs the numpy fast path",
        "",
        f"- command: `{meta['command']}`; {meta['date']}; {meta['cpus']} CPUs ({meta['platform']}, shared), "
        f"Python {meta['python']}",
        "- one JPEG (224x224, quality 90) decoded, resized (bicubic, shortest side), cropped and normalised "
        f"{args.images} times across the decode threads; each cell a fresh process; outputs bit-identical "
        "(`tests/runtime/test_images_transform.py`)",
        "",
        "- 8-bit path: the same decode, resize and crop, the uint8 pixels returned (602 112 -> 150 528 bytes per "
        "image to queue, pickle and copy); the engine normalises them to the same bits",
        "",
        "| torch threads | decode threads | open_clip transform images/s | fast path images/s | speed-up | "
        "8-bit path images/s | speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {r['torch_threads']} | {r['decode_threads']} | {r['reference']} | {r['fast']} | {r['speedup']}x | "
            f"{r['raw']} | {r['raw_speedup']}x |"
            for r in rows
        ],
    ]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
