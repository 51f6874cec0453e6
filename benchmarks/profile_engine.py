"""Profile the GPU engine's image tower (no CUDA graph) and print the kernels that dominate.

python benchmarks/profile_engine.py --bits 8-8-8 --batch 1024
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="8-8-8")
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()
    from benchmarks.gpu_bench import build_artifact, vit_b32
    from p4q_engine.runtime.engine import Engine

    with tempfile.TemporaryDirectory() as d:
        eng = Engine.load(build_artifact(vit_b32(), args.bits, Path(d) / "m.p4q"), device="cuda")
    x = torch.randn(args.batch, 3, 224, 224, device="cuda")
    with torch.no_grad():
        for _ in range(3):
            eng._tower(x)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            eng._tower(x)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
