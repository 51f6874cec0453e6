"""Issue 14's CPU measurements: the single-process server vs Ray Serve (1 and 2 engine replicas, both batchers),
decoding in threads vs worker processes, the engine's own images/s (the ceiling), and the dataset job locally vs
as a Ray Data pipeline.

    python benchmarks/ray_bench.py --artifact /tmp/ref448.p4q          # all of it (~10 min on 2 cores)
    python benchmarks/ray_bench.py --artifact /tmp/ref448.p4q --only serve --levels 1,8,64 --requests 300

HTTP numbers come from ``benchmarks/serve_load.py`` (bounded loopback load, every answer checked against
``Engine.classify``: lost and wrong must be 0), run once per server configuration as a subprocess; its per-run
reports go to a temporary directory and are gathered into ``<out-dir>/ray_serve_{cpu,gpu}.{md,json}``. The
dataset job's go to ``<out-dir>/ray_data_{cpu,gpu}.{md,json}``. ``--device cuda`` runs the one-GPU configurations
(decode threads, processes or nvJPEG in the server; Ray Serve with decoding in HTTP replicas; Ray Data with a GPU
engine actor).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RAY = "--backend ray --cpus-per-replica 0.5 --cpus-per-http-replica 0.5"
#: (name, image source, extra `p4q serve` args) per device
SERVE_CONFIGS = {
    "cpu": [
        ("single process, decode threads", "reference", ""),
        ("single process, --decode-processes 2", "reference", "--decode-processes 2"),
        ("Ray Serve, 1 engine replica (p4q batcher)", "reference", f"{RAY} --replicas 1"),
        ("Ray Serve, 1 engine replica (@serve.batch)", "reference", f"{RAY} --replicas 1 --ray-batching serve"),
        ("Ray Serve, 2 engine replicas (p4q batcher)", "reference", f"{RAY} --replicas 2"),
        ("single process, decode threads", "jpeg224", ""),
        ("single process, --decode-processes 2", "jpeg224", "--decode-processes 2"),
        ("Ray Serve, 1 engine replica (p4q batcher)", "jpeg224", f"{RAY} --replicas 1"),
        ("Ray Serve, 2 engine + 2 HTTP replicas", "jpeg224", f"{RAY} --replicas 2 --http-replicas 2"),
    ],
    # one GPU: where decoding runs is the question (issue 14, must-have 3)
    "cuda": [
        ("single process, decode threads", "jpeg224", ""),
        ("single process, --decode-processes 6", "jpeg224", "--decode-processes 6"),
        ("single process, nvJPEG (--decode-device cuda)", "jpeg224", "--decode-device cuda"),
        (
            "Ray Serve, 1 GPU engine replica + 6 HTTP replicas (decode in the HTTP replicas)",
            "jpeg224",
            "--backend ray --replicas 1 --gpus-per-replica 1 --cpus-per-replica 1 --http-replicas 6 "
            "--cpus-per-http-replica 1",
        ),
    ],
}
#: Ray Data placements per device (the local job runs beside them)
DATA_PLACEMENTS = {
    "cpu": {
        "Ray Data, 1 decoder + 1 engine actor": dict(actors=1, decoders=1, device="cpu", cpus_per_actor=1),
        "Ray Data, 1 decoder + 2 engine actors": dict(actors=2, decoders=1, device="cpu", cpus_per_actor=0.5),
        "Ray Data, 2 decoders + 1 engine actor": dict(
            actors=1, decoders=2, cpus_per_decoder=0.5, device="cpu", cpus_per_actor=1
        ),
    },
    "cuda": {
        "Ray Data, 6 decoders + 1 GPU engine actor": dict(
            actors=1, decoders=6, device="cuda", gpus_per_actor=1, cpus_per_actor=1
        ),
    },
}


def device_name(device: str) -> str:
    return "CPU" if device == "cpu" else torch.cuda.get_device_name(0)


def versions() -> dict:
    import ray

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def engine_ceiling(
    artifact: str, sizes: list[int], threads: int, seconds: float = 3.0, device: str = "cpu"
) -> dict[int | str, float]:
    """In-process ``Engine.embed`` images/s per batch size (preprocessed pixels - 8-bit where the artifact's
    preprocess allows, as the servers hand them over - no HTTP, no decoding), with the pixels where a server holds
    them (the CPU); on a GPU also with the pixels already there (``"<b> on device"``): the difference is the
    host-side cost per image (2026-12-02, float32 pixels: 1530 vs ~41 600 images/s at 256 on an H200)."""
    from p4q_engine.runtime.engine import Engine

    torch.set_num_threads(threads)
    engine = Engine.load(artifact, device)
    out = {}
    places = [("", "cpu")] + ([(" on device", device)] if device != "cpu" else [])
    for suffix, where in places:
        for b in sizes:
            shape = (b, 3, *engine.image_size)
            if getattr(engine.transform, "raw_ok", False):  # what the servers hand over: 8-bit pixels
                x = torch.randint(0, 256, shape, dtype=torch.uint8).to(where)
            else:
                x = torch.randn(shape, device=where)
            engine.embed(x, batch_size=b)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                engine.embed(x, batch_size=b)
                n += b
            out[f"{b}{suffix}" if suffix else b] = round(n / (time.perf_counter() - t0), 1)
    return out


def run_serve(args: argparse.Namespace, tmp: Path) -> list[dict]:
    rows = []
    configs = SERVE_CONFIGS[args.device]
    order = [int(i) for i in args.configs.split(",")] if args.configs else range(len(configs))
    for k in order:
        name, source, extra = configs[k]
        out = tmp / f"run{k}"
        cmd = [
            sys.executable,
            str(REPO / "benchmarks/serve_load.py"),
            "--artifact",
            args.artifact,
            "--image-source",
            source,
            "--device",
            args.device,
            "--threads",
            str(args.threads),
            "--requests",
            str(args.requests),
            "--levels",
            args.levels,
            "--time-limit",
            str(args.time_limit),
            "--ready-timeout",
            "150",
            "--out",
            str(out),
        ] + (["--server-args", extra] if extra else [])
        print(f"== {name} [{source}]: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.run(cmd, cwd=REPO).returncode
        try:
            report = json.loads(out.with_suffix(".json").read_text())
        except OSError:  # the server never became ready (e.g. Ray missing): a row that says so, the rest still run
            print(f"== {name}: no report (rc {rc})", flush=True)
            report = {"artifact": args.artifact, "levels": [], "error": f"no report, rc {rc}"}
        rows.append({"name": name, "images": source, "server_args": extra, "rc": rc, "report": report})
        # kept as each configuration ends: a run stopped by a time limit still leaves what it measured
        Path(args.out_dir, f"ray_serve_{args.device}_partial.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def serve_markdown(rows: list[dict], ceiling: dict[int | str, float], meta: dict, command: str) -> str:
    md = [
        f"# Ray Serve vs the single-process server ({meta['device']})",
        "",
        f"- command: `{command}`",
        f"- date: {meta['date']}; machine: {meta['cpu_count']} CPUs ({meta['platform']}), shared with another "
        f"engineer's work; Python {meta['python']}, torch {meta['torch']}, ray {meta['ray']}; 1/5/15-min load "
        f"average at the end {meta['load_average_at_end']}",
        f"- artifact: {rows[0]['report']['artifact']}",
        "- load: `benchmarks/serve_load.py` (raw asyncio HTTP/1.1 keep-alive clients on the same 2 cores, 1 image "
        "per multipart request; lost = non-200 or no answer, wrong = top-1 label or probability (1e-4) differs from "
        "`Engine.classify`); server and engine replicas run torch with 1 thread; Ray Serve runs on a local cluster "
        "the server started (`ray.init()`, 2 CPUs), engine and HTTP replicas reserve 0.5 CPU each",
        "- images: `reference` = the reference task's 32x32 PNGs (as in serve_load_cpu.md); `jpeg224` = the same "
        "upscaled to 224x224 JPEG (decode + resize per request)",
        "",
        "| server | images | clients | ok | lost | wrong | req/s | p50 ms | p99 ms | mean batch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for lv in r["report"]["levels"]:
            md.append(
                f"| {r['name']} | {r['images']} | {lv['concurrency']} | {lv['ok']}/{lv['requests_planned']} | "
                f"{lv['lost']} | {lv['wrong']} | {lv['req_per_s']} | {lv['p50_ms']} | {lv['p99_ms']} | "
                f"{lv['mean_batch']} |"
            )
    md += [
        "",
        f"Engine ceiling (in-process `Engine.embed` on preprocessed pixels, {meta['device']}, same artifact):",
        "",
        "| batch | images/s |",
        "|---:|---:|",
        *[f"| {b} | {v} |" for b, v in ceiling.items()],
    ]
    return "\n".join(md) + "\n"


def run_data(args: argparse.Namespace, tmp: Path) -> dict:
    """Local job vs Ray Data job on ``--data-images`` 224 px JPEGs."""
    from PIL import Image

    from p4q_engine.batch.classify import JobOptions, run_local
    from p4q_engine.batch.ray_job import RayJobOptions, run_ray
    from p4q_engine.data.reference import ReferenceDataset
    from p4q_engine.runtime.engine import Engine

    d = tmp / "images"
    d.mkdir()
    ds = ReferenceDataset("test", size=args.data_images, transform=lambda im: im)
    for i in range(args.data_images):
        ds[i][0].resize((224, 224), Image.BICUBIC).save(d / f"{i:05d}.jpg", quality=90)
    torch.set_num_threads(args.threads)
    engine = Engine.load(args.artifact, args.device)
    opts = JobOptions(batch_size=64, decode_workers=args.decode_workers)
    local = run_local(engine, str(d), str(tmp / "local.parquet"), opts, progress=False)
    import pyarrow.parquet as pq
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    runs = {}
    placements = {k: RayJobOptions(**v) for k, v in DATA_PLACEMENTS[args.device].items()}
    for name, placement in placements.items():
        t0 = time.perf_counter()
        res = run_ray(
            args.artifact, str(d), str(tmp / "ray.parquet"), opts, placement, progress=False, threads=args.threads
        )
        wall = time.perf_counter() - t0
        a, b = pq.read_table(tmp / "local.parquet").to_pylist(), pq.read_table(tmp / "ray.parquet").to_pylist()
        same = sum(x["labels"] == y["labels"] and x["error"] == y["error"] for x, y in zip(a, b))
        runs[name] = {"images": res.images, "errors": res.errors, "pipeline_s": round(res.seconds, 2)}
        runs[name] |= {"wall_s": round(wall, 2), "images_per_s": round(res.images / res.seconds, 1), "same": same}
    ray.shutdown()
    local_row = {"images": local.images, "errors": local.errors, "pipeline_s": round(local.seconds, 2)}
    local_row |= {"images_per_s": round(local.images / local.seconds, 1), "same": local.images}
    return {f"local job ({args.decode_workers} decode threads)": local_row, **runs}


def data_markdown(runs: dict, meta: dict, command: str, n: int) -> str:
    md = [
        f"# p4q classify --input: local job vs Ray Data ({meta['device']})",
        "",
        f"- command: `{command}`",
        f"- date: {meta['date']}; machine: {meta['cpu_count']} CPUs ({meta['platform']}), shared; Python "
        f"{meta['python']}, torch {meta['torch']}, ray {meta['ray']}; load average at the end "
        f"{meta['load_average_at_end']}",
        f"- input: a directory of {n} reference-task images upscaled to 224x224 JPEG; batch 64; torch 1 thread per "
        "engine; Ray: a local cluster (`ray.init(num_cpus=2)`), started before the timing",
        "- images/s = images / time from the first work unit to the last row written (`pipeline s`); `wall s` also "
        "counts the Ray job's actor start-up; `same` = rows whose labels and error equal the local job's",
        "",
        "| job | images | errors | pipeline s | wall s | images/s | same as local |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        md.append(
            f"| {name} | {r['images']} | {r['errors']} | {r['pipeline_s']} | {r.get('wall_s', r['pipeline_s'])} | "
            f"{r['images_per_s']} | {r['same']}/{r['images']} |"
        )
    return "\n".join(md) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--only", choices=("serve", "data"), default=None)
    p.add_argument("--levels", default="1,8,64")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--data-images", type=int, default=2000)
    p.add_argument("--out-dir", default=str(REPO / "benchmarks/results"))
    p.add_argument("--device", choices=tuple(SERVE_CONFIGS), default="cpu")
    p.add_argument("--time-limit", type=float, default=40.0, help="seconds per load level before it stops issuing")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of every engine")
    p.add_argument("--decode-workers", type=int, default=2, help="the local dataset job's decode threads")
    p.add_argument("--configs", default="", help="serve: indices into SERVE_CONFIGS[device], in this order")
    args = p.parse_args(argv)
    tag = "cpu" if args.device == "cpu" else "gpu"
    command = "python benchmarks/ray_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out_dir)
    bad = 0
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if args.only in (None, "serve"):
            levels = sorted({int(x) for x in args.levels.split(",")} | {1, 8, 64})
            # the ceiling first, in the same run: a time limit that ends the serving rows still leaves it
            ceiling = engine_ceiling(args.artifact, levels, threads=args.threads, device=args.device)
            Path(args.out_dir, f"ray_serve_{tag}_ceiling.json").write_text(json.dumps(ceiling) + "\n")
            rows = run_serve(args, tmp)
            meta = versions() | {"device": device_name(args.device)}
            (out / f"ray_serve_{tag}.json").write_text(
                json.dumps({**meta, "command": command, "engine_ceiling": ceiling, "runs": rows}, indent=2) + "\n"
            )
            (out / f"ray_serve_{tag}.md").write_text(serve_markdown(rows, ceiling, meta, command))
            bad += sum(lv["lost"] + lv["wrong"] for r in rows for lv in r["report"]["levels"])
        if args.only in (None, "data"):
            runs = run_data(args, tmp)
            meta = versions() | {"device": device_name(args.device)}
            (out / f"ray_data_{tag}.json").write_text(json.dumps({**meta, "command": command, "runs": runs}, indent=2))
            (out / f"ray_data_{tag}.md").write_text(data_markdown(runs, meta, command, args.data_images))
    print(f"wrote {out}/ray_serve_{tag}.* and/or ray_data_{tag}.*; lost+wrong {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
