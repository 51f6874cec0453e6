"""Which decoder a server's requests use: threads (default), worker processes, or torchvision on a device.

* threads (:class:`~p4q_engine.serve.inputs.DecodePool`): one per core, a decoded-bytes budget; Pillow releases the
  GIL while decoding, but the preprocessing around it does not, so at high request rates the serving process's one
  interpreter is the limit;
* ``--decode-processes N`` (:class:`ProcessDecodePool`): the same :func:`~p4q_engine.serve.inputs.prepare_images`
  in N spawned processes, so decoding leaves the serving process's GIL (the HTTP handling and the batch worker
  keep it). Each worker decodes one image at a time, so decoded memory in flight is bounded by N images at the
  pixel cap; the request deadline is checked between images (CLOCK_MONOTONIC is system-wide), and a request that
  times out before its turn is never decoded;
* ``--decode-device cuda`` (:class:`~p4q_engine.runtime.jpeg_torch.TorchJpegLoader` on the thread pool):
  baseline JPEGs by nvJPEG, with the same header checks.

The Ray Serve backend gets "off the critical path" differently: its HTTP replicas decode, in their own processes,
and only pixels reach the engine replicas (:mod:`p4q_engine.serve.ray_backend`).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace
from typing import Any, Optional, Union

import torch

from p4q_engine.serve.config import ServeConfig
from p4q_engine.serve.errors import ServeError
from p4q_engine.serve.inputs import DecodePool, ParsedRequest, prepare_images

_WORKER: dict[str, Any] = {}


def _init_worker(transform: Any, pil_max_pixels: Optional[int]) -> None:
    """Each decode process: one torch thread (N processes already use N cores), the server's Pillow cap."""
    from PIL import Image

    torch.set_num_threads(1)
    if pil_max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = pil_max_pixels
    _WORKER["engine"] = SimpleNamespace(transform=transform)


def _decode(req: ParsedRequest, max_pixels: int, deadline: float) -> Union[torch.Tensor, tuple]:
    """prepare_images in a worker; a ServeError comes back as a plain tuple (its constructor is not pickle's)."""
    try:
        return prepare_images(_WORKER["engine"], req, max_pixels, deadline)
    except ServeError as e:
        return ("error", e.kind, e.message, e.index, e.headers)


def _ready() -> bool:
    return True


class ProcessDecodePool:
    """:class:`DecodePool`'s interface over spawned worker processes (see the module docstring)."""

    def __init__(self, processes: int, transform: Any) -> None:
        from PIL import Image

        self.workers = processes
        self._executor = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=multiprocessing.get_context("spawn"),  # fork would copy the server's threads and locks
            initializer=_init_worker,
            initargs=(transform, Image.MAX_IMAGE_PIXELS),
        )
        for _ in range(processes):  # start them now, not under the first requests
            self._executor.submit(_ready)

    async def prepare(
        self, engine: Any, req: ParsedRequest, max_pixels: int, deadline: float, timeout_s: float
    ) -> torch.Tensor:
        fut = asyncio.get_running_loop().run_in_executor(self._executor, _decode, req, max_pixels, deadline)
        try:
            out = await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ServeError("timeout", f"images not decoded within {timeout_s:g} s (--timeout-s)") from None
        if isinstance(out, tuple):
            _, kind, message, index, headers = out
            raise ServeError(kind, message, index=index, headers=headers)
        return out

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class _DeviceLoading:
    """The engine as the decode threads see it: its transform swapped for a :class:`TorchJpegLoader`."""

    def __init__(self, loader: Any) -> None:
        self.transform = loader


class DeviceDecodePool(DecodePool):
    """The thread pool, decoding baseline JPEGs with torchvision on ``device`` (``--decode-device``)."""

    def __init__(self, workers: int, budget_bytes: int, device: str) -> None:
        from p4q_engine.runtime.jpeg_torch import check_decode_device

        check_decode_device(device)
        super().__init__(workers, budget_bytes)
        self.device = device
        self._loading: Optional[_DeviceLoading] = None

    async def prepare(
        self, engine: Any, req: ParsedRequest, max_pixels: int, deadline: float, timeout_s: float
    ) -> torch.Tensor:
        if self._loading is None:
            from p4q_engine.runtime.jpeg_torch import TorchJpegLoader

            self._loading = _DeviceLoading(TorchJpegLoader(engine.transform, self.device))
        return await super().prepare(self._loading, req, max_pixels, deadline, timeout_s)


def make_decoder(config: ServeConfig, engine: Any) -> Union[DecodePool, ProcessDecodePool]:
    """The decoder ``config`` asks for (threads unless --decode-processes or --decode-device says otherwise)."""
    budget = config.decode_memory_mb * 2**20
    if config.decode_processes:
        return ProcessDecodePool(config.decode_processes, engine.transform)
    if config.decode_device != "cpu":
        return DeviceDecodePool(config.decode_threads, budget, config.decode_device)
    return DecodePool(config.decode_threads, budget)
