"""The hostile-mix mode of ``benchmarks/serve_load.py`` (``--hostile-mix``): good requests interleaved with every
kind of bad one (undecodable and oversized images, bad base64 and JSON, unknown labels, protocol-level garbage, slow
clients) at many concurrent clients against a real server; reports lost / wrong answers, whether ``/metrics``
reconciles, and the server's peak RSS. Kept apart from the plain load test so each file stays one concept.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import httpx

from benchmarks.serve_load import (
    REPO,
    RawClient,
    encode_http,
    machine_line,
    report_header,
)
from p4q_engine.runtime.engine import Engine


def _multipart(images: list[bytes], fields: Optional[list[tuple[str, str]]] = None) -> tuple[bytes, str]:
    boundary = "p4qhostileboundary"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + im
        + b"\r\n"
        for i, im in enumerate(images)
    )
    for name, value in fields or []:
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def hostile_cases(
    engine: Engine, images: list[bytes], host: str, port: int, max_body: int, max_pixels: int
) -> list[dict]:
    """Every request of the mix: ``raw`` bytes, the expected ``status``, and ``kind`` (error) or ``expect`` (the
    ``Engine.classify`` answers of a good one). The server must run with ``--max-body-bytes max_body`` and
    ``--max-pixels max_pixels``."""
    import base64

    from PIL import Image

    b64 = [base64.b64encode(im).decode() for im in images]
    subset = list(engine.classnames[::2])[:4]
    cases: list[dict] = []

    def good(name: str, raw: bytes, idx: list[int], top_k: int, labels: Optional[list[str]] = None) -> None:
        preds = engine.classify([images[k] for k in idx], top_k=top_k, labels=labels)
        cases.append(
            {"name": name, "raw": raw, "status": 200, "expect": [(p.labels, p.indices, p.probs) for p in preds]}
        )

    def bad(name: str, raw: bytes, status: int, kind: str, index: Optional[int] = None) -> None:
        cases.append({"name": name, "raw": raw, "status": status, "kind": kind, "index": index})

    def post_json(obj_or_text: "dict | bytes", path: str = "/v1/classify") -> bytes:
        body = obj_or_text if isinstance(obj_or_text, bytes) else json.dumps(obj_or_text).encode()
        return encode_http(host, port, "POST", path, body, "application/json")

    n = len(images)
    for i in range(0, min(n, 16), 2):  # good ones: multipart 1-2 images, JSON with and without a subset
        body, ctype = _multipart([images[i], images[(i + 1) % n]], [("top_k", "3")])
        good(f"good_multipart_{i}", encode_http(host, port, "POST", "/v1/classify", body, ctype), [i, (i + 1) % n], 3)
        good(f"good_json_subset_{i}", post_json({"images": [b64[i]], "top_k": 2, "labels": subset}), [i], 2, subset)
        good(f"good_json_{i}", post_json({"images": [b64[(i + 3) % n]], "top_k": 5}), [(i + 3) % n], 5)
    noise = bytes(range(256)) * 8
    body, ctype = _multipart([images[0], noise])
    bad("undecodable", encode_http(host, port, "POST", "/v1/classify", body, ctype), 400, "bad_image", 1)
    body, ctype = _multipart([images[1][: len(images[1]) // 2]])
    bad("truncated_png", encode_http(host, port, "POST", "/v1/classify", body, ctype), 400, "bad_image", 0)
    side = int(max_pixels**0.5) + 16
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (40, 90, 200)).save(buf, format="PNG")  # tiny file, too many pixels
    body, ctype = _multipart([buf.getvalue()])
    bad("too_many_pixels", encode_http(host, port, "POST", "/v1/classify", body, ctype), 400, "bad_image", 0)
    bad("bad_base64", post_json({"images": [b64[0], "not base64 !!"]}), 400, "bad_base64", 1)
    bad("bad_json", post_json(b'{"images": ["' + b64[0][:20].encode() + b'",'), 400, "bad_json")
    bad(
        "big_int_json",
        post_json(b'{"images": ["' + b64[0].encode() + b'"], "top_k": ' + b"7" * 5000 + b"}"),
        400,
        "bad_json",
    )
    over = b'{"images": ["' + b"A" * (max_body + 1000) + b'"]}'  # read and dropped (under the drain limit)
    bad("oversize_body", post_json(over), 413, "payload_too_large")
    bad("unknown_label", post_json({"images": [b64[2]], "labels": ["no such class"]}), 400, "unknown_label")
    bad("bad_top_k", post_json({"images": [b64[3]], "top_k": 0}), 400, "bad_top_k")
    bad("wrong_method", encode_http(host, port, "GET", "/v1/classify"), 405, "method_not_allowed")
    bad("trailing_slash", post_json({"images": [b64[4]]}, "/v1/classify/"), 404, "not_found")
    bad(
        "text_plain",
        encode_http(host, port, "POST", "/v1/classify", b"hello", "text/plain"),
        415,
        "unsupported_media_type",
    )
    bad(
        "embed_undecodable", post_json({"images": [base64.b64encode(noise).decode()]}, "/v1/embed"), 400, "bad_image", 0
    )
    # protocol level (h11 refuses them before the app; the answer closes the connection)
    bad(
        "malformed_http",
        f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nContent-Length: abc\r\n\r\n".encode(),
        400,
        "bad_request",
    )
    bad(
        "huge_head",
        f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nX-Pad: {'p' * 20000}\r\n\r\n".encode(),
        400,
        "bad_request",
    )
    return cases


def _check(case: dict, status: int, body: bytes) -> bool:
    """True if the answer is exactly what the case expects (status already matched)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return False
    if "expect" in case:
        results = obj.get("results") if isinstance(obj, dict) else None
        if not isinstance(results, list) or len(results) != len(case["expect"]):
            return False
        return all(
            r.get("labels") == labels
            and r.get("indices") == indices
            and len(r.get("probs", ())) == len(probs)
            and all(abs(a - b) <= 1e-4 for a, b in zip(r["probs"], probs))
            for r, (labels, indices, probs) in zip(results, case["expect"])
        )
    err = obj.get("error") if isinstance(obj, dict) and set(obj) == {"error"} else None
    return (
        isinstance(err, dict)
        and err.get("kind") == case["kind"]
        and isinstance(err.get("message"), str)
        and err.get("index") == case["index"]
        and set(err) <= {"kind", "message", "index"}
    )


def read_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (peak RSS) of a process, in KiB (Linux)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _counters(text: str, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{name}\{{(.*)\}} ([0-9.e+-]+)$", text, re.M)}


async def run_hostile(
    url: str,
    cases: list[dict],
    concurrency: int,
    requests: int,
    time_limit: float,
    pid: Optional[int],
    slow_clients: int = 0,
) -> dict:
    """``requests`` requests cycling through ``cases`` from ``concurrency`` clients, plus ``slow_clients``
    connections that send half a request head and then nothing (each must be dropped with a 408); every answer
    checked, the server's counters reconciled, its peak RSS read."""
    u = urlparse(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    counts = {"ok": 0, "lost": 0, "wrong": 0, "issued": 0}
    seen: dict[str, int] = {}  # status -> answers
    kinds: dict[str, int] = {}  # error kind -> answers
    by_case: dict[str, dict[str, int]] = {}
    problems: list[str] = []
    latencies: list[float] = []
    next_i = 0
    deadline = time.monotonic() + time_limit

    async def client() -> None:
        nonlocal next_i
        conn = RawClient(host, port)
        try:
            while next_i < requests and time.monotonic() < deadline:
                case = cases[next_i % len(cases)]
                next_i += 1
                counts["issued"] += 1
                row = by_case.setdefault(case["name"], {"ok": 0, "lost": 0, "wrong": 0})
                t0 = time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(conn.request(case["raw"]), 60)
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:
                    counts["lost"] += 1
                    row["lost"] += 1
                    problems.append(f"{case['name']}: {e.__class__.__name__}")
                    continue
                latencies.append(time.perf_counter() - t0)
                seen[str(status)] = seen.get(str(status), 0) + 1
                if status >= 400:
                    try:
                        kind = json.loads(body)["error"]["kind"]
                    except (ValueError, KeyError, TypeError):
                        kind = "<not JSON>"
                    kinds[kind] = kinds.get(kind, 0) + 1
                if status != case["status"]:
                    counts["lost"] += 1
                    row["lost"] += 1
                    problems.append(f"{case['name']}: status {status}: {body[:200]!r}")
                elif _check(case, status, body):
                    counts["ok"] += 1
                    row["ok"] += 1
                else:
                    counts["wrong"] += 1
                    row["wrong"] += 1
                    problems.append(f"{case['name']}: wrong answer {body[:200]!r}")
        finally:
            await conn.close()

    slow_drops: list[float] = []

    async def slow() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        t0 = time.perf_counter()
        writer.write(f"POST /v1/classify HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/".encode())
        try:
            data = await asyncio.wait_for(reader.read(), 120)  # until the server closes
        except (OSError, asyncio.TimeoutError) as e:
            counts["lost"] += 1
            problems.append(f"slow client: {e.__class__.__name__}")
            return
        finally:
            writer.close()
        slow_drops.append(time.perf_counter() - t0)
        status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "<none>"
        seen[status] = seen.get(status, 0) + 1
        try:
            kind = json.loads(data.partition(b"\r\n\r\n")[2])["error"]["kind"]
        except (ValueError, KeyError, TypeError):
            kind = "<not JSON>"
        kinds[kind] = kinds.get(kind, 0) + 1
        if status != "408" or kind != "request_timeout":
            counts["wrong"] += 1
            problems.append(f"slow client: {data[:200]!r}")

    rss_before = read_status(pid) if pid else {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        before = (await c.get("/metrics")).text
        t0 = time.perf_counter()

        async def fast() -> float:
            await asyncio.gather(*(client() for _ in range(concurrency)))
            return time.perf_counter() - t0

        wall, *_ = await asyncio.gather(fast(), *(slow() for _ in range(slow_clients)))
        after = (await c.get("/metrics")).text
    rss_after = read_status(pid) if pid else {}
    # reconcile: every answer the clients got is counted by status and, for errors, by kind (the /metrics GET of
    # `before` is counted in `after`, hence the -1 on /metrics 200)
    req_b, req_a = _counters(before, "p4q_serve_requests_total"), _counters(after, "p4q_serve_requests_total")
    delta_status: dict[str, int] = {}
    for key, v in req_a.items():
        d = int(round(v - req_b.get(key, 0.0)))
        if 'endpoint="/metrics"' in key:
            d -= 1
        if d:
            st = re.search(r'status="(\d+)"', key).group(1)
            delta_status[st] = delta_status.get(st, 0) + d
    err_b, err_a = _counters(before, "p4q_serve_errors_total"), _counters(after, "p4q_serve_errors_total")
    delta_kinds = {
        re.search(r'kind="(\w+)"', k).group(1): int(round(v - err_b.get(k, 0.0)))
        for k, v in err_a.items()
        if int(round(v - err_b.get(k, 0.0)))
    }
    lat = sorted(latencies)

    def pct(p: float) -> Optional[float]:
        return round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 2) if lat else None

    return {
        "concurrency": concurrency,
        "requests_planned": requests,
        "requests_issued": counts["issued"],
        "cases": len(cases),
        "good_cases": sum("expect" in c for c in cases),
        "ok": counts["ok"],
        "lost": counts["lost"],
        "wrong": counts["wrong"],
        "statuses": dict(sorted(seen.items())),
        "error_kinds": dict(sorted(kinds.items())),
        "by_case": by_case,
        "problems": problems[:20],
        "metrics_statuses": dict(sorted(delta_status.items())),
        "metrics_error_kinds": dict(sorted(delta_kinds.items())),
        "metrics_reconcile": delta_status == seen and delta_kinds == kinds,
        "wall_s": round(wall, 3),
        "req_per_s": round(counts["issued"] / wall, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "server_rss_before_mib": round(rss_before["VmRSS"] / 1024, 1) if rss_before else None,
        "server_rss_after_mib": round(rss_after["VmRSS"] / 1024, 1) if rss_after else None,
        "server_peak_rss_mib": round(rss_after["VmHWM"] / 1024, 1) if rss_after else None,
        "slow_clients": slow_clients,
        "slow_dropped": len(slow_drops),
        "slow_drop_max_s": round(max(slow_drops), 2) if slow_drops else None,
        "hit_time_limit": counts["issued"] < requests,
    }


def code_state() -> str:
    """The commit the run used, and which p4q_engine files differed from it (runs on a shared working tree)."""

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "p4q_engine").splitlines()
    return f"commit {head}" + (
        f" + uncommitted changes to {len(dirty)} p4q_engine file(s): " + ", ".join(line[3:] for line in dirty)
        if dirty
        else " (clean p4q_engine)"
    )


def hostile_main(
    args: argparse.Namespace,
    command: str,
    url: str,
    proc: Optional[subprocess.Popen],
    cmd: Optional[list[str]],
    engine: Engine,
    images: list[bytes],
    image_desc: str,
    description: str,
    info: dict,
    tmp: tempfile.TemporaryDirectory,
) -> int:
    """The --hostile-mix run: one level, every answer checked, counters reconciled, peak RSS reported."""
    u = urlparse(url)
    cases = hostile_cases(engine, images, u.hostname or "127.0.0.1", u.port or 80, args.max_body_bytes, args.max_pixels)
    conc = int(args.levels.split(",")[-1])
    pid = proc.pid if proc is not None else args.server_pid
    try:
        row = asyncio.run(run_hostile(url, cases, conc, args.requests, args.time_limit, pid, args.slow_clients))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        tmp.cleanup()
    print(
        f"hostile mix c={conc}: {row['requests_issued']} requests ({row['good_cases']} good of {row['cases']} "
        f"cases), ok {row['ok']} lost {row['lost']} wrong {row['wrong']}, counters reconcile "
        f"{row['metrics_reconcile']}, server peak RSS {row['server_peak_rss_mib']} MiB",
        flush=True,
    )
    report = {
        **report_header(command, description, info, image_desc),
        "code": code_state(),
        "server": {
            "command": cmd,
            "max_body_bytes": args.max_body_bytes,
            "max_pixels": args.max_pixels,
            "threads": args.threads or "torch default",
        },
        "cases": [{k: c[k] for k in ("name", "status") if k in c} | {"kind": c.get("kind", "-")} for c in cases],
        "note": "clients share the machine's CPU with the server",
        "result": row,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = [
        f"# p4q serve hostile-mix load test ({args.device})",
        "",
        f"- command: `{command}`",
        f"- date: {report['date']}",
        machine_line(report) + "(the machine is shared with other work; the clients run on it too)",
        f"- code: {report['code']}",
        f"- artifact: {description}; {len(engine.classnames)} classes",
        f"- images: {image_desc}",
        f"- server: own subprocess on 127.0.0.1, `--max-body-bytes {args.max_body_bytes} --max-pixels "
        f"{args.max_pixels}`, torch threads {args.threads or 'default'}",
        f"- mix: {len(cases)} cases cycled ({row['good_cases']} good, {len(cases) - row['good_cases']} bad), "
        f"{conc} concurrent keep-alive clients, {row['requests_issued']} requests; meanwhile {row['slow_clients']} "
        f"slow clients sent half a request head each and waited: {row['slow_dropped']} dropped by the server with "
        f"a JSON 408 (the last after {row['slow_drop_max_s']} s; default --header-timeout-s 10)",
        "- lost = no answer, or a status other than the case's; wrong = a good answer that differs from "
        "`Engine.classify` of the same images by a local CPU engine loaded from the same artifact file (labels, "
        "indices, probabilities to 1e-4), or an error whose JSON shape/kind/index differs from the documented one",
        f"- server counters (`/metrics` deltas) reconcile with what the clients saw: {row['metrics_reconcile']}",
        "",
        "| clients | requests | ok | lost | wrong | req/s | p50 ms | p99 ms | server RSS before / after / peak (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {conc} | {row['requests_issued']} | {row['ok']} | {row['lost']} | {row['wrong']} | {row['req_per_s']} | "
        f"{row['p50_ms']} | {row['p99_ms']} | {row['server_rss_before_mib']} / {row['server_rss_after_mib']} / "
        f"{row['server_peak_rss_mib']} |",
        "",
        "| case | expected | ok | lost | wrong |",
        "|---|---|---:|---:|---:|",
    ]
    for c in cases:
        r = row["by_case"].get(c["name"], {"ok": 0, "lost": 0, "wrong": 0})
        md.append(f"| {c['name']} | {c['status']} {c.get('kind', '')} | {r['ok']} | {r['lost']} | {r['wrong']} |")
    md += ["", f"Statuses seen: {row['statuses']}; error kinds seen: {row['error_kinds']}."]
    if row["problems"]:
        md += ["", "First problems:", ""] + [f"- `{p}`" for p in row["problems"]]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    if row["lost"] or row["wrong"] or not row["metrics_reconcile"]:
        print(
            f"serve_load: {row['lost']} lost, {row['wrong']} wrong, counters reconcile {row['metrics_reconcile']}",
            file=sys.stderr,
        )
        return 1
    return 0
