"""The dataset options of ``p4q classify`` (``--input``/``--output``/``--ray``) and their command; registered by
:mod:`p4q_engine.cli` beside the existing ``p4q classify model.p4q img.png`` form, which is unchanged."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from p4q_engine.errors import ConfigError


def add_dataset_args(c: argparse.ArgumentParser) -> None:
    g = c.add_argument_group("datasets (--input/--output; see p4q_engine/batch)")
    g.add_argument(
        "--input",
        default=None,
        help="a directory (image files, recursively), a quoted glob, or a .parquet file with an 'image' "
        "(bytes) or 'path' column",
    )
    g.add_argument("--output", default=None, help="results .parquet: one row per image, errors as rows")
    g.add_argument("--batch-size", type=int, default=64, help="images per engine call")
    g.add_argument("--labels", default=None, help="comma-separated label subset to rank (default: every class)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads of each engine")
    g.add_argument("--max-pixels", type=int, default=None, help="decoded pixels per image cap (default 4096x4096)")
    g.add_argument(
        "--max-file-bytes", type=int, default=64 * 2**20, help="larger files are error rows, never read (64 MiB)"
    )
    g.add_argument("--decode-workers", type=int, default=2, help="local job: decode threads")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = c.add_argument_group("Ray Data (--ray; pip install 'p4q-engine[ray]')")
    r.add_argument("--ray", action="store_true", help="run the job as a Ray Data pipeline (local or --address)")
    r.add_argument("--actors", type=int, default=None, help="engine actors (default: one per GPU, else 1)")
    r.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs per engine actor (default: 1 on cuda)")
    r.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per engine actor")
    r.add_argument("--decoders", type=int, default=1, help="CPU actors that read, decode and preprocess")
    r.add_argument("--cpus-per-decoder", type=float, default=1.0, help="CPUs reserved per decoder actor")
    r.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local one)")


def cmd_classify_dataset(args: argparse.Namespace) -> int:
    """``p4q classify model.p4q --input ... --output results.parquet [--ray]``."""
    from p4q_engine.batch.classify import JobOptions, require_pyarrow, run_local
    from p4q_engine.runtime.images import MAX_PIXELS

    if args.images:
        raise ConfigError("give either image files or --input, not both")
    if args.input is None or args.output is None:
        raise ConfigError("a dataset job needs both --input and --output")
    if not Path(args.artifact).is_file():
        raise ConfigError(f"artifact {args.artifact} does not exist")
    if args.threads is not None and args.threads < 1:
        raise ConfigError("--threads must be >= 1")
    labels = tuple(t.strip() for t in args.labels.split(",") if t.strip()) if args.labels else None
    options = JobOptions(
        top_k=args.top_k,
        batch_size=args.batch_size,
        max_pixels=args.max_pixels or MAX_PIXELS,
        max_file_bytes=args.max_file_bytes,
        decode_workers=args.decode_workers,
        labels=labels,
    )
    require_pyarrow()
    if args.ray:
        from p4q_engine.batch.ray_job import RayJobOptions, require_ray_data, run_ray

        require_ray_data()
        ray_opts = RayJobOptions(
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor,
            decoders=args.decoders,
            cpus_per_decoder=args.cpus_per_decoder,
            device=args.device,
            address=args.address,
        )
        result = run_ray(args.artifact, args.input, args.output, options, ray_opts, not args.no_progress, args.threads)
    else:
        import torch

        from p4q_engine.runtime.engine import Engine
        from p4q_engine.serve.server import resolve_device

        if args.threads:
            torch.set_num_threads(args.threads)
        engine = Engine.load(args.artifact, resolve_device(args.device))
        _check_labels(engine, labels)
        result = run_local(engine, args.input, args.output, options, progress=not args.no_progress)
    sys.stderr.write(result.summary() + "\n")
    return 0


def _check_labels(engine, labels) -> None:
    unknown = [l for l in labels or () if l not in engine.classnames]
    if unknown:
        raise ConfigError(f"--labels: unknown labels {', '.join(map(repr, unknown[:5]))}")
