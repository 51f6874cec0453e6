"""What ``p4q classify --input`` reads: a directory, a glob or a Parquet file, as small *work units* read lazily.

A work unit is a few images (``chunk`` files, or one Parquet row group): the local job and the Ray Data job read
one unit at a time, so memory holds at most a unit's encoded bytes, never the dataset. Every image keeps its
position in the input (``index``) and a ``source`` naming it in the output and in error messages.

Inputs:

* a directory: its image files, recursively, by extension (:data:`IMAGE_EXTENSIONS`, any case), in sorted path
  order; other files are ignored;
* a glob (``'photos/**/*.jpg'``, quoted): every regular file it matches, sorted - a matched non-image becomes an
  error row;
* a ``.parquet`` file with an ``image`` column (binary bytes, or a struct with a ``bytes`` field, as Hugging Face
  datasets store images) or else a ``path`` column (strings; relative paths are taken from the Parquet file's
  directory). ``source`` is ``FILE.parquet#ROW`` for bytes, the path for paths.
"""

from __future__ import annotations

import glob as globlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

from p4q_engine.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm")
#: Accepted Parquet columns, in the order they are looked for.
IMAGE_COLUMNS = ("image", "path")
#: Files per work unit of a directory or glob.
CHUNK = 64


@dataclass(frozen=True)
class FileUnit:
    """Images ``start .. start+len(paths)-1``, as files."""

    start: int
    paths: tuple[str, ...]


@dataclass(frozen=True)
class RowGroupUnit:
    """One row group of a Parquet file; its first row is image ``start``."""

    start: int
    file: str
    group: int
    column: str
    rows: int


Unit = Union[FileUnit, RowGroupUnit]


@dataclass
class Source:
    """A resolved input: how many images and the units that read them."""

    description: str
    count: int
    units: list[Unit]


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _chunks(paths: list[str], chunk: int) -> list[Unit]:
    return [FileUnit(i, tuple(paths[i : i + chunk])) for i in range(0, len(paths), chunk)]


def _directory(root: Path, chunk: int) -> Source:
    paths = sorted(
        str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or p.is_symlink())
    )
    if not paths:
        raise DatasetError(f"--input {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the directory")
    return Source(f"directory {root} ({len(paths)} image files)", len(paths), _chunks(paths, chunk))


def _glob(pattern: str, chunk: int) -> Source:
    paths = sorted(p for p in globlib.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise DatasetError(f"--input {pattern!r}: the pattern matches no files")
    return Source(f"glob {pattern!r} ({len(paths)} files)", len(paths), _chunks(paths, chunk))


def image_column(schema_names: list[str], file: str) -> str:
    for name in IMAGE_COLUMNS:
        if name in schema_names:
            return name
    raise DatasetError(
        f"--input {file}: no image column; a Parquet input needs an 'image' column (bytes, or a struct with "
        f"'bytes') or a 'path' column (file paths); it has {', '.join(schema_names[:10]) or 'no columns'}"
    )


def _parquet(file: Path) -> Source:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(file)
        names = meta.schema_arrow.names
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise DatasetError(f"--input {file}: not a readable Parquet file ({e.__class__.__name__}: {e})") from None
    column = image_column(names, str(file))
    units: list[Unit] = []
    start = 0
    for g in range(meta.num_row_groups):
        rows = meta.metadata.row_group(g).num_rows
        if rows:
            units.append(RowGroupUnit(start, str(file), g, column, rows))
        start += rows
    if not start:
        raise DatasetError(f"--input {file}: the Parquet file has no rows")
    return Source(f"Parquet {file} ({start} rows, column {column!r})", start, units)


def resolve(spec: str, chunk: int = CHUNK) -> Source:
    """The input named by ``--input``, or a :class:`DatasetError` saying why it cannot be read."""
    path = Path(spec)
    if path.is_dir():
        return _directory(path, chunk)
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            return _parquet(path)
        return Source(f"file {path}", 1, [FileUnit(0, (str(path),))])
    if _is_glob(spec):
        return _glob(spec, chunk)
    raise DatasetError(f"--input {spec}: no such file, directory or glob match")


# ---------------------------------------------------------------- reading a unit
#: (index, source, encoded bytes or None, error message or None) of one image.
Item = tuple[int, str, Optional[bytes], Optional[str]]


def _read_file(path: str, max_bytes: int) -> tuple[Optional[bytes], Optional[str]]:
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            return None, f"{path}: file of {size} bytes exceeds the {max_bytes}-byte limit (--max-file-bytes)"
        with open(path, "rb") as f:
            return f.read(max_bytes + 1), None
    except OSError as e:
        return None, f"{path}: cannot read ({e.strerror or e.__class__.__name__})"


def _cell_bytes(cell: object) -> Optional[bytes]:
    if isinstance(cell, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        cell = cell.get("bytes")
    return cell if isinstance(cell, (bytes, bytearray)) else None


def read_unit(unit: Unit, max_bytes: int) -> Iterator[Item]:
    """The images of one unit, in input order; an unreadable one is an item with an error, never an exception."""
    if isinstance(unit, FileUnit):
        for i, path in enumerate(unit.paths):
            data, err = _read_file(path, max_bytes)
            yield unit.start + i, path, data, err
        return
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(unit.file).read_row_group(unit.group, columns=[unit.column])
        cells = table.column(0).to_pylist()
    except Exception as e:  # noqa: BLE001 - a corrupt row group: every row of it is an error row
        msg = f"{unit.file}: row group {unit.group} unreadable ({e.__class__.__name__})"
        for i in range(unit.rows):
            yield unit.start + i, f"{unit.file}#{unit.start + i}", None, msg
        return
    base = Path(unit.file).parent
    for i, cell in enumerate(cells):
        index = unit.start + i
        if unit.column == "path":
            if not isinstance(cell, str) or not cell:
                yield index, f"{unit.file}#{index}", None, f"{unit.file}#{index}: 'path' is not a file path"
                continue
            path = cell if os.path.isabs(cell) else str(base / cell)
            data, err = _read_file(path, max_bytes)
            yield index, cell, data, err
            continue
        source = f"{unit.file}#{index}"
        data = _cell_bytes(cell)
        if data is None:
            yield index, source, None, f"{source}: 'image' holds no bytes"
        elif len(data) > max_bytes:
            yield index, source, None, f"{source}: {len(data)} bytes exceeds the {max_bytes}-byte limit"
        else:
            yield index, source, bytes(data), None
