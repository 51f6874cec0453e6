"""HTTP routes of ``p4q serve`` (a Starlette ASGI app, run by uvicorn in :mod:`p4q_engine.serve.server`).

=====================  ===============================================================================
``POST /v1/classify``  multipart image files or JSON ``{"images": [base64...], "top_k": 5, "labels": [...]}``
                       -> ``{"results": [{"labels": [...], "probs": [...], "indices": [...]}, ...]}``
``POST /v1/embed``     same bodies -> ``{"embeddings": [[...], ...]}`` (unit norm)
``GET /v1/labels``     -> ``{"labels": [...]}``, the artifact's classes in index order
``GET /healthz``       liveness: 200 while the process serves HTTP
``GET /readyz``        readiness: 200 only while the model is loaded, the batch worker runs and the server is not
                       shutting down; else 503
``GET /metrics``       Prometheus text format (:mod:`p4q_engine.serve.metrics`)
=====================  ===============================================================================

Results are in request order. Every error is ``{"error": {"kind", "message"[, "index"]}}``
(:mod:`p4q_engine.serve.errors`), JSON rendered ASCII-only; that includes unknown paths (a trailing slash is a 404,
never a redirect built from the Host header), unhandled bugs (500 ``internal``) and requests still unanswered when
the shutdown grace period ends (503 ``not_ready``, :class:`ShutdownGuard`).

The handler of a request reads its body (capped), parses and validates it, decodes and preprocesses its images in the
bounded decode pool (:class:`p4q_engine.serve.inputs.DecodePool`: one thread per core, a decoded-pixel memory budget,
the request's deadline enforced between images), and only then queues the pixels for the batch worker
(:mod:`p4q_engine.serve.batcher`), so one bad request never reaches a batch that others share.

The pixels go to an :class:`~p4q_engine.serve.backend.InferBackend`: this process's batcher by default, or the
engine replicas of a Ray Serve application (:mod:`p4q_engine.serve.ray_backend`, which serves this same app from
its HTTP replicas) - the routes, limits and errors are the same either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from p4q_engine.serve.backend import InferBackend, LocalBackend
from p4q_engine.serve.batcher import Batcher, FaultHooks
from p4q_engine.serve.config import ServeConfig
from p4q_engine.serve.decoding import make_decoder
from p4q_engine.serve.errors import ServeError, render_json
from p4q_engine.serve.inputs import DecodePool, ParsedRequest, check_labels, parse_form, parse_json, rank
from p4q_engine.serve.metrics import Metrics

log = logging.getLogger("p4q.serve")

ENDPOINTS = ("/v1/classify", "/v1/embed", "/v1/labels", "/healthz", "/readyz", "/metrics")
#: Bytes of an over-limit body still read (and dropped) so the client can read the 413 instead of a reset.
DRAIN_LIMIT = 8 * 2**20


class JSON(JSONResponse):
    """Every JSON answer: ASCII-only, so a class name or message with a lone surrogate cannot make it a 500."""

    def render(self, content: Any) -> bytes:
        return render_json(content)


@dataclass
class ServeState:
    engine: Any
    config: ServeConfig
    #: This process's batcher (None when another backend, e.g. Ray Serve engine replicas, runs the engine).
    batcher: Optional[Batcher]
    metrics: Metrics
    #: Runs the engine on validated pixels (LocalBackend over ``batcher`` unless create_app got another).
    backend: Optional[InferBackend] = None
    #: Set when SIGTERM/SIGINT arrived: /readyz answers 503 while in-flight requests finish.
    draining: bool = False
    started: float = field(default_factory=time.time)
    #: Decode threads, budget and deadline of request images (inputs.DecodePool).
    decoder: Optional[DecodePool] = None
    #: The app's event loop and a future that resolves when the shutdown grace period is over (set at startup).
    loop: Optional[asyncio.AbstractEventLoop] = None
    grace_over: Optional[asyncio.Future] = None

    def begin_drain(self, grace_s: float) -> None:
        """Start draining: /readyz turns 503 now, and requests still unanswered ``grace_s`` seconds from now get a
        JSON 503 (:class:`ShutdownGuard`). Safe to call from a signal handler (it only schedules work on the loop)."""
        self.draining = True
        loop, fut = self.loop, self.grace_over
        if loop is None or fut is None or loop.is_closed():
            return

        def end_grace() -> None:
            if not fut.done():
                fut.set_result(None)

        try:
            loop.call_soon_threadsafe(lambda: loop.call_later(max(0.0, grace_s), end_grace))
        except RuntimeError:  # the loop closed meanwhile: nothing is waiting any more
            pass


def error_response(state: ServeState, err: ServeError) -> JSONResponse:
    state.metrics.errors.labels(err.kind).inc()
    return JSON(err.body(), status_code=err.status, headers=err.headers)


# ---------------------------------------------------------------- body reading
async def read_body(request: Request, cap: int) -> bytes:
    """The request body, or ``payload_too_large`` if it is (or says it is) over ``cap`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_n = int(declared)
        except ValueError:
            raise ServeError("bad_request", "invalid Content-Length header") from None
        if declared_n > cap + DRAIN_LIMIT:  # answer at once; uvicorn closes the connection
            raise ServeError(
                "payload_too_large", f"body of {declared_n} bytes exceeds the {cap}-byte limit (--max-body-bytes)"
            )
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= cap:
                chunks.append(chunk)
            elif size > cap + DRAIN_LIMIT:
                break
    except ClientDisconnect:
        raise ServeError("bad_request", "client disconnected while sending the body") from None
    if size > cap:
        raise ServeError("payload_too_large", f"body exceeds the {cap}-byte limit (--max-body-bytes)")
    return b"".join(chunks)


async def parse_body(request: Request, body: bytes, classify: bool, config: ServeConfig) -> ParsedRequest:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":

        async def replay() -> AsyncIterator[bytes]:
            yield body

        try:
            form = await MultiPartParser(
                request.headers,
                replay(),
                max_files=config.max_queue + 1,
                max_fields=1000,
                max_part_size=config.max_body_bytes,
            ).parse()
        except MultiPartException as e:
            kind = "too_many_images" if "Too many files" in e.message else "bad_request"
            raise ServeError(kind, f"malformed multipart body: {e.message}") from None
        try:
            items = []
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    items.append((key, (value.filename, await value.read())))
                else:
                    items.append((key, value))
        finally:
            await form.close()
        return parse_form(items, classify)
    if ctype == "application/json" or ctype.endswith("+json"):
        try:
            return await run_in_threadpool(parse_json, body, classify)
        except ValueError as e:  # json.loads past sys.get_int_max_str_digits() (4300-digit int literals)
            raise ServeError(
                "bad_json", f"body is not valid JSON ({e.__class__.__name__}: {str(e).split(';')[0][:120]})"
            ) from None
    raise ServeError(
        "unsupported_media_type",
        f"content type {ctype or 'none'!r}: send multipart/form-data image "
        "files or application/json with base64 images",
    )


# ---------------------------------------------------------------- inference routes
async def _infer(request: Request, classify: bool) -> Response:
    state: ServeState = request.app.state.serve
    cfg, engine = state.config, state.engine
    deadline = time.monotonic() + cfg.timeout_s
    try:
        with state.backend.preparing():  # a local batch that starts meanwhile waits (<= --max-wait-ms) for these
            try:
                body = await asyncio.wait_for(read_body(request, cfg.max_body_bytes), cfg.timeout_s)
            except asyncio.TimeoutError:
                raise ServeError("timeout", f"body not received within {cfg.timeout_s:g} s (--timeout-s)") from None
            parsed = await parse_body(request, body, classify, cfg)
            del body
            subset = check_labels(parsed.labels, engine.classnames) if classify else None
            if len(parsed.images) > cfg.max_queue:
                raise ServeError(
                    "too_many_images",
                    f"{len(parsed.images)} images in one request; this server "
                    f"queues at most {cfg.max_queue} (--max-queue)",
                )
            pixels = await state.decoder.prepare(engine, parsed, cfg.max_pixels, deadline, cfg.timeout_s)
            pending = state.backend.submit(pixels, deadline, cfg.timeout_s)  # queued, or a ServeError (refused)
        state.metrics.images.labels(request.url.path).inc(int(pixels.shape[0]))
        result = await pending
        if classify:
            payload = {"results": rank(result.logits, engine.classnames, parsed.top_k, subset)}
        else:
            payload = {"embeddings": result.embeddings.tolist()}
        return JSON(payload)
    except ServeError as e:
        return error_response(state, e)
    except Exception as e:  # a bug, not the client's fault: answer 500 for this request only
        log.exception("request to %s failed", request.url.path)
        return error_response(state, ServeError("internal", f"internal error ({e.__class__.__name__})"))


async def classify(request: Request) -> Response:
    return await _infer(request, classify=True)


async def embed(request: Request) -> Response:
    return await _infer(request, classify=False)


# ---------------------------------------------------------------- other routes
async def labels(request: Request) -> Response:
    return JSON({"labels": list(request.app.state.serve.engine.classnames)})


async def healthz(request: Request) -> Response:
    return JSON({"status": "ok"})


async def readyz(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    if state.draining:
        return error_response(state, ServeError("not_ready", "shutting down"))
    try:
        fields = await state.backend.readiness()
    except ServeError as e:
        return error_response(state, e)
    return JSON({"status": "ready", **fields})


async def metrics(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    body = state.metrics.render()
    gather = getattr(state.backend, "metrics", None)  # Ray Serve: every replica's samples, not only this one's
    if gather is not None:
        body = await gather(body)
    return Response(body, media_type=state.metrics.content_type)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own HTTP errors (unknown path, wrong method) in the same JSON shape."""
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
        exc.status_code, "internal" if exc.status_code >= 500 else "bad_request"
    )
    err = ServeError(kind, str(exc.detail), headers=dict(exc.headers or {}))
    resp = error_response(request.app.state.serve, err)
    resp.status_code = exc.status_code
    return resp


async def internal_error(request: Request, exc: Exception) -> Response:
    """Any exception no handler caught (a bug): JSON 500 instead of Starlette's plain-text page (Starlette then
    re-raises it, so uvicorn logs the traceback)."""
    return error_response(request.app.state.serve, ServeError("internal", f"internal error ({exc.__class__.__name__})"))


# ---------------------------------------------------------------- shutdown guard
class ShutdownGuard:
    """Bounds shutdown: a request still unanswered when the grace period ends gets a JSON 503 ``not_ready``.

    Each HTTP request runs in a child task; the guard waits for it or for ``state.grace_over``, whichever comes
    first. Waiting on the child (instead of relying on cancellation reaching the handler) matters because a handler
    may sit in a worker thread (decoding) that a cancel cannot interrupt: the answer goes out at once and the child
    is cancelled behind it, its late sends dropped. uvicorn's own cancellation (its ``timeout_graceful_shutdown``,
    set a little longer) is caught the same way, so it never writes its plain-text 500."""

    def __init__(self, app: ASGIApp, state: ServeState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        grace_over = self.state.grace_over
        if scope["type"] != "http" or grace_over is None:
            await self.app(scope, receive, send)
            return
        progress = {"started": False, "ours": False}

        async def guarded_send(message: dict) -> None:
            if progress["ours"]:
                return  # the 503 already went out; the abandoned handler's answer is dropped
            if message["type"] == "http.response.start":
                progress["started"] = True
            await send(message)

        child = asyncio.ensure_future(self.app(scope, receive, guarded_send))
        try:
            await asyncio.wait((child, grace_over), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # uvicorn's graceful-shutdown limit passed first: answer, do not re-raise
            pass
        if child.done():
            child.result()  # re-raise a handler's exception for Starlette's error middleware
            return
        if progress["started"]:  # mid-answer (a one-shot JSON body): let it finish, briefly
            await asyncio.wait((child,), timeout=1.0)
            if child.done():
                child.result()
                return
        child.cancel()
        child.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no "never retrieved" log
        progress["ours"] = True
        if not progress["started"]:
            err = ServeError(
                "not_ready",
                "shutting down: no answer within the shutdown grace period (--shutdown-grace-s)",
                headers={"Retry-After": "1", "Connection": "close"},
            )
            log.warning("answering 503 to %s %s: shutdown grace period over", scope.get("method"), scope.get("path"))
            await error_response(self.state, err)(scope, receive, send)


# ---------------------------------------------------------------- metrics middleware
class MetricsMiddleware:
    """Counts every HTTP answer by endpoint and status and observes its latency (pure ASGI, no body buffering)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # mounted under a prefix (a Ray Serve route_prefix): the app's own path
            path = path[len(root) :]
        endpoint = path if path in ENDPOINTS else "other"
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.inflight.dec()
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


# ---------------------------------------------------------------- factory
def create_app(
    engine: Any,
    config: Optional[ServeConfig] = None,
    hooks: Optional[FaultHooks] = None,
    backend: Optional[InferBackend] = None,
    server_metrics: Optional[Metrics] = None,
) -> Starlette:
    """The ASGI app; its lifespan starts the backend (by default this process's batch worker) and, at shutdown,
    drains and stops it. ``engine`` needs ``classnames`` and ``transform`` (decoding happens here) - with another
    ``backend`` it need not hold the image tower (see ray_backend.Frontend)."""
    config = config or ServeConfig()
    m = server_metrics or Metrics()
    batcher = None
    if backend is None:
        batcher = Batcher(
            engine,
            config.max_batch,
            config.max_wait_s,
            config.max_queue,
            m,
            hooks if hooks is not None else FaultHooks.from_env(),
        )
        backend = LocalBackend(batcher, engine, config.max_batch)
    state = ServeState(engine, config, batcher, m, backend=backend)
    state.decoder = make_decoder(config, engine)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        state.grace_over = state.loop.create_future()
        await backend.start()
        log.info(
            "backend %s started (max batch %d, max wait %g ms, queue %d images)",
            type(backend).__name__,
            config.max_batch,
            config.max_wait_ms,
            config.max_queue,
        )
        try:
            yield
        finally:
            state.draining = True
            await backend.stop()
            state.decoder.shutdown()
            if batcher is not None:
                log.info("batch worker stopped after %d batches", batcher.batches)

    routes = [
        Route("/v1/classify", classify, methods=["POST"]),
        Route("/v1/embed", embed, methods=["POST"]),
        Route("/v1/labels", labels, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    # Middleware order: Starlette's error middleware (-> internal_error) > metrics (counts the guard's 503s too) >
    # shutdown guard > exception middleware (-> http_error) > router.
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        middleware=[Middleware(MetricsMiddleware, metrics=m), Middleware(ShutdownGuard, state=state)],
    )
    app.router.redirect_slashes = False  # "/v1/labels/" is a 404, not a 307 whose Location trusts the Host header
    app.state.serve = state
    return app
