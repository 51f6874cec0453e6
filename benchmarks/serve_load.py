"""Bounded load test of ``p4q serve``: throughput and latency at 1, 8 and 64 concurrent clients, every answer checked.

    python benchmarks/serve_load.py                          # tiny random artifact, own server on a free port
    python benchmarks/serve_load.py --artifact /tmp/ref.p4q  # e.g. from `p4q export --bits 4-4-8 --out /tmp/ref.p4q`
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --artifact model.p4q   # a server already running
    python benchmarks/serve_load.py --hostile-mix            # good and bad requests mixed, 64 clients, peak RSS

Loopback only (``--url`` must name 127.0.0.0/8, localhost or ::1). Each concurrency level sends a fixed number of
requests (``--requests``) from that many concurrent clients and stops issuing new ones after ``--time-limit``
seconds. Every 200 answer's top-1 label (and its probability, to 1e-4) is compared with what a local
:class:`Engine` gives the same image; non-200 answers and transport errors count as lost, mismatches as wrong, and
the script exits 1 if any was lost or wrong. Results go to ``<out>.json`` and ``<out>.md`` (default
``benchmarks/results/serve_load_cpu``).

The clients run on the same machine as the server and take CPU from it; on a 2-core machine the numbers are a
lower bound of what the server alone would do.

``--hostile-mix``: instead of the levels, ``--requests`` requests at ``--levels`` clients (the last level), cycling
through good requests (multipart and JSON, with and without a label subset) and every documented kind of bad one
(undecodable and truncated images, too many pixels, bad base64, bad and big-integer JSON, over-size body, unknown
label, bad top_k, wrong method, trailing slash, unsupported content type). lost = no answer or one with a status
other than its case's; wrong = a good answer that differs from ``Engine.classify`` (labels, indices, probabilities
to 1e-4) or a bad one whose error kind/shape differs. The server's ``/metrics`` counters must reconcile with what
the clients saw, and its peak RSS (``VmHWM`` of ``/proc/<pid>/status``; ``--server-pid`` with ``--url``) is
reported. Results go to ``benchmarks/results/serve_hostile_cpu`` by default.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p4q_engine.runtime.engine import Engine  # noqa: E402

TINY_NAME = "P4Q-Serve-Bench-Tiny"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2},
}


def build_tiny_artifact(path: Path) -> str:
    """A random tiny open_clip ViT, 4-4-8 PTQ, folded (the same recipe as the serve tests' fixture)."""
    import open_clip

    from p4q_engine.artifact.fold import fold
    from p4q_engine.artifact.format import save
    from p4q_engine.clip.calibrate import calibrate
    from p4q_engine.clip.qmodel import quantize_clip
    from p4q_engine.clip.recipe import QuantRecipe

    torch.manual_seed(0)
    (path.parent / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path.parent)
    m = open_clip.create_model(TINY_NAME).eval()
    q = quantize_clip(m, QuantRecipe("4-4-8", observer="minmax"))  # minmax: calibration in a blink
    tok = torch.randint(1, 98, (10, 16))
    tok[:, 8], tok[:, 9:] = 99, 0
    calibrate(q, [torch.randn(16, 3, 32, 32)], tok, progress=False)
    with torch.no_grad():
        tf = torch.nn.functional.normalize(q.encode_text(tok), dim=-1)
    save(fold(q, tf, [f"class {i}" for i in range(10)], {"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}), path)
    return (
        "random tiny open_clip ViT (32 px, 2 layers, width 64, 10 classes), 4-4-8 PTQ (full scope, minmax "
        "observer), folded .p4q - the serve tests' fixture"
    )


def describe_artifact(path: str, engine: Engine) -> dict:
    """What was served: the file (path, size, sha256) and what its manifest says it holds."""
    import hashlib

    data = Path(path).read_bytes()
    man = engine.manifest
    model, v = man.get("model") or {}, man.get("vision") or {}
    recipe = model.get("recipe") or {}
    return {
        "path": str(path),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "model": model.get("name"),
        "source": model.get("source"),
        "dataset": model.get("dataset"),
        "export_command": model.get("command"),
        "recipe": recipe,
        "vision": {k: v.get(k) for k in ("image_size", "patch_size", "width", "layers", "heads")},
        "classes": len(engine.classnames),
        "adapter": man.get("adapter") is not None,
    }


def make_images(n: int, source: str) -> tuple[list[bytes], str]:
    """PNG bytes of ``n`` images: the embedded reference task's test images, or random noise of mixed sizes."""
    from PIL import Image

    out = []
    if source in ("reference", "jpeg224"):
        from p4q_engine.data.reference import ReferenceDataset

        ds = ReferenceDataset("test", size=n, transform=lambda im: im)
        jpeg = source == "jpeg224"  # what a camera client sends: 224 px JPEGs (decode + resize cost per request)
        for i in range(n):
            buf = io.BytesIO()
            img = ds[i][0].resize((224, 224), Image.BICUBIC) if jpeg else ds[i][0]
            img.save(buf, format="JPEG" if jpeg else "PNG", **({"quality": 90} if jpeg else {}))
            out.append(buf.getvalue())
        if jpeg:
            return out, f"{n} reference-task test images upscaled to 224x224 px (JPEG, quality 90)"
        return out, f"{n} reference-task test images (PNG)"
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        w, h = 32 + 8 * (i % 5), 32 + 8 * ((i // 5) % 5)
        arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out, f"{n} random-noise RGB images, 32..64 px per side (PNG)"


def report_header(command: str, description: dict, info: dict, image_desc: str) -> dict:
    """What every serve report records first: the command, when, on what machine, and which artifact and images."""
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "artifact": description,
        "artifact_info": info,
        "images": image_desc,
    }


def machine_line(report: dict) -> str:
    """The report's machine line in Markdown (the clients share the machine)."""
    return (
        f"- machine: {os.cpu_count()} CPUs, {report['platform']}, Python {report['python']}, torch "
        f"{torch.__version__}; 1/5/15-min load average at the end {report['load_average_at_end']} "
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    sys.exit(f"serve_load: refusing non-loopback target {host!r}")


def start_server(artifact: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str, list[str]]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "p4q_engine.cli",
        "serve",
        artifact,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        args.device,
        "--max-batch",
        str(args.max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--max-queue",
        str(args.max_queue),
        "--log-level",
        "warning",
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += shlex.split(args.server_args)
    if args.no_warmup:
        cmd += ["--no-warmup"]
    if args.hostile_mix:
        cmd += ["--max-body-bytes", str(args.max_body_bytes), "--max-pixels", str(args.max_pixels)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    end = t0 + args.ready_timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"serve_load: server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                args.ready_after_s = round(time.monotonic() - t0, 1)
                return proc, url, cmd
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"serve_load: server not ready after {args.ready_timeout:.0f} s")


def metric_sum(text: str, name: str) -> float:
    """The sum of a metric over all its label sets (one per replica under --backend ray)."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M))


class RawClient:
    """One keep-alive HTTP/1.1 connection with pre-encoded requests.

    The load generator runs on the same 2 cores as the server, so it has to be cheap: httpx spends ~10 ms of CPU per
    request at 64 connections (its pool is scanned per request), which made the client, not the server, the
    bottleneck. This client only writes bytes and reads ``Content-Length`` bodies (uvicorn always sends one)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(raw)
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
            if headers.get("connection", "").lower() == "close":
                await self.close()
            return status, body
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


def encode_http(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    ctype: Optional[str] = None,
    declared: Optional[int] = None,
) -> bytes:
    """One raw HTTP/1.1 request (keep-alive)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if ctype:
        head += f"Content-Type: {ctype}\r\n"
    if body or method == "POST":
        head += f"Content-Length: {len(body) if declared is None else declared}\r\n"
    return (head + "\r\n").encode() + body


def encode_request(host: str, port: int, images: list[bytes]) -> bytes:
    """A multipart ``POST /v1/classify`` with ``top_k=1``."""
    boundary = "p4qloadboundary"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + im
        + b"\r\n"
        for i, im in enumerate(images)
    )
    body += f'--{boundary}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n1\r\n--{boundary}--\r\n'.encode()
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def run_level(
    url: str,
    images: list[bytes],
    expected: list[tuple[str, float]],
    concurrency: int,
    requests: int,
    per_request: int,
    time_limit: float,
) -> dict:
    """``requests`` POSTs (``per_request`` images each) from ``concurrency`` clients; every answer verified."""
    u = urlparse(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    latencies: list[float] = []
    counts = {"ok": 0, "lost": 0, "wrong": 0, "issued": 0}
    errors: dict[str, int] = {}
    next_i = 0
    deadline = time.monotonic() + time_limit

    def idx_of(i: int) -> list[int]:
        return [(i * per_request + j) % len(images) for j in range(per_request)]

    raws = {i: encode_request(host, port, [images[k] for k in idx_of(i)]) for i in range(len(images))}

    async def client() -> None:
        nonlocal next_i
        conn = RawClient(host, port)
        try:
            while next_i < requests and time.monotonic() < deadline:
                i = next_i
                next_i += 1
                counts["issued"] += 1
                idx = idx_of(i)
                t0 = time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(conn.request(raws[i % len(images)]), 60)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:
                    counts["lost"] += 1
                    errors[e.__class__.__name__] = errors.get(e.__class__.__name__, 0) + 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    counts["lost"] += 1
                    errors[str(status)] = errors.get(str(status), 0) + 1
                    continue
                results = json.loads(body).get("results", [])
                if len(results) == len(idx) and all(
                    res["labels"][0] == expected[k][0] and abs(res["probs"][0] - expected[k][1]) <= 1e-4
                    for res, k in zip(results, idx)
                ):
                    counts["ok"] += 1
                else:
                    counts["wrong"] += 1
        finally:
            await conn.close()

    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        before = (await c.get("/metrics")).text
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        after = (await c.get("/metrics")).text
    batches = metric_sum(after, "p4q_serve_batch_size_count") - metric_sum(before, "p4q_serve_batch_size_count")
    batched = metric_sum(after, "p4q_serve_batch_size_sum") - metric_sum(before, "p4q_serve_batch_size_sum")
    lat = sorted(latencies)

    def pct(p: float) -> Optional[float]:
        return round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else None

    return {
        "concurrency": concurrency,
        "requests_planned": requests,
        "requests_issued": counts["issued"],
        "images_per_request": per_request,
        "ok": counts["ok"],
        "lost": counts["lost"],
        "wrong": counts["wrong"],
        "errors": errors,
        "wall_s": round(wall, 3),
        "req_per_s": round(counts["ok"] / wall, 1),
        "images_per_s": round(counts["ok"] * per_request / wall, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_batch": round(batched / batches, 2) if batches else None,
        "hit_time_limit": counts["issued"] < requests,
    }


# ---------------------------------------------------------------- hostile mix
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", default=None, help=".p4q artifact (default: build the tiny random one)")
    p.add_argument("--url", default=None, help="load an already running server (loopback only)")
    p.add_argument("--levels", default="1,8,64", help="concurrent clients per level")
    p.add_argument("--requests", type=int, default=300, help="requests per level")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--time-limit", type=float, default=30.0, help="seconds per level before it stops issuing")
    p.add_argument("--image-source", choices=("reference", "jpeg224", "random"), default="reference")
    p.add_argument(
        "--server-args", default="", help="more `p4q serve` options, e.g. '--backend ray --replicas 2' (quoted)"
    )
    p.add_argument("--num-images", type=int, default=64, help="distinct images cycled through")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-warmup", action="store_true", help="start the server with --no-warmup")
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for /readyz (a GPU server autotunes and captures every batch bucket first)",
    )
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="the server's --threads (torch intra-op threads)")
    p.add_argument(
        "--out",
        default=None,
        help="output path stem (default: benchmarks/results/serve_load_cpu, or serve_hostile_cpu with --hostile-mix)",
    )
    p.add_argument(
        "--hostile-mix",
        action="store_true",
        help="good and bad requests mixed at the last --levels concurrency (see the module docstring)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=256 * 1024,
        help="--hostile-mix: the server's --max-body-bytes (the over-size case exceeds it)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=1_000_000,
        help="--hostile-mix: the server's --max-pixels (the too-many-pixels case exceeds it)",
    )
    p.add_argument(
        "--server-pid", type=int, default=None, help="--hostile-mix with --url: the server's pid, for its peak RSS"
    )
    p.add_argument(
        "--slow-clients",
        type=int,
        default=16,
        help="--hostile-mix: connections that send half a "
        "request head and then wait (the server must drop each with a 408 after its --header-timeout-s)",
    )
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(REPO / "benchmarks/results" / ("serve_hostile_cpu" if args.hostile_mix else "serve_load_cpu"))
    command = "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:])

    tmp = tempfile.TemporaryDirectory()
    if args.artifact:
        artifact = args.artifact
    else:
        artifact = str(Path(tmp.name) / "tiny.p4q")
        built = build_tiny_artifact(Path(artifact))
    # expected answers from an engine on the server's device: a GPU engine equals the CPU engine only up to float
    # ties (a random-weight model's near-uniform probabilities then differ by more than 1e-4)
    engine = Engine.load(artifact, args.device)
    info = describe_artifact(artifact, engine)
    if args.artifact:
        r = info["recipe"]
        description = (
            f"`{artifact}` ({info['bytes'] / 2**20:.2f} MiB, sha256 {info['sha256'][:16]}...): "
            f"{info['model'] or 'unnamed model'} ({info['source'] or 'unknown source'}"
            f"{', ' + info['dataset'] + ' calibration' if info['dataset'] else ''}), "
            f"{r.get('bits')} {r.get('scope')} scope, {r.get('observer')} observer, "
            f"ViT {'x'.join(map(str, info['vision']['image_size']))} px, patch "
            f"{'x'.join(map(str, info['vision']['patch_size']))}, "
            f"{info['vision']['layers']} layers, width {info['vision']['width']}, "
            f"{info['vision']['heads']} heads"
            + ("; with QAdapter" if info["adapter"] else "")
            + (f"; exported by `{info['export_command']}`" if info["export_command"] else "")
        )
    else:
        description = built
    try:
        images, image_desc = make_images(args.num_images, args.image_source)
    except Exception as e:  # noqa: BLE001 - the reference task is optional; fall back to noise
        print(f"reference images unavailable ({e}); using random images", file=sys.stderr)
        images, image_desc = make_images(args.num_images, "random")
    preds = engine.classify(images, top_k=1)
    expected = [(pred.labels[0], pred.probs[0]) for pred in preds]

    proc, cmd = None, None
    if args.url:
        check_loopback(args.url)
        url = args.url.rstrip("/")
    else:
        proc, url, cmd = start_server(artifact, args)
    if args.hostile_mix:
        from benchmarks.serve_hostile import hostile_main  # the --hostile-mix mode lives in its own module

        return hostile_main(args, command, url, proc, cmd, engine, images, image_desc, description, info, tmp)
    levels = []
    try:
        asyncio.run(run_level(url, images, expected, 4, 16, args.images_per_request, 10))  # warm-up
        for conc in (int(c) for c in args.levels.split(",")):
            row = asyncio.run(
                run_level(url, images, expected, conc, args.requests, args.images_per_request, args.time_limit)
            )
            levels.append(row)
            print(
                f"c={conc:3d}: {row['req_per_s']:8.1f} req/s {row['images_per_s']:8.1f} img/s  "
                f"p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  mean batch {row['mean_batch']}  "
                f"ok {row['ok']} lost {row['lost']} wrong {row['wrong']}",
                flush=True,
            )
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        tmp.cleanup()

    report = {
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else None,
        **report_header(command, description, info, image_desc),
        "torch_threads": torch.get_num_threads(),
        "expected_from": f"Engine.classify(top_k=1) on {args.device}, loaded from the same artifact file the server "
        f"serves (sha256 {info['sha256']})",
        "classes": len(engine.classnames),
        "expected_label_spread": len({label for label, _ in expected}),
        "server": {
            "url": url if args.url else "own subprocess on 127.0.0.1",
            "command": cmd,
            "device": args.device,
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "max_queue": args.max_queue,
            "threads": args.threads or "torch default",
            "extra_args": args.server_args,
            "ready_after_s": getattr(args, "ready_after_s", None),
            "warmup": not args.no_warmup,
            "autotune": os.environ.get("P4Q_AUTOTUNE", "1") != "0",
        },
        "note": "clients share the machine's CPU with the server",
        "levels": levels,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = [
        f"# p4q serve load test ({args.device})",
        "",
        f"- command: `{command}`",
        f"- date: {report['date']}",
        machine_line(report) + "(the machine is shared)" + (f"; GPU {report['gpu']}" if report.get("gpu") else ""),
        f"- artifact: {description}; {len(engine.classnames)} classes",
        f"- images: {image_desc}; {report['expected_label_spread']} distinct expected top-1 labels",
        f"- server: max batch {args.max_batch}, max wait {args.max_wait_ms} ms, queue {args.max_queue}, "
        f"torch threads {args.threads or 'default'}" + (f", `{args.server_args}`" if args.server_args else "") + "; "
        f"{args.images_per_request} image(s) per request, multipart; clients on the same machine (raw asyncio "
        "HTTP/1.1 keep-alive connections: httpx's pool costs ~10 ms of CPU per request at 64 connections)",
        "- lost = non-200 or no answer; wrong = top-1 label or its probability (1e-4) differs from the "
        f"expected answer, which is `Engine.classify(top_k=1)` of the same image by a local {args.device} Engine "
        f"loaded from the same artifact file the server serves (sha256 {info['sha256'][:16]}...), computed before "
        "the load starts",
        "",
        "| clients | requests ok | lost | wrong | req/s | images/s | p50 ms | p99 ms | mean batch |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in levels:
        md.append(
            f"| {r['concurrency']} | {r['ok']}/{r['requests_planned']} | {r['lost']} | {r['wrong']} | "
            f"{r['req_per_s']} | {r['images_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_batch']} |"
        )
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    bad = sum(r["lost"] + r["wrong"] for r in levels)
    if bad:
        print(f"serve_load: {bad} lost or wrong responses", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
