"""The error a request can end in, and its one JSON shape.

Every non-2xx answer of ``p4q serve`` is ``{"error": {"kind": KIND, "message": TEXT}}`` plus ``"index": I`` when
one image of the request (0-based, in request order) is at fault. ``kind`` is stable and machine-readable; the
message is for people and may change.
"""

from __future__ import annotations

import json
from typing import Any, Optional

#: kind -> HTTP status. Kinds are part of the API: add new ones, never rename.
KINDS: dict[str, int] = {
    "bad_request": 400,  # malformed form/JSON fields, no images, wrong content type of a field
    "bad_json": 400,  # the JSON body does not parse or is not an object
    "bad_base64": 400,  # an entry of "images" is not valid base64
    "bad_image": 400,  # undecodable, too small (<2x2), too many pixels, unusable aspect ratio
    "bad_top_k": 400,  # top_k is not an integer >= 1
    "unknown_label": 400,  # labels names a class the artifact does not have (or is empty / repeats one)
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,  # the request head did not arrive within --header-timeout-s (then the connection closes)
    "payload_too_large": 413,  # body over --max-body-bytes
    "too_many_images": 413,  # more images in one request than the queue can ever hold (--max-queue)
    "unsupported_media_type": 415,
    "internal": 500,  # the batch holding this request's images failed; other batches are unaffected
    "overloaded": 503,  # the queue is full, or --limit-concurrency connections are open: retry after Retry-After
    "not_ready": 503,  # the batch worker is not running, or the server is shutting down (a request still
    # unanswered when --shutdown-grace-s ends gets this)
    "timeout": 504,  # the request waited longer than --timeout-s
}


class ServeError(Exception):
    """A request failure with a stable ``kind``; :meth:`body` is the JSON answer, :attr:`status` its HTTP code."""

    def __init__(
        self, kind: str, message: str, index: Optional[int] = None, headers: Optional[dict[str, str]] = None
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(message)
        self.kind, self.message, self.index = kind, message, index
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        return KINDS[self.kind]

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"kind": self.kind, "message": self.message}
        if self.index is not None:
            err["index"] = self.index
        return {"error": err}

    def __repr__(self) -> str:
        return f"ServeError({self.kind!r}, {self.message!r}, index={self.index})"


def render_json(content: Any) -> bytes:
    """Bytes of every JSON answer. ASCII only (``\\uXXXX`` escapes): a class name or message holding a lone
    surrogate (legal in JSON text, not encodable as UTF-8) still renders instead of failing with a 500. NaN/inf are
    refused (``ValueError``) because they are not JSON."""
    return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")
