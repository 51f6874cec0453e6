"""``p4q serve --backend ray``: the same HTTP API as ``p4q serve``, as a Ray Serve application with engine replicas.

Why Ray: one Python process bounds the single-process server (HTTP handling and image decoding share one
interpreter while the GPU idles), and spreading it over processes, GPUs and machines needs placement, health
checks, restarts, routing and back-pressure. Ray Serve is a maintained engine that does all of that; this module
only says what runs where. Three deployments (model composition through ``DeploymentHandle``):

``HttpReplica`` (``--http-replicas``, CPU)
    the Starlette app of :mod:`p4q_engine.serve.app` - the same routes, body parsing, validation, decoding limits,
    error kinds and JSON shapes as the single-process server, because it *is* that app, built with a
    :class:`RayEngineBackend` instead of the local batcher. Image decoding happens here, in these processes, so
    it is off the engine replicas' critical path: only preprocessed pixels travel to them.
``EngineReplica`` (``--replicas``, ``--gpus-per-replica``, ``--cpus-per-replica``)
    one :class:`~p4q_engine.runtime.engine.Engine` each, batching per replica with the project's
    :class:`~p4q_engine.serve.batcher.Batcher` (``--ray-batching p4q``, counts images) or Ray Serve's
    ``@serve.batch`` (``--ray-batching serve``); ``benchmarks/results/ray_serve_cpu.md`` compares them. A replica
    whose batch worker died fails Serve's health check and is replaced.
``MetricsHub`` (one, no CPU)
    every replica pushes its Prometheus samples (the single-process server's metric names) once a second;
    ``GET /metrics`` renders them all, labelled ``deployment`` and ``replica``, plus ``p4q_serve_replicas``.

``GET /readyz`` is 503 ``not_ready`` until every engine replica has started, then 200 while at least one runs
(``replicas: {running, target, states}`` shows how many), and 503 again while none does. A request whose engine
replica dies under it is retried once on another (inference is idempotent); past the engine deployment's queue
(``max_queued_requests`` = ``--max-queue``) requests get 503 ``overloaded`` with Retry-After.

The artifact is read once by the driver (``p4q serve``), put in Ray's object store and loaded from there by every
replica, so the replicas of a multi-node cluster need no shared file system - only ``p4q-engine[ray]`` installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from p4q_engine.errors import ConfigError, P4QError
from p4q_engine.serve.batcher import Batcher, BatchResult, FaultHooks
from p4q_engine.serve.config import ServeConfig
from p4q_engine.serve.errors import ServeError
from p4q_engine.serve.metrics import Metrics

log = logging.getLogger("p4q.serve")

ENGINE = "EngineReplica"
HTTP = "HttpReplica"
HUB = "MetricsHub"
#: Seconds between a replica's metric pushes, and after which a silent replica's samples are dropped.
PUSH_EVERY_S, STALE_AFTER_S = 1.0, 30.0


def require_ray(what: str = "--backend ray") -> None:
    """One clear line (a :class:`ConfigError`: ``p4q: error: ...``, exit 2) instead of an ImportError traceback."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"{what} needs Ray Serve, which is not installed ({e.name or e}): "
            "pip install 'p4q-engine[ray]' (from a checkout: pip install -c requirements.lock -e '.[ray]')"
        ) from None


@dataclass(frozen=True)
class RayOptions:
    """Placement of the Ray Serve application (the ``--backend ray`` flags)."""

    replicas: int = 1
    gpus_per_replica: Optional[float] = None
    cpus_per_replica: float = 1.0
    http_replicas: int = 1
    cpus_per_http_replica: float = 1.0
    batching: str = "p4q"
    address: Optional[str] = None
    app_name: str = "p4q"
    #: Seconds between Serve's health checks of a replica (its default is 10; a dead replica is noticed sooner).
    health_check_period_s: float = 2.0

    def __post_init__(self) -> None:
        checks = [
            (self.replicas >= 1, "--replicas must be >= 1"),
            (self.http_replicas >= 1, "--http-replicas must be >= 1"),
            (self.gpus_per_replica is None or self.gpus_per_replica >= 0, "--gpus-per-replica must be >= 0"),
            (self.cpus_per_replica >= 0, "--cpus-per-replica must be >= 0"),
            (self.cpus_per_http_replica >= 0, "--cpus-per-http-replica must be >= 0"),
            (self.batching in ("p4q", "serve"), "--ray-batching must be p4q or serve"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def from_args(cls, args: Any) -> "RayOptions":
        return cls(
            replicas=args.replicas,
            gpus_per_replica=args.gpus_per_replica,
            cpus_per_replica=args.cpus_per_replica,
            http_replicas=args.http_replicas,
            cpus_per_http_replica=args.cpus_per_http_replica,
            batching=args.ray_batching,
            address=args.address,
        )


# ---------------------------------------------------------------- artifact and model pieces
def _artifact_file(data: bytes) -> str:
    """The artifact's bytes as a temporary regular file (``artifact.format.load`` reads only regular files)."""
    fd, path = tempfile.mkstemp(suffix=".p4q", prefix="p4q-replica-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _fetch(artifact: list) -> bytes:
    """The artifact bytes from the object store (wrapped in a list so Serve passes the ObjectRef, not its value)."""
    import ray

    ref = artifact[0]
    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


class Frontend:
    """What the HTTP replicas need of a model: class names and preprocessing, read and checked exactly as the engine
    reads them (``Engine._build_common``), without building the image tower."""

    def __init__(self, data: bytes) -> None:
        from p4q_engine.artifact.format import load
        from p4q_engine.runtime.engine import Engine

        path = _artifact_file(data)
        try:
            art = load(path)
        finally:
            os.unlink(path)
        common = Engine.__new__(Engine)
        common._build_common(art)
        self.classnames, self.transform, self.image_size = common.classnames, common.transform, common.image_size
        self.manifest = art.manifest
        self.device = "ray"


# ---------------------------------------------------------------- metrics
def _snapshot(metrics: Metrics) -> list:
    return list(metrics.registry.collect())


class _Pusher:
    """A daemon thread pushing one replica's metric samples to the hub every :data:`PUSH_EVERY_S`."""

    def __init__(self, hub: Any, deployment: str, metrics: Metrics) -> None:
        self.hub, self.deployment, self.metrics = hub, deployment, metrics
        self.replica = _replica_id()
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="p4q-metrics-push", daemon=True).start()

    def push(self) -> Any:
        return self.hub.push.remote(self.deployment, self.replica, _snapshot(self.metrics))

    def _run(self) -> None:
        while not self._stop.wait(PUSH_EVERY_S):
            with contextlib.suppress(Exception):  # the hub restarting or the app shutting down: try again later
                self.push().result(timeout_s=5)


def _replica_id() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (unit tests)
        return f"pid{os.getpid()}"


def replica_states(app_name: str, deployment: str) -> dict[str, int]:
    """Serve's count of a deployment's replicas by state (``RUNNING``, ``STARTING``, ...), from its controller."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    dep = app.deployments.get(deployment) if app is not None else None
    if dep is None:
        return {}
    return {str(getattr(k, "value", k)): int(v) for k, v in dep.replica_states.items()}


class MetricsHub:
    """The latest samples of every replica, rendered as one Prometheus text page."""

    def __init__(self, app_name: str, deployments: tuple[str, ...]) -> None:
        self.app_name, self.deployments = app_name, deployments
        self._snaps: dict[tuple[str, str], tuple[float, list]] = {}

    def push(self, deployment: str, replica: str, families: list) -> None:
        self._snaps[(deployment, replica)] = (time.monotonic(), families)

    def render(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.metrics_core import GaugeMetricFamily, Metric

        now = time.monotonic()
        self._snaps = {k: v for k, v in self._snaps.items() if now - v[0] <= STALE_AFTER_S}
        merged: dict[str, Metric] = {}
        for (deployment, replica), (_, families) in sorted(self._snaps.items()):
            for fam in families:
                out = merged.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
                for s in fam.samples:
                    labels = {**s.labels, "deployment": deployment, "replica": replica}
                    out.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
        replicas = GaugeMetricFamily(
            "p4q_serve_replicas", "Replicas of each deployment by Ray Serve state", labels=["deployment", "state"]
        )
        with contextlib.suppress(Exception):  # the controller busy: the page still renders without this family
            for deployment in self.deployments:
                for state, n in replica_states(self.app_name, deployment).items():
                    replicas.add_metric([deployment, state], n)
        families = [*merged.values(), replicas]

        class _Collector:
            def collect(self) -> list:
                return families

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector())
        return generate_latest(registry)


# ---------------------------------------------------------------- engine replicas
def _error_tuple(e: ServeError) -> tuple:
    return ("error", e.kind, e.message, e.index, e.headers)


class EngineReplica:
    """One engine and its batching (see the module docstring); called by the HTTP replicas with pixels."""

    def __init__(
        self,
        artifact: list,
        device: str,
        config: ServeConfig,
        batching: str,
        hooks: Optional[FaultHooks],
        hub: Any,
    ) -> None:
        from p4q_engine.serve.server import load_engine

        if config.threads is not None:
            torch.set_num_threads(config.threads)
        path = _artifact_file(_fetch(artifact))
        try:
            self.engine, _ = load_engine(path, config, device)
        finally:
            os.unlink(path)
        self.config, self.hooks = config, hooks or FaultHooks()
        self.metrics = Metrics()
        self.batcher: Optional[Batcher] = None
        if batching == "p4q":
            self.batcher = Batcher(
                self.engine, config.max_batch, config.max_wait_s, config.max_queue, self.metrics, self.hooks
            )
            self.batcher.start()
        else:
            from ray import serve

            self._batched = serve.batch(
                max_batch_size=config.max_batch,
                batch_wait_timeout_s=config.max_wait_s,
                batch_size_fn=lambda items: sum(int(p.shape[0]) for p in items),
            )(self._run_many)
            self.metrics.worker_alive.set(1)
        self._pusher = _Pusher(hub, ENGINE, self.metrics)

    async def infer(self, pixels: torch.Tensor) -> tuple:
        """``("ok", embeddings, logits)`` of one request's pixels, or an error tuple (a ServeError's fields)."""
        try:
            if self.batcher is not None:
                job = self.batcher.submit(pixels)
                try:
                    res = await job.future
                except asyncio.CancelledError:  # the caller timed out or went away: skip its queued images
                    job.cancelled = True
                    raise
            else:
                res = await self._batched(pixels)
            return ("ok", res.embeddings, res.logits)
        except ServeError as e:
            return _error_tuple(e)

    async def _run_many(self, items: list[torch.Tensor]) -> list[BatchResult]:
        """``@serve.batch``: the requests Ray Serve collected, in one engine call (in a thread: the loop stays free)."""
        sizes = [int(p.shape[0]) for p in items]
        self.metrics.batch_size.observe(sum(sizes))
        t0 = time.perf_counter()
        try:
            emb, logits = await asyncio.to_thread(self._compute, torch.cat(items))
        finally:
            self.metrics.batch_latency.observe(time.perf_counter() - t0)
        return [BatchResult(e, l) for e, l in zip(emb.split(sizes), logits.split(sizes))]

    def _compute(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hooks.delay_s:
            time.sleep(self.hooks.delay_s)
        emb = self.engine.embed(pixels, batch_size=pixels.shape[0])
        return emb, self.engine.logit_scale * emb @ self.engine.text.T

    def info(self) -> dict[str, Any]:
        return {"device": str(self.engine.device), "classes": len(self.engine.classnames)}

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose batch worker died is replaced."""
        if self.batcher is not None and not self.batcher.alive:
            raise RuntimeError("the batch worker is not running")


# ---------------------------------------------------------------- HTTP replicas
def _ray_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(errors meaning "that replica is gone: retry elsewhere", errors meaning "the deployment is full")."""
    from ray import exceptions as rx
    from ray.serve import exceptions as sx

    gone = tuple(
        getattr(m, n)
        for m, n in (
            (rx, "ActorDiedError"),
            (rx, "ActorUnavailableError"),
            (rx, "RayActorError"),
            (sx, "DeploymentUnavailableError"),
        )
        if hasattr(m, n)
    )
    return gone, (sx.BackPressureError,)


class RayEngineBackend:
    """:class:`~p4q_engine.serve.backend.InferBackend` over the engine deployment's ``DeploymentHandle``."""

    def __init__(self, handle: Any, hub: Any, app_name: str, target: int, max_batch: int, max_queue: int) -> None:
        self.handle, self.hub, self.app_name, self.target = handle, hub, app_name, target
        self.max_batch, self.max_queue = max_batch, max_queue
        self.local_metrics: Optional[Metrics] = None
        self._states: tuple[float, dict[str, int]] = (0.0, {})
        self._info: Optional[dict[str, Any]] = None
        self._gone, self._full = _ray_errors()
        self._pusher: Optional[_Pusher] = None
        self._deployed = False

    def preparing(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # batching happens in the engine replicas

    def submit(self, pixels: torch.Tensor, deadline: float, timeout_s: float):
        return self._call(pixels, deadline, timeout_s)

    async def _call(self, pixels: torch.Tensor, deadline: float, timeout_s: float) -> BatchResult:
        for attempt in (1, 2):
            resp = self.handle.infer.remote(pixels)
            try:
                out = await asyncio.wait_for(resp, max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                resp.cancel()
                raise ServeError("timeout", f"no result within {timeout_s:g} s (--timeout-s)") from None
            except asyncio.CancelledError:
                resp.cancel()
                raise
            except self._full:
                raise ServeError(
                    "overloaded", "every engine replica's queue is full; retry later", headers={"Retry-After": "1"}
                ) from None
            except self._gone as e:
                log.warning("engine replica lost under a request (attempt %d): %s", attempt, e.__class__.__name__)
                if attempt == 2 or time.monotonic() >= deadline:
                    raise ServeError(
                        "not_ready", "the engine replica serving this request died", headers={"Retry-After": "1"}
                    ) from None
                continue
            if out[0] == "ok":
                return BatchResult(out[1], out[2])
            _, kind, message, index, headers = out
            raise ServeError(kind, message, index=index, headers=headers)
        raise AssertionError("unreachable")

    async def _replica_states(self) -> dict[str, int]:
        at, states = self._states
        if time.monotonic() - at > 0.5:
            states = await asyncio.to_thread(replica_states, self.app_name, ENGINE)
            self._states = (time.monotonic(), states)
        return states

    async def readiness(self) -> dict[str, Any]:
        states = await self._replica_states()
        running = states.get("RUNNING", 0)
        if running == 0:
            raise ServeError("not_ready", f"no engine replica is running (0 of {self.target}; states {states})")
        if not self._deployed:  # first deployment: ready once every replica has started, then while any runs
            if running < self.target:
                raise ServeError("not_ready", f"starting: {running} of {self.target} engine replicas running")
            self._deployed = True
        if self._info is None:
            self._info = await self.handle.info.remote()
        return {
            "backend": "ray",
            **self._info,
            "max_batch": self.max_batch,
            "replicas": {"running": running, "target": self.target, "states": states},
        }

    async def metrics(self, local: bytes) -> bytes:
        """``GET /metrics``: every replica's samples from the hub (this one's pushed first, so they are current)."""
        if self._pusher is not None:
            await self._pusher.push()
        return await self.hub.render.remote()

    async def start(self) -> None:
        if self.local_metrics is not None:
            self._pusher = _Pusher(self.hub, HTTP, self.local_metrics)

    async def stop(self) -> None:
        pass


class HttpReplica:
    """The single-process server's Starlette app, with the engine replicas as its backend."""

    def __init__(self, artifact: list, config: ServeConfig, engine: Any, hub: Any, app_name: str, target: int) -> None:
        from PIL import Image

        from p4q_engine.runtime.images import JPEG_DECLARED_FACTOR
        from p4q_engine.serve.app import create_app

        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, config.max_pixels * JPEG_DECLARED_FACTOR)
        frontend = Frontend(_fetch(artifact))
        backend = RayEngineBackend(engine, hub, app_name, target, config.max_batch, config.max_queue)
        metrics = Metrics()
        backend.local_metrics = metrics
        self._app = create_app(frontend, config, backend=backend, server_metrics=metrics)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app


# ---------------------------------------------------------------- application
def build_app(artifact: list, config: ServeConfig, options: RayOptions, hooks: Optional[FaultHooks] = None) -> Any:
    """The bound Serve application (HTTP replicas -> engine replicas, plus the metrics hub)."""
    import ray
    from ray import serve

    gpus = options.gpus_per_replica
    if gpus is None:
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        gpus = 1.0 if config.device.startswith("cuda") or (config.device == "auto" and cluster_gpus >= 1) else 0.0
    device = config.device if config.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    if config.decode_workers is None:  # one decode thread per reserved CPU, not one per core of the whole node
        config = dataclasses.replace(config, decode_workers=max(1, math.ceil(options.cpus_per_http_replica)))
    hub = serve.deployment(
        MetricsHub, name=HUB, num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000
    ).bind(options.app_name, (HTTP, ENGINE))
    engine = serve.deployment(
        EngineReplica,
        name=ENGINE,
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": gpus},
        max_ongoing_requests=max(config.max_queue, 2 * config.max_batch),
        max_queued_requests=config.max_queue,
        health_check_period_s=options.health_check_period_s,
        health_check_timeout_s=30.0,
    ).bind(artifact, device, config, options.batching, hooks, hub)
    http = serve.deployment(
        serve.ingress()(HttpReplica),
        name=HTTP,
        num_replicas=options.http_replicas,
        ray_actor_options={"num_cpus": options.cpus_per_http_replica},
        max_ongoing_requests=max(64, config.max_queue),
        health_check_period_s=options.health_check_period_s,
    ).bind(artifact, config, engine, hub, options.app_name, options.replicas)
    return http


def connect(options: RayOptions) -> None:
    """Join ``--address`` (or RAY_ADDRESS), else start a local cluster; a no-op when Ray is already initialized."""
    import ray

    if not ray.is_initialized():
        ray.init(address=options.address, include_dashboard=False, logging_level=logging.WARNING)


def start(
    artifact_path: str,
    config: ServeConfig,
    options: RayOptions,
    hooks: Optional[FaultHooks] = None,
    route_prefix: str = "/",
) -> Any:
    """Join (or start) a Ray cluster, start Serve's HTTP proxy on ``config.host:config.port`` (if Serve is not
    running there yet) and deploy the app under ``route_prefix``. Returns the ingress handle once every replica is
    up."""
    import ray
    from ray import serve

    data = open(artifact_path, "rb").read()
    Frontend(data)  # a bad artifact: one p4q: error line here, not replicas failing in a loop
    connect(options)
    serve.start(
        http_options={"host": config.host, "port": config.port, "request_timeout_s": config.timeout_s + 10},
    )
    app = build_app([ray.put(data)], config, options, hooks)
    logging_config = {"log_level": config.log_level.upper(), "enable_access_log": config.access_log}
    return serve.run(app, name=options.app_name, route_prefix=route_prefix, logging_config=logging_config)


def serve_ray(artifact_path: str, config: ServeConfig, options: RayOptions) -> int:
    """``p4q serve --backend ray``: deploy, serve until SIGTERM/SIGINT, then delete the application (exit 0)."""
    import ray
    from ray import serve

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    try:
        Frontend(open(artifact_path, "rb").read())  # a bad artifact fails before a cluster starts
        connect(options)
        for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own fatal-signal handler
            signal.signal(sig, lambda *_: stop.set())
        start(artifact_path, config, options, FaultHooks.from_env())
        log.info(
            "serving on http://%s:%d: %d engine replica(s), %d HTTP replica(s), batching %s",
            config.host,
            config.port,
            options.replicas,
            options.http_replicas,
            options.batching,
        )
        stop.wait()
        log.info("stopping: deleting the application")
        serve.delete(options.app_name)
    except P4QError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray's deployment failures are long; one line, the log has the rest
        raise ConfigError(f"the Ray Serve application did not start: {str(e).splitlines()[0][:300]}") from None
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()  # a local cluster this process started goes with it; a joined cluster keeps running
    return 0
