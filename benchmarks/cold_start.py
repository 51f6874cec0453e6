"""Cold start of a GPU server: seconds from a fresh process to every batch bucket warmed, with and without compiling
ahead (issue 11: ``p4q serve`` on a known GPU ready in under 20 s).

    python benchmarks/cold_start.py --model ViT-B-32 --bits 8-8-8 --max-batch 1024 --out $OUT

Builds one artifact (random weights; values do not change compile time), then for each mode starts a new Python
process with an empty ``TRITON_CACHE_DIR`` (what a fresh machine has) that imports the engine, loads the artifact
(self-test included) and runs ``serve.server.warm_up`` - what ``p4q serve`` does before it binds its port. Modes:
``serial`` (``P4Q_COMPILE_WORKERS=0``: each kernel compiled at its first launch, as before) and ``parallel`` (the
default: ``KernelEngine.precompile``). The shipped tuning table must cover the model's shapes (else tuning dominates:
the untuned buckets are listed). Writes ``cold_start.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from p4q_engine.artifact.format import load
from p4q_engine.runtime.kernel_engine import KernelEngine
from p4q_engine.serve.server import warm_up
t_import = time.perf_counter()
# Engine.load(path, "cuda") step by step, each step timed: read + validate the file, build the engine (CUDA
# context, weight layouts and int8 copies), the batch-1 self-test (its compiles and graph capture)
art = load(sys.argv[1])
t_read = time.perf_counter()
eng = KernelEngine(art, "cuda")
torch.cuda.synchronize()
t_build = time.perf_counter()
eng.self_test()
t_load = time.perf_counter()
info = {}
if hasattr(eng, "precompile"):
    pre = eng.precompile
    def logged(sizes, workers=None):
        info.update(pre(sizes, workers))
        return info
    eng.precompile = logged
sizes = warm_up(eng, int(sys.argv[2]))
t_ready = time.perf_counter()
print(json.dumps({"import_s": t_import - t0, "load_s": t_load - t_import, "warm_s": t_ready - t_load,
                  "load_parts": {"read_s": t_read - t_import, "build_s": t_build - t_read,
                                 "self_test_s": t_load - t_build},
                  "ready_s": t_ready - t0, "buckets": sizes, "precompile": info}))
"""


def child(artifact: Path, max_batch: int, workers: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="p4q-cold-") as d:
        # an empty Triton cache and an empty tuning cache of its own: a mode run later must not read what an earlier
        # one compiled or tuned (the shipped table is read by both)
        env = {
            **os.environ,
            "TRITON_CACHE_DIR": str(Path(d, "triton")),
            "P4Q_TUNE_CACHE": str(Path(d, "tuning.json")),
            "P4Q_COMPILE_WORKERS": workers,
        }
        t0 = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-c", _CHILD, str(artifact), str(max_batch)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1:] or ["exit %d" % p.returncode], "wall_s": wall}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return {**{k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}, "wall_s": round(wall, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--bits", default="8-8-8")
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--modes", default="serial,parallel")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per child process")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.vit_bench import build_artifact
    from p4q_engine.clip.loading import load_clip

    workers = {"serial": "0", "parallel": os.environ.get("P4Q_COMPILE_WORKERS", "")}
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.p4q"
        build_artifact(load_clip(args.model), args.bits, path)
        for mode in args.modes.split(","):
            w = workers[mode]
            env_w = w if w else str(_default_workers())
            try:
                rows[mode] = child(path, args.max_batch, env_w, args.timeout)
            except subprocess.TimeoutExpired:
                rows[mode] = {"error": f"not ready within {args.timeout:.0f} s"}
            print(mode, json.dumps(rows[mode]), flush=True)
    doc = {"model": args.model, "bits": args.bits, "max_batch": args.max_batch, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "cold_start.json").write_text(json.dumps(doc, indent=1))
    return 0


def _default_workers() -> int:
    from p4q_engine.kernels.compile_ahead import default_workers

    return default_workers()


if __name__ == "__main__":
    sys.exit(main())
