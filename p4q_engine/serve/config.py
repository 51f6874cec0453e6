"""Settings of one ``p4q serve`` process, validated once (bad values are a :class:`ConfigError`: exit 2)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from p4q_engine.errors import ConfigError
from p4q_engine.runtime.images import MAX_PIXELS


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching knobs; the CLI flag of each field is ``--`` + its name with dashes."""

    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    #: Most images per engine call.
    max_batch: int = 64
    #: Longest the worker waits for more images after the first one of a batch (only while other requests are
    #: still being read or decoded; a lone request runs at once).
    max_wait_ms: float = 5.0
    #: Most images waiting for the worker (all requests together); a request that does not fit gets 503.
    max_queue: int = 256
    #: Per-request deadline (queueing + decoding + engine) -> 504.
    timeout_s: float = 30.0
    #: Request body cap -> 413 (checked against Content-Length first, then while reading).
    max_body_bytes: int = 32 * 2**20
    #: Decoded pixel cap per image (decompression bombs) -> 400; see :mod:`p4q_engine.runtime.images`.
    max_pixels: int = MAX_PIXELS
    #: Threads decoding request images; None: one per core this process may use.
    decode_workers: Optional[int] = None
    #: Bound on the bytes of decoded pixels in flight across all requests (one image may always decode alone).
    decode_memory_mb: int = 512
    #: Decode in this many worker processes instead of threads (off the serving process's GIL; see
    #: :mod:`p4q_engine.serve.decoding`). None: threads.
    decode_processes: Optional[int] = None
    #: ``cpu`` (Pillow) or ``cuda``/``cuda:N``: baseline JPEGs decoded by nvJPEG (torchvision), same limits.
    decode_device: str = "cpu"
    #: torch intra-op threads of the engine; None leaves torch's default (one per core). On a machine shared
    #: with other CPU-heavy processes, fewer threads avoid OpenMP oversubscription stalls.
    threads: Optional[int] = None
    log_level: str = "info"
    access_log: bool = False
    #: Run every batch bucket once before /readyz turns 200 (GPU engine: autotuning and CUDA-graph capture).
    warmup: bool = True
    #: GPU engine: the same answer for an image whatever it is batched with (one LayerNorm and attention tile per
    #: shape: ``P4Q_BATCH_INVARIANT=1``, see kernels/tuning.py), at some cost in speed where other tiles were faster.
    batch_invariant: bool = False
    #: Serving processes on one listening socket (:mod:`p4q_engine.serve.workers`): the HTTP host work on that many
    #: cores, one engine per process.
    workers: int = 1

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, "--port must be in 0..65535"),
            (1 <= self.workers <= 64, "--workers must be in 1..64"),
            (self.max_batch >= 1, "--max-batch must be >= 1"),
            (self.max_wait_ms >= 0, "--max-wait-ms must be >= 0"),
            (self.max_queue >= 1, "--max-queue must be >= 1"),
            (self.timeout_s > 0, "--timeout-s must be > 0"),
            (self.max_body_bytes >= 1, "--max-body-bytes must be >= 1"),
            (self.max_pixels >= 4, "--max-pixels must be >= 4 (images need at least 2x2 pixels)"),
            (self.threads is None or self.threads >= 1, "--threads must be >= 1"),
            (self.decode_workers is None or self.decode_workers >= 1, "decode_workers must be >= 1"),
            (self.decode_memory_mb >= 1, "decode_memory_mb must be >= 1"),
            (self.decode_processes is None or self.decode_processes >= 1, "--decode-processes must be >= 1"),
            (
                self.decode_device == "cpu" or self.decode_device.startswith("cuda"),
                f"--decode-device must be cpu, cuda or cuda:N, got {self.decode_device!r}",
            ),
            (
                self.decode_processes is None or self.decode_device == "cpu",
                "--decode-processes decodes on the CPU; it cannot be combined with --decode-device cuda",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    @property
    def decode_threads(self) -> int:
        """``decode_workers``, or the usable core count."""
        return self.decode_workers or usable_cores()


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
