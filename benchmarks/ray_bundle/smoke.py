#!/usr/bin/env python3
"""Smoke test of the Ray bundle: core tasks/actors, Ray Serve over HTTP, Ray Data with an actor pool.

Run (GPU machine, after unpacking the bundle):
    export PYTHONPATH=/tmp/raysite${PYTHONPATH:+:$PYTHONPATH}
    python3 .raybundle/smoke.py            # --num-cpus 4 --timeout 300 --port 0 (a free port)

Prints one "OK <step> <seconds>" line per step, "SMOKE PASSED" at the end, exit 0.
Any failure: the traceback, "FAIL <step>", "SMOKE FAILED", exit 1. A hang past --timeout: exit 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback

# before ray is imported: no usage-stats prompt/upload (there is no network), no import-order warnings
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "0")

T0 = time.perf_counter()
FAILED: list[str] = []


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def step(name: str):
    """Decorator: run the function, print OK/FAIL with its duration, remember failures."""

    def wrap(fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                out = fn(*a, **kw)
            except BaseException:  # noqa: BLE001 - a smoke test reports everything
                traceback.print_exc()
                log(f"FAIL {name} ({time.perf_counter() - t:.1f}s)")
                FAILED.append(name)
                return None
            log(f"OK {name} {time.perf_counter() - t:.2f}s")
            return out

        return run

    return wrap


def watchdog(seconds: float) -> None:
    def fire():
        log(f"TIMEOUT: not finished after {seconds:g}s; threads:")
        import faulthandler

        faulthandler.dump_traceback(all_threads=True)
        print("SMOKE FAILED (timeout)", flush=True)
        os._exit(2)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@step("import")
def do_import():
    import ray
    import ray.data  # noqa: F401
    from ray import serve  # noqa: F401

    log(f"ray {ray.__version__} from {os.path.dirname(ray.__file__)}; python {sys.version.split()[0]} {sys.executable}")
    return ray


@step("ray.init")
def do_init(ray, num_cpus: int):
    import logging

    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    log(f"cluster resources: {ray.cluster_resources()}")


@step("core task+actor")
def do_core(ray):
    @ray.remote(num_cpus=0.5)
    def square(x):
        return x * x

    @ray.remote(num_cpus=0.5)
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self, k):
            self.n += k
            return self.n

    assert ray.get([square.remote(i) for i in range(4)], timeout=120) == [0, 1, 4, 9]
    c = Counter.remote()
    ray.get([c.add.remote(1) for _ in range(3)], timeout=120)
    assert ray.get(c.add.remote(0), timeout=60) == 3
    ref = ray.put(b"x" * 1_000_000)  # the object store (plasma)
    assert len(ray.get(ref, timeout=60)) == 1_000_000
    ray.kill(c)


def http_get(url: str, timeout: float = 10.0, data: bytes | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@step("serve")
def do_serve(ray, port: int):
    """Like p4q_engine.serve.ray_backend: serve.start(http_options), a Starlette app through serve.ingress() and
    __serve_build_asgi_app__, a DeploymentHandle to a second deployment using @serve.batch, serve.status()."""
    import json

    from ray import serve
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    class Model:
        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def double(self, xs: list[int]) -> list[int]:
            return [2 * x for x in xs]

        async def infer(self, x: int) -> int:
            return await self.double(x)

        def check_health(self) -> None:
            pass

    class Http:
        def __init__(self, model):
            self.model = model

            async def ping(request: Request):
                return JSONResponse({"ok": True})

            async def infer(request: Request):
                body = await request.json()
                y = await self.model.infer.remote(int(body["x"]))
                return JSONResponse({"y": y})

            self._app = Starlette(routes=[Route("/ping", ping), Route("/infer", infer, methods=["POST"])])

        def __serve_build_asgi_app__(self):
            return self._app

    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    model = serve.deployment(
        Model,
        name="Model",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0.5},
        max_ongoing_requests=16,
        max_queued_requests=32,
        health_check_period_s=2.0,
    )
    http = serve.deployment(serve.ingress()(Http), name="Http", num_replicas=1, ray_actor_options={"num_cpus": 0.5})
    t = time.perf_counter()
    serve.run(
        http.bind(model.bind()),
        name="smoke",
        route_prefix="/",
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    )
    log(f"  serve.run returned after {time.perf_counter() - t:.1f}s")

    base = f"http://127.0.0.1:{port}"
    deadline, last = time.monotonic() + 60, None
    while time.monotonic() < deadline:  # the proxy may answer 503/404 for a moment after serve.run
        try:
            status, body = http_get(base + "/ping", timeout=5)
            if status == 200:
                break
            last = (status, body[:200])
        except OSError as e:
            last = e
        time.sleep(0.5)
    else:
        raise RuntimeError(f"GET /ping never answered 200: {last!r}")
    assert json.loads(body) == {"ok": True}, body
    t = time.perf_counter()
    for x in (1, 2, 21):
        status, body = http_get(base + "/infer", timeout=30, data=json.dumps({"x": x}).encode())
        assert status == 200 and json.loads(body) == {"y": 2 * x}, (status, body[:300])
    log(f"  3 POST /infer over HTTP in {time.perf_counter() - t:.2f}s")
    try:
        import httpx  # what the project's clients use; optional here

        r = httpx.post(base + "/infer", json={"x": 5}, timeout=30)
        assert r.status_code == 200 and r.json() == {"y": 10}, (r.status_code, r.text[:300])
        log("  httpx POST /infer ok")
    except ImportError:
        pass
    app = serve.status().applications["smoke"]
    states = {k: str(getattr(v.status, "value", v.status)) for k, v in app.deployments.items()}
    log(f"  serve.status: app {getattr(app.status, 'value', app.status)}, deployments {states}")
    serve.delete("smoke")
    serve.shutdown()


@step("data")
def do_data(ray, outdir: str):
    """Like p4q_engine.batch.ray_job: from_items, map_batches with ActorPoolStrategy (class UDFs), iter_batches in
    order, plus write_parquet / read_parquet."""
    import numpy as np
    import pyarrow as pa

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False

    class Decode:
        def __init__(self, scale: int):
            self.scale = scale

        def __call__(self, batch: dict) -> dict:
            x = np.asarray(batch["i"], np.int64)
            return {"i": x, "sq": x * x * self.scale, "vec": np.stack([np.full(4, v, np.float32) for v in x])}

    class Score:
        def __call__(self, batch: dict) -> pa.Table:
            return pa.table(
                {
                    "i": np.asarray(batch["i"]),
                    "s": np.asarray(batch["sq"]) + 1,
                    "vsum": np.asarray(batch["vec"]).sum(axis=1),
                }
            )

    n = 200
    ds = ray.data.from_items([{"i": i} for i in range(n)], override_num_blocks=8)
    ds = ds.map_batches(
        Decode, fn_constructor_args=(1,), batch_size=16, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5
    )
    ds = ds.map_batches(Score, batch_size=32, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    got = []
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        got.extend(table.column("i").to_pylist())
    assert got == list(range(n)), got[:20]
    log(f"  iter_batches: {n} rows in order")

    path = os.path.join(outdir, "out_parquet")
    ds.write_parquet(path)
    files = [f for f in os.listdir(path) if f.endswith(".parquet")]
    back = ray.data.read_parquet(path)
    rows = back.count()
    assert rows == n, rows
    total = sum(r["s"] for r in back.take_all())
    assert total == sum(i * i + 1 for i in range(n)), total
    log(f"  write_parquet: {len(files)} file(s) in {path}; read_parquet back {rows} rows")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-cpus", type=int, default=4)
    ap.add_argument("--port", type=int, default=0, help="Serve HTTP port (0: a free one)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds before the whole test is abandoned")
    ap.add_argument("--skip", default="", help="comma list of steps to skip: serve,data,core")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    watchdog(args.timeout)

    ray = do_import()
    if ray is None:
        print("SMOKE FAILED", flush=True)
        return 1
    outdir = tempfile.mkdtemp(prefix="ray-smoke-", dir="/tmp")
    try:
        do_init(ray, args.num_cpus)
        if not FAILED:
            if "core" not in skip:
                do_core(ray)
            if "serve" not in skip:
                do_serve(ray, args.port or free_port())
            if "data" not in skip:
                do_data(ray, outdir)
    finally:
        t = time.perf_counter()
        try:
            if ray.is_initialized():
                try:
                    from ray import serve

                    serve.shutdown()
                except Exception:  # noqa: BLE001
                    pass
                ray.shutdown()
            log(f"OK shutdown {time.perf_counter() - t:.2f}s")
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            FAILED.append("shutdown")
        shutil.rmtree(outdir, ignore_errors=True)
    if FAILED:
        print(f"SMOKE FAILED: {', '.join(FAILED)}", flush=True)
        return 1
    print(f"SMOKE PASSED in {time.perf_counter() - T0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
