"""Request bodies -> validated options and preprocessed pixels, all in the request's own handler.

Everything that can fail on user input happens here, before anything reaches the batch worker: parsing the JSON
or multipart body, base64, ``top_k``/``labels`` checks, decoding (with the server's pixel cap, reduced-scale JPEG
decoding and the resize guard of :mod:`p4q_engine.runtime.images`) and the artifact's preprocessing, on the
:class:`DecodePool`'s threads. A bad image therefore fails only its own request (400, with its index), never a
batch.

Two body forms (same fields, same answers):

* ``multipart/form-data``: every file part is an image, in order; optional fields ``top_k`` and ``labels``
  (repeat the field for several labels).
* ``application/json``: ``{"images": [base64, ...], "top_k": 5, "labels": [...]}``; an image may also be a
  ``data:image/...;base64,`` URL.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from p4q_engine.errors import ImageError
from p4q_engine.runtime.images import DeadlineExceeded, DecodeBudget
from p4q_engine.serve.errors import ServeError

DEFAULT_TOP_K = 5


@dataclass
class ParsedRequest:
    """Raw image bytes (request order) and the classification options of one request."""

    images: list[bytes]
    top_k: int = DEFAULT_TOP_K
    labels: Optional[list[str]] = None
    names: list[str] = field(default_factory=list)  # per image, for messages: file name or "images[i]"


# ---------------------------------------------------------------- options
def parse_top_k(value: Any) -> int:
    """An integer >= 1 (JSON number or form text). Values above the class count are clamped later, like
    :meth:`Engine.classify`."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ServeError("bad_top_k", f"top_k must be an integer >= 1, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ServeError("bad_top_k", f"top_k must be an integer >= 1, got {value!r}")
    return value


def check_labels(labels: Any, classnames: Sequence[str]) -> Optional[list[int]]:
    """Class indices of a label subset (request order), or None for all classes."""
    if labels is None:
        return None
    if not isinstance(labels, list) or not all(isinstance(l, str) for l in labels):
        raise ServeError("bad_request", "labels must be a list of strings")
    if not labels:
        raise ServeError("unknown_label", "labels is empty; leave it out to rank every class")
    lookup = {name: i for i, name in enumerate(classnames)}
    unknown = [l for l in labels if l not in lookup]
    if unknown:
        raise ServeError(
            "unknown_label",
            f"unknown labels: {', '.join(repr(u) for u in unknown[:5])}"
            + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
            + "; see GET /v1/labels",
        )
    if len(set(labels)) != len(labels):
        raise ServeError("unknown_label", "labels repeats a class")
    return [lookup[l] for l in labels]


# ---------------------------------------------------------------- bodies
def _b64(text: Any, i: int) -> bytes:
    if not isinstance(text, str):
        raise ServeError("bad_base64", f"images[{i}] must be a base64 string", index=i)
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ServeError("bad_base64", f"images[{i}]: only base64 data URLs are accepted", index=i)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ServeError("bad_base64", f"images[{i}] is not valid base64", index=i) from None


def parse_json(body: bytes, classify: bool) -> ParsedRequest:
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ServeError("bad_json", f"body is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise ServeError("bad_json", 'body must be a JSON object with an "images" list')
    imgs = obj.get("images")
    if not isinstance(imgs, list) or not imgs:
        raise ServeError("bad_request", '"images" must be a non-empty list of base64 strings')
    req = ParsedRequest([_b64(s, i) for i, s in enumerate(imgs)], names=[f"images[{i}]" for i in range(len(imgs))])
    if classify:
        if obj.get("top_k") is not None:
            req.top_k = parse_top_k(obj["top_k"])
        req.labels = obj.get("labels")
    return req


def parse_form(items: Sequence[tuple[str, Any]], classify: bool) -> ParsedRequest:
    """Multipart parts in body order: ``(field, text)`` for plain fields, ``(field, (filename, bytes))`` for
    file parts (app.py reads each upload into bytes)."""
    images, names, top_k, labels = [], [], None, []
    for key, value in items:
        if isinstance(value, tuple):
            names.append(value[0] or key)
            images.append(value[1])
        elif key == "top_k":
            top_k = value
        elif key == "labels":
            labels.append(value)
        elif key == "images":
            raise ServeError(
                "bad_request",
                f"form field 'images' #{len(images)} is not a file part (use -F images=@file)",
                index=len(images),
            )
    if not images:
        raise ServeError("bad_request", "no image file parts in the form")
    req = ParsedRequest(images, names=names)
    if classify:
        if top_k is not None:
            req.top_k = parse_top_k(top_k)
        req.labels = labels or None
    return req


# ---------------------------------------------------------------- images
def prepare_images(
    engine: Any,
    req: ParsedRequest,
    max_pixels: int,
    deadline: Optional[float] = None,
    cancel: Optional[threading.Event] = None,
    budget: Optional[DecodeBudget] = None,
) -> torch.Tensor:
    """Decode and preprocess every image of a request -> ``[n, 3, H, W]``; the first bad one raises
    ``bad_image`` with its index.

    Each image costs what its header allows (:meth:`Preprocess.load`: reduced-scale JPEG decoding, the pixel cap
    and the resize check before any pixel is decoded). Between images the request's ``deadline`` (monotonic) and
    ``cancel`` are checked, so the images of a request that has already been answered 504 are never decoded; a
    ``budget`` bounds the decoded bytes in flight across all requests."""
    transform = engine.transform
    reserve = None if budget is None else (lambda n: budget.hold(n, deadline))
    # 8-bit pixels where the preprocess allows: a quarter of the bytes to queue, pickle (decode processes, Ray) and
    # copy to a GPU; the engine normalises them where it runs, to the same bits
    raw = {"raw": True} if getattr(transform, "raw_ok", False) else {}
    out = []
    for i, data in enumerate(req.images):
        if (cancel is not None and cancel.is_set()) or (deadline is not None and time.monotonic() >= deadline):
            raise ServeError(
                "timeout", f"images not decoded within the deadline (--timeout-s; {i} of {len(req.images)} done)"
            )
        name = req.names[i] if i < len(req.names) else f"images[{i}]"
        if not data:
            raise ServeError("bad_image", f"{name}: empty image", index=i)
        try:
            pixels = transform.load(data, name=name, max_pixels=max_pixels, reserve=reserve, **raw).unsqueeze(0)
        except ImageError as e:
            raise ServeError("bad_image", str(e), index=i) from None
        except DeadlineExceeded:
            raise ServeError("timeout", "images not decoded within the deadline (--timeout-s)") from None
        except Exception as e:  # any other failure on user data (odd modes, truncated frames) is still that image's
            raise ServeError(
                "bad_image", f"{name}: cannot preprocess image ({e.__class__.__name__})", index=i
            ) from None
        if not torch.isfinite(pixels).all():
            raise ServeError("bad_image", f"{name}: preprocessing produced non-finite values", index=i)
        out.append(pixels)
    return torch.cat(out)


class DecodePool:
    """The threads that decode request images: as many as the cores (not the 40 of the default thread pool, which
    on 2 cores only multiplies memory), a byte budget of decoded pixels in flight (:class:`DecodeBudget`), and the
    request deadline enforced while decoding: the handler answers 504 at the deadline, not when the decodes end,
    and a timed-out request's images that have not started are skipped (the one being decoded finishes; its cost
    is bounded by the pixel cap)."""

    def __init__(self, workers: int, budget_bytes: int) -> None:
        self.workers = workers
        self.budget = DecodeBudget(budget_bytes)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="p4q-decode")

    async def prepare(
        self, engine: Any, req: ParsedRequest, max_pixels: int, deadline: float, timeout_s: float
    ) -> torch.Tensor:
        """:func:`prepare_images` on a decode thread, answered by ``deadline`` (``timeout`` ServeError past it)."""
        cancel = threading.Event()
        fut = asyncio.get_running_loop().run_in_executor(
            self._executor, prepare_images, engine, req, max_pixels, deadline, cancel, self.budget
        )
        try:
            return await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ServeError("timeout", f"images not decoded within {timeout_s:g} s (--timeout-s)") from None
        finally:
            cancel.set()  # timed out, client gone or done: nothing more of this request is decoded

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def rank(
    logits: torch.Tensor, classnames: Sequence[str], top_k: int, subset: Optional[Sequence[int]] = None
) -> list[dict[str, Any]]:
    """Top-k labels/probabilities of logits rows ``[n, C]`` - the same computation as :meth:`Engine.classify`
    after its ``logits`` call (softmax over the subset, k clamped to the class count)."""
    if subset is not None:
        logits = logits[:, list(subset)]
    probs = logits.softmax(dim=-1)
    k = max(1, min(top_k, probs.shape[1]))
    top = probs.topk(k, dim=-1)
    # plain lists once (iterating tensors row by row costs a tensor per row on the event loop)
    values, indices = top.values.tolist(), top.indices.tolist()
    if subset is not None:
        indices = [[subset[i] for i in row] for row in indices]
    return [{"labels": [classnames[i] for i in ii], "probs": pp, "indices": ii} for pp, ii in zip(values, indices)]
