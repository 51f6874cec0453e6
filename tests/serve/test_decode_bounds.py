"""Bounded cost per image and per request on a real ``p4q serve`` process (default pixel cap, ``--timeout-s 3``).

Server CPU is read from ``/proc/<pid>/stat`` (its own user+system time, whatever else loads the machine) and its
memory from ``/proc/<pid>/status`` (VmHWM reset through ``clear_refs`` where allowed). Bounds sit far between
what the bounded server costs and what the unbounded one cost (numbers in each test)."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from p4q_engine.serve.config import ServeConfig, usable_cores
from p4q_engine.serve.errors import ServeError
from p4q_engine.serve.inputs import DecodePool, ParsedRequest
from tests.serve.conftest import ServerProcess

TIMEOUT_S = 3.0
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc for server CPU/memory")


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def lying_jpeg(width: int, height: int) -> bytes:
    """~600 bytes of JPEG whose frame header declares ``width x height`` (decodes as a grey fill of that size)."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def files(images: list[bytes]) -> list:
    return [("images", (f"img{i}.png", data, "application/octet-stream")) for i, data in enumerate(images)]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mem_mb(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    s = ServerProcess(
        "bounds",
        artifact,
        tmp_path_factory.mktemp("bounds_logs"),
        ("--timeout-s", str(TIMEOUT_S), "--max-wait-ms", "1"),
    )
    try:
        s.start().wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60.0) as c:
        assert c.post("/v1/classify", files=files([encode(Image.new("RGB", (40, 40), 7))])).status_code == 200
        yield c


def test_huge_single_colour_png_refused_before_decoding(server, client):
    """A ~160 KB single-colour 7000x7000 PNG was under the old 50 Mpx cap: decoded in full (0.5 s, ~330 MB). It is
    over the 16.7 Mpx cap now, refused from its header."""
    data = encode(Image.new("RGB", (7000, 7000), (9, 99, 199)))
    pid = server.proc.pid
    c0 = cpu_s(pid)
    r = client.post("/v1/classify", files=files([encode(Image.new("RGB", (40, 40), 7)), data]))
    used = cpu_s(pid) - c0
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["kind"] == "bad_image" and err["index"] == 1 and "7000x7000 exceeds" in err["message"]
    assert used < 0.3, f"refusing a 7000x7000 PNG cost the server {used:.2f} s of CPU"


def test_lying_jpeg_headers_cost_their_reduced_size(server, client):
    """16 ~600-byte JPEGs declaring 7000x7000 each (10 KB body): full decodes cost the server 3-5 s of CPU; decoded at
    the model's resolution (875x875) about 0.3 s, with the answers unchanged in kind (grey images, 200)."""
    body = files([lying_jpeg(7000, 7000)] * 16)
    pid = server.proc.pid
    c0 = cpu_s(pid)
    r = client.post("/v1/classify", files=body)
    used = cpu_s(pid) - c0
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 16
    assert used < 1.5, f"16 lying JPEG headers cost the server {used:.2f} s of CPU"


def test_deadline_is_enforced_while_decoding(server, client):
    """40 single-colour 4096x4096 PNGs (2.3 MB) take ~10+ s to decode. The 504 comes at the deadline, not after the
    decodes, and the images not yet started are never decoded: the server goes quiet right after answering."""
    data = encode(Image.new("RGB", (4096, 4096), (10, 200, 30)))
    pid = server.proc.pid
    t0 = time.monotonic()
    r = client.post("/v1/classify", files=files([data] * 40))
    elapsed = time.monotonic() - t0
    assert r.status_code == 504, r.text
    assert r.json()["error"]["kind"] == "timeout"
    assert elapsed < TIMEOUT_S + 2.5, f"504 after {elapsed:.1f} s with --timeout-s {TIMEOUT_S:g}"
    time.sleep(1.0)  # the image being decoded at the deadline finishes (<= 0.3 s of CPU)
    c0 = cpu_s(pid)
    time.sleep(3.0)
    after = cpu_s(pid) - c0
    # decoding on, the remaining ~30 images would keep a core busy for the whole window
    assert after < 0.5, f"the server spent {after:.2f} s of CPU in the 3 s after the 504 (cancelled decodes ran on)"
    assert client.get("/readyz").status_code == 200


def test_concurrent_huge_images_do_not_blow_memory(server, client):
    """16 concurrent requests of one 4096x4096 RGBA PNG each (~75 KB; 128 MB decoded with its RGB copy): the old
    40-thread decode pool decoded them all at once (the issue measured +5.6 GB, 5.7 GB held afterwards). Decode
    threads = cores and the 512 MiB decode budget bound the peak, and the images are freed right after."""
    data = encode(Image.new("RGBA", (4096, 4096), (1, 2, 3, 4)))
    pid = server.proc.pid
    time.sleep(0.5)
    base = mem_mb(pid, "VmRSS")
    exact = reset_peak(pid)
    with ThreadPoolExecutor(16) as pool:
        statuses = list(
            pool.map(
                lambda _: httpx.post(server.url + "/v1/classify", files=files([data]), timeout=60.0).status_code,
                range(16),
            )
        )
    peak = mem_mb(pid, "VmHWM") - base
    if exact:  # bounded server: ~+270 MB; the unbounded one: ~+1800 MB
        assert peak < 1000, f"peak RSS grew by {peak:.0f} MB for 16 concurrent 4096x4096 images"
    time.sleep(1.0)
    held = mem_mb(pid, "VmRSS") - base
    assert held < 400, f"{held:.0f} MB still held after the burst"  # bounded: ~+100 MB; unbounded: ~+900 MB
    # 504s are fine here (the deadline of the last ones can pass while they wait for a decode thread), and
    # nothing else is
    assert set(statuses) <= {200, 504}, statuses


# ---------------------------------------------------------------- the decode pool in process
class _SlowTransform:
    """Stands in for ``engine.transform``: each image takes ``delay`` s; counts the images started."""

    def __init__(self, delay: float) -> None:
        self.delay, self.started, self.lock = delay, 0, threading.Lock()

    def load(self, data, name=None, max_pixels=None, reserve=None):
        import torch

        with self.lock:
            self.started += 1
        time.sleep(self.delay)
        return torch.zeros(3, 2, 2)


class _FakeEngine:
    def __init__(self, delay: float) -> None:
        self.transform = _SlowTransform(delay)


def test_decode_pool_answers_at_the_deadline_and_skips_the_rest():
    """One decode thread, 30 images of 0.1 s: the timeout comes at the 0.4 s deadline, at most one image more
    starts after it, and the next request does not wait behind the cancelled one."""
    engine = _FakeEngine(0.1)
    pool = DecodePool(workers=1, budget_bytes=2**30)

    async def go():
        t0 = time.monotonic()
        with pytest.raises(ServeError) as e:
            await pool.prepare(engine, ParsedRequest([b"x"] * 30), 100, time.monotonic() + 0.4, 0.4)
        late = time.monotonic() - t0
        started = engine.transform.started
        await asyncio.sleep(0.5)
        t1 = time.monotonic()
        pixels = await pool.prepare(engine, ParsedRequest([b"x"] * 2), 100, time.monotonic() + 5, 5)
        return e.value, late, started, time.monotonic() - t1, pixels

    try:
        err, late, started, second, pixels = asyncio.run(go())
    finally:
        pool.shutdown()
    assert err.kind == "timeout" and err.status == 504
    assert late < 2.0
    first = engine.transform.started - 2  # images of the first request ever started
    assert first <= started + 1 and first <= 6  # ~4 before the deadline, then at most the one in flight
    assert pixels.shape == (2, 3, 2, 2) and second < 2.0


def test_decode_threads_default_to_the_cores():
    assert ServeConfig().decode_threads == usable_cores() >= 1
    assert ServeConfig(decode_workers=3).decode_threads == 3
    assert DecodePool(usable_cores(), 2**20).workers == usable_cores()
