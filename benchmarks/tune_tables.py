"""Tune every kernel shape a set of models meets on this GPU and write the shippable table (``kernels/tuned``).

    python benchmarks/tune_tables.py --models ViT-B-32,ViT-B-16 --bits 8-8-8,4-4-8   # batches 1, 2, 4, ..., 1024
    python benchmarks/tune_tables.py --artifact model.p4q --batches 1,8,64      # a user's own artifact
    python benchmarks/tune_tables.py --from-cache tuning.json --gpu "NVIDIA H200"  # merge a run's cache (no GPU)

Each model is exported with random weights (tile choice does not depend on values) or taken from ``--artifact``,
loaded on the GPU engine, and run once per batch bucket with autotuning on, into a fresh cache file; the tuned
entries are then merged into ``kernels/tuned/<GPU name>.json`` (``--out`` for another directory), which the
package loads before any autotuning. Commit the file with the GPU, versions and date it records.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=lambda v: [m for m in v.split(",") if m], default=["ViT-B-32"])
    ap.add_argument("--bits", type=lambda v: v.split(","), default=["8-8-8", "4-4-8"])
    ap.add_argument("--artifact", action="append", default=[], help="also (or only, with --models '') this .p4q")
    ap.add_argument(  # every bucket a server warms up to --max-batch 1024: a table without them costs start-up time
        "--batches", type=lambda v: [int(x) for x in v.split(",")], default=[1 << i for i in range(11)]
    )
    ap.add_argument("--out", type=Path, default=None, help="directory of the tables (default: kernels/tuned)")
    ap.add_argument(  # new candidates (e.g. split-K for small M) are only timed for keys the table does not hold
        "--retune-m-max", type=int, default=0, help="tune the GEMM keys of M buckets up to this again (0: none)"
    )
    ap.add_argument("--from-cache", type=Path, help="merge this P4Q_TUNE_CACHE file (a benchmark's) and exit")
    ap.add_argument("--gpu", help="with --from-cache: the GPU name whose entries are merged")
    ap.add_argument("--measured", default="", help="with --from-cache: the GPU, versions and date it was tuned on")
    args = ap.parse_args(argv)
    if args.from_cache is not None:
        return merge_cache(args.from_cache, args.gpu, args.measured, args.out)
    if not torch.cuda.is_available():
        print("tune_tables: needs a CUDA GPU", file=sys.stderr)
        return 2
    cache = Path(tempfile.mkdtemp()) / "tuning.json"
    os.environ["P4Q_TUNE_CACHE"] = str(cache)
    os.environ["P4Q_AUTOTUNE"] = "1"
    from p4q_engine.kernels import tuning

    if args.retune_m_max:
        dropped = tuning.forget(lambda name, m: name.startswith("qgemm") and m <= args.retune_m_max)
        print(f"tuning again: {dropped} GEMM entries of M buckets <= {args.retune_m_max}", flush=True)

    from benchmarks.vit_bench import build_artifact
    from p4q_engine.clip.loading import load_clip
    from p4q_engine.runtime.engine import Engine

    with tempfile.TemporaryDirectory() as d:
        paths = [Path(p) for p in args.artifact]
        for name in args.models:
            loaded = load_clip(name)
            for bits in args.bits:
                path = Path(d) / f"{name}-{bits}.p4q"
                build_artifact(loaded, bits, path)
                paths.append(path)
        for path in paths:
            eng = Engine.load(path, device="cuda")
            for b in args.batches:
                t0 = time.perf_counter()
                # every candidate of the untuned kernels compiled in parallel first (compile ahead), so the timing
                # below compiles nothing: one at a time, ~17 candidates per small-M GEMM key took 37-100 s a batch
                # (benchmarks/results/gpu_2026-12-02e)
                pre = eng.precompile([b]) if hasattr(eng, "precompile") else {}
                eng.encode(torch.randn(b, 3, *eng.image_size, device="cuda"))
                took = time.perf_counter() - t0
                print(f"{path.name} batch {b}: {took:.1f} s ({pre.get('seconds', 0)} s compiling ahead)", flush=True)
            del eng
            torch.cuda.empty_cache()
            write_table(tuning, args.out)  # after every model: a time limit still leaves what was tuned
    return 0


def merge_cache(cache: Path, gpu: str | None, measured: str, out: Path | None) -> int:
    """Merge the entries one GPU run tuned (its ``P4Q_TUNE_CACHE`` file) into that GPU's shipped table, on any
    machine: a benchmark that autotuned what the table lacked leaves the table to commit."""
    from p4q_engine.kernels import tuning

    if not gpu:
        print("tune_tables: --from-cache needs --gpu (the name torch.cuda.get_device_name gave)", file=sys.stderr)
        return 2
    try:
        data = json.loads(cache.read_text())
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        tuned = tuning.config_entries(data)
    except (OSError, ValueError, TypeError) as e:
        print(f"tune_tables: {cache} is not a tuning cache ({e})", file=sys.stderr)
        return 2
    target = tuning.table_path(gpu, out)
    try:
        previous = json.loads(target.read_text()) if target.exists() else None
        if previous is not None and not isinstance(previous.get("configs"), dict):
            raise ValueError("no configs object")
    except (OSError, ValueError, AttributeError) as e:
        print(f"tune_tables: {target} is not a tuning table ({e}); nothing written", file=sys.stderr)
        return 2
    if not any(k.startswith(f"{gpu}|") for k in tuned):
        gpus = sorted({k.split("|", 1)[0] for k in tuned})
        print(f"tune_tables: {cache} has no entries for {gpu!r} (it has: {', '.join(gpus) or 'none'})", file=sys.stderr)
        return 2
    # provenance: what the caller says, else the previous line with this merge appended (never silently replaced)
    merged = f"merged from {cache.name} on {time.strftime('%Y-%m-%d')} (versions not given)"
    before = (previous or {}).get("measured")
    what = f"{measured} (merged from {cache.name} on {time.strftime('%Y-%m-%d')})" if measured else merged
    measured = f"{before}; {what}" if before else (what if measured else f"{gpu}, {merged}")
    table = tuning.table_file(gpu, tuned, measured, previous)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {len(table['configs'])} entries to {target}", flush=True)
    return 0


def write_table(tuning, out) -> None:
    """Merge this process's tuned entries into the shipped table of this GPU."""
    import triton

    gpu = torch.cuda.get_device_name()
    target = tuning.table_path(gpu, out)
    previous = json.loads(target.read_text()) if target.exists() else None
    measured = f"{gpu}, torch {torch.__version__}, triton {triton.__version__}, {time.strftime('%Y-%m-%d')}"
    if previous and previous.get("measured") and measured not in previous["measured"]:
        measured = f"{previous['measured']}; {measured}"  # provenance is appended to, never replaced
    table = tuning.table_file(gpu, tuning._user, measured, previous)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {len(table['configs'])} entries to {target}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
