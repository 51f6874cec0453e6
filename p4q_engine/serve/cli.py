"""The ``p4q serve`` subcommand: its options and how they become a :class:`ServeConfig` and connection limits.

Kept beside the server rather than in :mod:`p4q_engine.cli` (which only registers it), so the serving options live
with the code they configure.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from p4q_engine.errors import ConfigError


def add_serve_parser(sub, choice: Callable) -> None:
    """Register ``serve`` on the CLI's subparsers (``choice``: the CLI's validator of enumerated options)."""
    v = sub.add_parser("serve", help="serve a .p4q artifact over HTTP (classify/embed with dynamic batching)")
    v.add_argument("artifact")
    v.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    v.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    v.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    v.add_argument("--max-batch", type=int, default=64, help="most images per engine call")
    v.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="longest a batch waits for more images after its first one (only while other requests "
        "are still being read or decoded)",
    )
    v.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="most images waiting for the engine; beyond it requests get 503 + Retry-After",
    )
    v.add_argument("--timeout-s", type=float, default=30.0, help="per-request deadline (504 past it)")
    v.add_argument("--max-body-bytes", type=int, default=32 * 2**20, help="request body cap (413 over it)")
    v.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="decoded pixels per image cap (decompression bombs; default: 16777216 = 4096x4096)",
    )
    v.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads for the engine (default: torch's, one per core)",
    )
    v.add_argument(
        "--log-level", default="info", type=choice(("critical", "error", "warning", "info", "debug"), "log level")
    )
    v.add_argument("--access-log", action="store_true", help="log every request")
    v.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip running every batch bucket before ready (GPU: tuning and graph capture then happen "
        "under the first requests)",
    )
    v.add_argument(
        "--header-timeout-s",
        type=float,
        default=10.0,
        help="seconds a connection may take to send a complete request head (408 / closed past it)",
    )
    v.add_argument(
        "--timeout-keep-alive", type=float, default=5.0, help="seconds an idle keep-alive connection stays open"
    )
    v.add_argument(
        "--limit-concurrency",
        type=int,
        default=512,
        help="most open connections served at once; requests beyond get 503 overloaded (0: no limit)",
    )
    v.add_argument(
        "--max-header-bytes", type=int, default=16 * 1024, help="largest request line + headers in bytes (400 over it)"
    )
    v.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=None,
        help="seconds requests in flight may take after SIGTERM before they get 503 not_ready "
        "(default: --timeout-s + 5)",
    )
    v.add_argument("--decode-workers", type=int, default=None, help="image decode threads (default: the usable cores)")
    v.add_argument(
        "--decode-memory-mb",
        type=int,
        default=512,
        help="decoded pixels in flight across requests, MiB (one image may always decode alone)",
    )
    v.add_argument(
        "--decode-processes",
        type=int,
        default=None,
        help="decode images in N worker processes instead of threads (off the serving process's GIL)",
    )
    v.add_argument(
        "--decode-device",
        default="cpu",
        help="cpu (Pillow) or cuda[:N]: baseline JPEGs decoded by nvJPEG via torchvision, same limits",
    )
    v.add_argument(
        "--batch-invariant",
        action="store_true",
        help="GPU engine: the same answer for an image whatever it is batched with (one LN/attention tile per shape)",
    )
    v.add_argument(
        "--workers",
        type=int,
        default=1,
        help="serving processes on one port, one engine each: the HTTP work on N cores (default 1; --backend local)",
    )
    add_ray_args(v)
    v.set_defaults(func=cmd_serve)


def add_ray_args(v: argparse.ArgumentParser) -> None:
    """``--backend ray`` and its replica options (p4q_engine/serve/ray_backend.py; needs ``p4q-engine[ray]``)."""
    g = v.add_argument_group("Ray Serve backend (--backend ray; pip install 'p4q-engine[ray]')")
    g.add_argument(
        "--backend",
        default="local",
        type=_backend,
        help="local: this process (default); ray: a Ray Serve application with engine replicas",
    )
    g.add_argument("--replicas", type=int, default=1, help="engine replicas (each loads the model)")
    g.add_argument("--gpus-per-replica", type=float, default=None, help="GPUs per engine replica (default: 1 on cuda)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs reserved per engine replica")
    g.add_argument(
        "--http-replicas", type=int, default=1, help="HTTP replicas: parse, validate and decode, then call the engine"
    )
    g.add_argument("--cpus-per-http-replica", type=float, default=1.0, help="CPUs reserved per HTTP replica")
    g.add_argument(
        "--ray-batching",
        default="p4q",
        type=lambda t: _pick(t, ("p4q", "serve"), "--ray-batching"),
        help="engine-replica batching: p4q (the project's batcher, images) or serve (Ray Serve's @serve.batch)",
    )
    g.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (e.g. 10.0.0.1:6379 or auto); default: RAY_ADDRESS, else a local cluster",
    )


def _pick(text: str, options: tuple[str, ...], what: str) -> str:
    if text.lower() not in options:
        raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; choose from {', '.join(options)}")
    return text.lower()


def _backend(text: str) -> str:
    return _pick(text, ("local", "ray"), "backend")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve an artifact over HTTP with dynamic batching (see p4q_engine/serve and the README's "Serving")."""
    from p4q_engine.serve.config import ServeConfig
    from p4q_engine.serve.server import ConnectionLimits, serve

    if not Path(args.artifact).is_file():
        raise ConfigError(f"artifact {args.artifact} does not exist")
    limits = ConnectionLimits(
        header_timeout_s=args.header_timeout_s,
        timeout_keep_alive=args.timeout_keep_alive,
        limit_concurrency=args.limit_concurrency or None,
        max_header_bytes=args.max_header_bytes,
        shutdown_grace_s=args.shutdown_grace_s,
    )
    config = ServeConfig(
        host=args.host,
        port=args.port,
        device=args.device,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        timeout_s=args.timeout_s,
        max_body_bytes=args.max_body_bytes,
        threads=args.threads,
        log_level=args.log_level,
        access_log=args.access_log,
        warmup=not args.no_warmup,
        decode_workers=args.decode_workers,
        decode_memory_mb=args.decode_memory_mb,
        decode_processes=args.decode_processes,
        decode_device=args.decode_device,
        batch_invariant=args.batch_invariant,
        workers=args.workers,
        **({} if args.max_pixels is None else {"max_pixels": args.max_pixels}),
    )
    if args.backend == "ray":
        if config.workers != 1:
            raise ConfigError("--workers is for the local backend; Ray Serve scales with --http-replicas")
        from p4q_engine.serve.ray_backend import RayOptions, require_ray, serve_ray

        require_ray()
        return serve_ray(args.artifact, config, RayOptions.from_args(args))
    return serve(args.artifact, config, limits)
