"""``p4q classify model.p4q --input DIR|GLOB|FILE.parquet --output results.parquet``: a dataset, classified locally.

The dataset is read one work unit at a time (:mod:`p4q_engine.batch.sources`), decoded on a few threads with the
server's bounds (:meth:`Preprocess.load`: header checks, pixel cap, reduced-scale JPEG decoding; a file over
``max_file_bytes`` is not even read), classified with :meth:`Engine.classify` in batches, and appended to the
output as one Parquet row group per batch - so memory holds one batch of pixels, whatever the dataset's size. A
progress bar (tqdm, on stderr) counts images.

Each image is one output row (:data:`SCHEMA`), in input order. An image that cannot be read or decoded - a
corrupt file, a non-image, one over the pixel cap - is a row with ``error`` set and no labels, never a failed job.
The Ray Data version (:mod:`p4q_engine.batch.ray_job`) writes the same rows.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from p4q_engine.batch.sources import Item, Source, read_unit, resolve
from p4q_engine.errors import ConfigError, ImageError
from p4q_engine.runtime.images import MAX_PIXELS

#: Output columns (pyarrow types are built in :func:`schema`).
COLUMNS = ("index", "source", "label", "prob", "labels", "probs", "indices", "error")


def require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--output writes Parquet, which needs pyarrow: pip install 'p4q-engine[ray]' (or pip install pyarrow)"
        ) from None


def schema() -> Any:
    """index, source, top-1 label and probability, top-k labels/probs/indices, and the error of a failed image."""
    import pyarrow as pa

    return pa.schema(
        [
            ("index", pa.int64()),
            ("source", pa.string()),
            ("label", pa.string()),
            ("prob", pa.float64()),
            ("labels", pa.list_(pa.string())),
            ("probs", pa.list_(pa.float64())),
            ("indices", pa.list_(pa.int64())),
            ("error", pa.string()),
        ]
    )


@dataclass(frozen=True)
class JobOptions:
    """Knobs of a classification job (the ``p4q classify --input`` flags)."""

    top_k: int = 5
    batch_size: int = 64
    max_pixels: int = MAX_PIXELS
    max_file_bytes: int = 64 * 2**20
    decode_workers: int = 2
    labels: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        for ok, message in (
            (self.top_k >= 1, "--top-k must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.max_pixels >= 4, "--max-pixels must be >= 4"),
            (self.max_file_bytes >= 1, "--max-file-bytes must be >= 1"),
            (self.decode_workers >= 1, "--decode-workers must be >= 1"),
        ):
            if not ok:
                raise ConfigError(message)


# ---------------------------------------------------------------- decoding and rows
def allow_pixels(max_pixels: int) -> None:
    """Let ``max_pixels`` (and the larger size a baseline JPEG may declare, decoded reduced) be the one cap, as the
    server does: Pillow's own bomb check would refuse some of them first."""
    from PIL import Image

    from p4q_engine.runtime.images import JPEG_DECLARED_FACTOR

    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, max_pixels * JPEG_DECLARED_FACTOR)


def decode_item(transform: Any, item: Item, max_pixels: int) -> tuple[int, str, Optional[torch.Tensor], Optional[str]]:
    """``(index, source, pixels [3, H, W] or None, error or None)``; failures are messages, never exceptions."""
    index, source, data, err = item
    if err is not None:
        return index, source, None, err
    if not data:
        return index, source, None, f"{source}: empty file"
    try:
        # 8-bit pixels where the preprocess allows (a quarter of the bytes through Ray's object store); the engine
        # normalises them to the float pixels' exact values
        raw = {"raw": True} if getattr(transform, "raw_ok", False) else {}
        pixels = transform.load(data, name=source, max_pixels=max_pixels, **raw)
    except ImageError as e:
        return index, source, None, str(e)
    except Exception as e:  # noqa: BLE001 - anything else on user data is still that image's error
        return index, source, None, f"{source}: cannot preprocess image ({e.__class__.__name__})"
    if not torch.isfinite(pixels).all():
        return index, source, None, f"{source}: preprocessing produced non-finite values"
    return index, source, pixels, None


def error_row(index: int, source: str, error: str) -> dict[str, Any]:
    return {
        "index": index,
        "source": source,
        "label": None,
        "prob": None,
        "labels": [],
        "probs": [],
        "indices": [],
        "error": error,
    }


def classify_rows(engine: Any, decoded: Sequence[tuple], options: JobOptions) -> list[dict[str, Any]]:
    """Output rows of decoded items, in their order: ``Engine.classify`` on the stacked good pixels."""
    good = [d for d in decoded if d[2] is not None]
    preds = iter(())
    if good:
        labels = list(options.labels) if options.labels else None
        preds = iter(engine.classify(torch.stack([d[2] for d in good]), top_k=options.top_k, labels=labels))
    rows = []
    for index, source, pixels, err in decoded:
        if pixels is None:
            rows.append(error_row(index, source, err or "unknown error"))
            continue
        p = next(preds)
        rows.append(
            {
                "index": index,
                "source": source,
                "label": p.labels[0],
                "prob": p.probs[0],
                "labels": p.labels,
                "probs": p.probs,
                "indices": p.indices,
                "error": None,
            }
        )
    return rows


# ---------------------------------------------------------------- output
class ParquetOut:
    """Rows appended as row groups to a temporary file beside ``path``, renamed over it when complete (a failed
    or interrupted job never leaves a truncated results file)."""

    def __init__(self, path: str | Path) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(f"--output {self.path} is a directory; name a .parquet file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".part")
        os.close(fd)
        self._writer = pq.ParquetWriter(self._tmp, schema())
        self.rows = self.errors = 0

    def write(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa

        if rows:
            self._writer.write_table(pa.Table.from_pylist(rows, schema=schema()))
            self.rows += len(rows)
            self.errors += sum(r["error"] is not None for r in rows)

    def write_table(self, table: Any) -> None:
        """Rows already in :func:`schema` (the Ray Data job's batches)."""
        import pyarrow.compute as pc

        if table.num_rows:
            self._writer.write_table(table.select(list(COLUMNS)).cast(schema()))
            self.rows += table.num_rows
            self.errors += int(pc.sum(pc.is_valid(table.column("error"))).as_py() or 0)

    def close(self, ok: bool = True) -> None:
        self._writer.close()
        if ok:
            os.replace(self._tmp, self.path)
        else:
            os.unlink(self._tmp)


# ---------------------------------------------------------------- the local job
def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _items(source: Source, max_bytes: int) -> Iterator[Item]:
    for unit in source.units:
        yield from read_unit(unit, max_bytes)


@dataclass
class JobResult:
    images: int
    errors: int
    seconds: float
    output: str

    def summary(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"wrote {self.output}: {self.images} images ({self.errors} errors) in {self.seconds:.1f} s "
            f"({rate:.1f} images/s)"
        )


def run_local(
    engine: Any,
    input_spec: str,
    output: str,
    options: JobOptions,
    progress: bool = True,
    source: Optional[Source] = None,
) -> JobResult:
    """Classify every image of ``input_spec`` into ``output`` in this process (see the module docstring)."""
    import time

    from tqdm import tqdm

    require_pyarrow()
    allow_pixels(options.max_pixels)
    source = source or resolve(input_spec)
    out = ParquetOut(output)
    t0 = time.perf_counter()
    ok = False
    bar = tqdm(total=source.count, unit="img", desc="classify", disable=not progress, dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(options.decode_workers, thread_name_prefix="p4q-classify-decode") as pool:
            for batch in _batches(_items(source, options.max_file_bytes), options.batch_size):
                decoded = list(pool.map(lambda it: decode_item(engine.transform, it, options.max_pixels), batch))
                out.write(classify_rows(engine, decoded, options))
                bar.update(len(batch))
                bar.set_postfix(errors=out.errors, refresh=False)
        ok = True
    finally:
        bar.close()
        out.close(ok)
    return JobResult(out.rows, out.errors, time.perf_counter() - t0, str(output))
