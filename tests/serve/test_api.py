"""``p4q serve`` over real HTTP: answers equal the in-process engine's, and every bad input fails alone with the
documented status and JSON error shape while a concurrent good request still succeeds."""

from __future__ import annotations

import asyncio
import base64
import io
import re

import httpx
import pytest
import torch
from PIL import Image

from tests.serve.conftest import CLASSNAMES, MAX_BODY, png


def files(images: list[bytes], **fields) -> dict:
    """httpx multipart arguments: every image as an "images" file part, plus plain fields."""
    parts = [("images", (f"img{i}.bin", data, "application/octet-stream")) for i, data in enumerate(images)]
    return {"files": parts, "data": fields}


def raw_form(parts: list[tuple[str, "str | None", bytes]]) -> dict:
    """A hand-made multipart body (httpx sends a form without files as urlencoded); filename None = text field."""
    out = b""
    for name, filename, data in parts:
        fn = f'; filename="{filename}"' if filename else ""
        out += (f'--bnd\r\nContent-Disposition: form-data; name="{name}"{fn}\r\n\r\n').encode() + data + b"\r\n"
    return {"content": out + b"--bnd--\r\n", "headers": {"content-type": "multipart/form-data; boundary=bnd"}}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(resp: httpx.Response, status: int, kind: str, index=None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert err["kind"] == kind and isinstance(err["message"], str) and err["message"]
    assert set(err) <= {"kind", "message", "index"}
    if index is None:
        assert "index" not in err
    else:
        assert err["index"] == index
    return err


# ---------------------------------------------------------------- parity with the engine
def test_classify_multipart_matches_engine(main_server, engine, good_images):
    r = httpx.post(main_server.url + "/v1/classify", **files(good_images, top_k="3"), timeout=30)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    expected = engine.classify(good_images, top_k=3)
    assert len(results) == len(expected) == len(good_images)
    for got, want in zip(results, expected):  # request order
        assert got["labels"] == want.labels
        assert got["indices"] == want.indices
        assert got["probs"] == pytest.approx(want.probs, abs=1e-5)


def test_classify_json_with_label_subset_matches_engine(main_server, engine, good_images):
    subset = ["class 7", "class 2", "class 5", "class 0"]
    body = {"images": [b64(im) for im in good_images], "top_k": 2, "labels": subset}
    r = httpx.post(main_server.url + "/v1/classify", json=body, timeout=30)
    assert r.status_code == 200, r.text
    expected = engine.classify(good_images, top_k=2, labels=subset)
    for got, want in zip(r.json()["results"], expected):
        assert got["labels"] == want.labels
        assert got["probs"] == pytest.approx(want.probs, abs=1e-5)


def test_classify_defaults_and_clamped_top_k(main_server, engine, good_images):
    url = main_server.url + "/v1/classify"
    r = httpx.post(url, json={"images": [b64(good_images[0])]}, timeout=30)
    assert len(r.json()["results"][0]["labels"]) == 5  # default top_k
    # data URL form, and top_k above the class count is clamped like Engine.classify
    r = httpx.post(url, json={"images": ["data:image/png;base64," + b64(good_images[0])], "top_k": 1000}, timeout=30)
    assert r.status_code == 200, r.text
    got = r.json()["results"][0]
    assert got["labels"] == engine.classify([good_images[0]], top_k=1000)[0].labels
    assert sorted(got["labels"]) == sorted(CLASSNAMES)
    # multipart label subset: repeated "labels" fields
    r = httpx.post(url, **files([good_images[1]], labels=["class 3", "class 4"]), timeout=30)
    assert r.status_code == 200, r.text
    assert set(r.json()["results"][0]["labels"]) == {"class 3", "class 4"}


def test_embed_matches_engine(main_server, engine, good_images):
    r = httpx.post(main_server.url + "/v1/embed", **files(good_images), timeout=30)
    assert r.status_code == 200, r.text
    got = torch.tensor(r.json()["embeddings"])
    want = engine.embed(good_images)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(good_images)), atol=1e-5)
    r = httpx.post(main_server.url + "/v1/embed", json={"images": [b64(good_images[2])]}, timeout=30)
    assert torch.allclose(torch.tensor(r.json()["embeddings"]), want[2:3], atol=1e-5, rtol=0)


def test_labels_health_ready(main_server):
    assert httpx.get(main_server.url + "/v1/labels").json() == {"labels": CLASSNAMES}
    assert httpx.get(main_server.url + "/healthz").status_code == 200
    r = httpx.get(main_server.url + "/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"


# ---------------------------------------------------------------- bad inputs, each next to a good request
def _bomb() -> bytes:
    """A few KB of PNG that decodes to 9 megapixels (over the main server's --max-pixels)."""
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")
    return buf.getvalue()


BAD_CASES = {
    # name: (endpoint, request kwargs builder, status, kind, index)
    "undecodable": ("/v1/classify", lambda g: files([g, b"definitely not an image"]), 400, "bad_image", 1),
    "one_pixel": ("/v1/classify", lambda g: files([png(1, 1)]), 400, "bad_image", 0),
    "one_pixel_embed": ("/v1/embed", lambda g: files([g, g, png(1, 7)]), 400, "bad_image", 2),
    "truncated": ("/v1/classify", lambda g: files([g[: len(g) // 2]]), 400, "bad_image", 0),
    "empty_file": ("/v1/classify", lambda g: files([b""]), 400, "bad_image", 0),
    "bomb": ("/v1/classify", lambda g: files([g, _bomb()]), 400, "bad_image", 1),
    "over_pixel_cap": ("/v1/classify", lambda g: files([png(65, 64)]), 400, "bad_image", 0),
    "extreme_aspect": ("/v1/classify", lambda g: files([png(2, 2000)]), 400, "bad_image", 0),
    "body_too_large": ("/v1/classify", lambda g: files([bytes(MAX_BODY + 5000)]), 413, "payload_too_large", None),
    "json_too_large": (
        "/v1/embed",
        lambda g: {"json": {"images": ["A" * (MAX_BODY + 10)]}},
        413,
        "payload_too_large",
        None,
    ),
    "bad_base64": (
        "/v1/classify",
        lambda g: {"json": {"images": [b64(g), "%%% not base64 %%%"]}},
        400,
        "bad_base64",
        1,
    ),
    "base64_not_string": ("/v1/embed", lambda g: {"json": {"images": [3]}}, 400, "bad_base64", 0),
    "top_k_zero": ("/v1/classify", lambda g: {"json": {"images": [b64(g)], "top_k": 0}}, 400, "bad_top_k", None),
    "top_k_text": ("/v1/classify", lambda g: files([g], top_k="five"), 400, "bad_top_k", None),
    "top_k_float": ("/v1/classify", lambda g: {"json": {"images": [b64(g)], "top_k": 1.5}}, 400, "bad_top_k", None),
    "top_k_bool": ("/v1/classify", lambda g: {"json": {"images": [b64(g)], "top_k": True}}, 400, "bad_top_k", None),
    "unknown_label": (
        "/v1/classify",
        lambda g: {"json": {"images": [b64(g)], "labels": ["class 1", "zebra"]}},
        400,
        "unknown_label",
        None,
    ),
    "unknown_label_form": ("/v1/classify", lambda g: files([g], labels=["nope"]), 400, "unknown_label", None),
    "empty_labels": (
        "/v1/classify",
        lambda g: {"json": {"images": [b64(g)], "labels": []}},
        400,
        "unknown_label",
        None,
    ),
    "bad_json": (
        "/v1/classify",
        lambda g: {"content": b"{not json", "headers": {"content-type": "application/json"}},
        400,
        "bad_json",
        None,
    ),
    "no_images": ("/v1/classify", lambda g: {"json": {"images": []}}, 400, "bad_request", None),
    "no_files": ("/v1/classify", lambda g: raw_form([("top_k", None, b"1")]), 400, "bad_request", None),
    "images_not_a_file": (
        "/v1/classify",
        lambda g: raw_form([("images", "a.png", g), ("images", None, b"abc")]),
        400,
        "bad_request",
        1,
    ),
    "broken_multipart": (
        "/v1/embed",
        lambda g: {
            "content": b'--zz\r\nContent-Disposition: form-data; name="a"\r\n\r\nunterminated',
            "headers": {"content-type": "multipart/form-data; boundary=zz"},
        },
        400,
        "bad_request",
        None,
    ),
    "wrong_content_type": (
        "/v1/classify",
        lambda g: {"content": g, "headers": {"content-type": "image/png"}},
        415,
        "unsupported_media_type",
        None,
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_fails_alone(case, main_server, engine, good_images):
    endpoint, build, status, kind, index = BAD_CASES[case]
    good = good_images[0]
    want = engine.classify([good], top_k=3)[0].labels

    async def both():
        async with httpx.AsyncClient(base_url=main_server.url, timeout=30) as c:
            return await asyncio.gather(
                c.post(endpoint, **build(good)), c.post("/v1/classify", **files([good], top_k="3"))
            )

    bad, ok = asyncio.run(both())
    assert_error(bad, status, kind, index)
    assert ok.status_code == 200, ok.text
    assert ok.json()["results"][0]["labels"] == want


def test_unknown_route_and_method(main_server):
    assert_error(httpx.get(main_server.url + "/v2/nothing"), 404, "not_found")
    assert_error(httpx.get(main_server.url + "/v1/classify"), 405, "method_not_allowed")


def test_server_still_ready_after_bad_inputs_and_metrics(main_server):
    """Runs after the bad-input tests: the server is unharmed, and /metrics counted what happened."""
    assert httpx.get(main_server.url + "/readyz").status_code == 200
    text = httpx.get(main_server.url + "/metrics").text
    for name in (
        "p4q_serve_requests_total",
        "p4q_serve_errors_total",
        "p4q_serve_queue_depth",
        "p4q_serve_batch_size_bucket",
        "p4q_serve_request_latency_seconds_bucket",
        "p4q_serve_batch_latency_seconds_count",
        "p4q_serve_worker_alive",
        "p4q_serve_images_total",
    ):
        assert name in text, name
    assert re.search(r'p4q_serve_requests_total\{endpoint="/v1/classify",status="200"\} [1-9]', text)
    assert re.search(r'p4q_serve_errors_total\{kind="bad_image"\} [1-9]', text)
    assert re.search(r'p4q_serve_requests_total\{endpoint="/v1/classify",status="413"\} [1-9]', text)
    assert "p4q_serve_worker_alive 1.0" in text
