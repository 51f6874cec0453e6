"""``p4q classify ... --ray``: the same job as :mod:`p4q_engine.batch.classify`, as a Ray Data pipeline.

Why Ray Data: it streams a dataset through CPU and GPU stages with back-pressure (bounded object-store memory),
schedules stages over a cluster and retries failed tasks - the parts a batch job over many GPUs or machines needs
and this project should not re-implement. The pipeline:

1. ``from_items`` of the input's work units (:mod:`p4q_engine.batch.sources`: a few files or one Parquet row
   group each - only their names travel, never the images);
2. ``map_batches(DecodeActor)`` on CPU workers (``--decoders``): read each unit, decode and preprocess with the
   artifact's transform under the usual bounds; a bad image becomes an error row here;
3. ``map_batches(EngineActor)``: one :class:`~p4q_engine.runtime.engine.Engine` per actor (``--actors``; one per
   GPU with ``--gpus-per-actor 1``), ``Engine.classify`` on batches of ``--batch-size`` good images;
4. the driver streams the result rows, in input order (``preserve_order``), into the one output Parquet file.

Inputs are read by the workers: on a multi-node cluster a directory, glob or Parquet input must be on storage
every node sees under the same path. The artifact goes through Ray's object store, so it need not.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from p4q_engine.batch.classify import (
    JobOptions,
    JobResult,
    ParquetOut,
    allow_pixels,
    classify_rows,
    decode_item,
    require_pyarrow,
    schema,
)
from p4q_engine.batch.sources import read_unit, resolve
from p4q_engine.errors import ConfigError


def require_ray_data() -> None:
    """One clear line (``p4q: error: ...``, exit 2) when the extra is missing."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"--ray needs Ray Data, which is not installed ({e.name or e}): "
            "pip install 'p4q-engine[ray]' (from a checkout: pip install -c requirements.lock -e '.[ray]')"
        ) from None


@dataclass(frozen=True)
class RayJobOptions:
    """Placement of the pipeline's actors (the ``--ray`` flags)."""

    actors: Optional[int] = None
    gpus_per_actor: Optional[float] = None
    cpus_per_actor: float = 1.0
    decoders: int = 1
    cpus_per_decoder: float = 1.0
    device: str = "auto"
    address: Optional[str] = None

    def __post_init__(self) -> None:
        for ok, message in (
            (self.actors is None or self.actors >= 1, "--actors must be >= 1"),
            (self.gpus_per_actor is None or self.gpus_per_actor >= 0, "--gpus-per-actor must be >= 0"),
            (self.cpus_per_actor >= 0, "--cpus-per-actor must be >= 0"),
            (self.decoders >= 1, "--decoders must be >= 1"),
            (self.cpus_per_decoder > 0, "--cpus-per-decoder must be > 0"),
        ):
            if not ok:
                raise ConfigError(message)


def _artifact_bytes(artifact: list) -> bytes:
    import ray

    ref = artifact[0]
    return ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref


class DecodeActor:
    """Stage 2: work units -> rows of ``index, source, pixels, error`` (pixels zero where ``error`` is set)."""

    def __init__(self, artifact: list, options: JobOptions) -> None:
        from p4q_engine.serve.ray_backend import Frontend

        torch.set_num_threads(1)
        allow_pixels(options.max_pixels)
        self.frontend = Frontend(_artifact_bytes(artifact))
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        h, w = self.frontend.transform.size
        dtype = np.uint8 if getattr(self.frontend.transform, "raw_ok", False) else np.float32  # decode_item's pixels
        index, source, pixels, error = [], [], [], []
        for blob in batch["unit"]:
            for item in read_unit(pickle.loads(blob), self.options.max_file_bytes):
                i, src, px, err = decode_item(self.frontend.transform, item, self.options.max_pixels)
                index.append(i)
                source.append(src)
                pixels.append(px.numpy() if px is not None else np.zeros((3, h, w), dtype))
                error.append(err or "")
        return {
            "index": np.asarray(index, np.int64),
            "source": np.asarray(source, object),
            "pixels": np.stack(pixels) if pixels else np.zeros((0, 3, h, w), dtype),
            "error": np.asarray(error, object),
        }


class EngineActor:
    """Stage 3: decoded rows -> output rows, with ``Engine.classify`` on the good ones."""

    def __init__(self, artifact: list, device: str, options: JobOptions, threads: Optional[int]) -> None:
        import os
        import tempfile

        from p4q_engine.runtime.engine import Engine
        from p4q_engine.serve.server import resolve_device

        if threads:
            torch.set_num_threads(threads)
        fd, path = tempfile.mkstemp(suffix=".p4q")
        with os.fdopen(fd, "wb") as f:
            f.write(_artifact_bytes(artifact))
        try:
            self.engine = Engine.load(path, resolve_device(device))
        finally:
            os.unlink(path)
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        pixels = torch.from_numpy(np.array(batch["pixels"]))  # a writable copy, uint8 (or float32) as decoded
        decoded = [
            (int(i), str(s), None if e else pixels[k], e or None)
            for k, (i, s, e) in enumerate(zip(batch["index"], batch["source"], batch["error"]))
        ]
        return pa.Table.from_pylist(classify_rows(self.engine, decoded, self.options), schema=schema())


def _placement(ray_opts: RayJobOptions) -> tuple[int, float, str]:
    """(engine actors, GPUs per actor, device): one actor per GPU when the job runs on GPUs."""
    import ray

    gpus = ray_opts.gpus_per_actor
    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus is None:
        want_gpu = ray_opts.device.startswith("cuda") or (ray_opts.device == "auto" and cluster_gpus >= 1)
        gpus = 1.0 if want_gpu else 0.0
    device = ray_opts.device if ray_opts.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    actors = ray_opts.actors or (max(1, int(cluster_gpus / gpus)) if gpus > 0 else 1)
    return actors, gpus, device


def run_ray(
    artifact_path: str,
    input_spec: str,
    output: str,
    options: JobOptions,
    ray_opts: RayJobOptions,
    progress: bool = True,
    threads: Optional[int] = None,
) -> JobResult:
    """Classify ``input_spec`` into ``output`` with the Ray Data pipeline of the module docstring."""
    require_ray_data()
    require_pyarrow()
    import ray

    from p4q_engine.serve.ray_backend import Frontend

    source = resolve(input_spec)
    data = open(artifact_path, "rb").read()
    Frontend(data)  # a bad artifact: one p4q: error line here, not failing actors
    if not ray.is_initialized():
        ray.init(address=ray_opts.address, include_dashboard=False, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = progress
    actors, gpus, device = _placement(ray_opts)
    artifact = [ray.put(data)]
    # one block per unit, so decoding spreads over the decoders
    ds = ray.data.from_items([{"unit": pickle.dumps(u)} for u in source.units], override_num_blocks=len(source.units))
    ds = ds.map_batches(
        DecodeActor,
        fn_constructor_args=(artifact, options),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=ray_opts.decoders),
        num_cpus=ray_opts.cpus_per_decoder,
    )
    ds = ds.map_batches(
        EngineActor,
        fn_constructor_args=(artifact, device, options, threads),
        batch_size=options.batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=ray_opts.cpus_per_actor,
        num_gpus=gpus,
    )
    out = ParquetOut(output)
    t0 = time.perf_counter()
    ok = False
    try:
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            out.write_table(table)
        ok = True
    finally:
        out.close(ok)
    return JobResult(out.rows, out.errors, time.perf_counter() - t0, str(output))
