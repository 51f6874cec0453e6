"""The ``.p4q`` artifact: one safetensors file whose header metadata carries a JSON manifest.

The manifest records the format version, the model and bit configuration, and for every tensor its dtype, stored
shape, sha256 and a layout descriptor (plain, or packed: bits, signedness, plane widths, logical shape). Loading
never unpickles anything and never returns a half-loaded artifact: every problem raises :class:`ArtifactError`
naming it. The layout is documented in ``docs/format.md``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p4q_engine.errors import P4QError

FORMAT_NAME = "p4q"
FORMAT_VERSION = 1
MANIFEST_KEY = "p4q_manifest"
_MAX_HEADER = 64 << 20  # a header (manifest included) larger than this is corrupt, not a model
_MAX_TENSORS = 1 << 16  # ViT-bigG has ~600 tensors; a header listing more than this is not a model

#: safetensors dtype tags we write and accept.
_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I64": torch.int64,
}
_TAGS = {v: k for k, v in _DTYPES.items()}
_SIZES = {v: torch.empty((), dtype=v).element_size() for v in _DTYPES.values()}


class ArtifactError(P4QError):
    """A ``.p4q`` file is truncated, corrupt, of an unknown version, or inconsistent with its manifest."""


@dataclass
class Artifact:
    """In-memory artifact: the manifest (JSON-ready dict) and the named tensors it describes."""

    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def layout(self, name: str) -> dict[str, Any]:
        return self.manifest["tensors"][name]["layout"]


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(_raw(t)).hexdigest()


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # reshape: 0-d tensors too


def save(artifact: Artifact, path: str | os.PathLike) -> int:
    """Write ``artifact`` atomically (temp file + rename); returns the file size in bytes.

    The caller's manifest is left untouched: the format fields and each tensor's dtype, shape and sha256 go into a
    deep copy (so saving the same in-memory artifact twice, or after changing a tensor, never sees stale entries).
    """
    man = copy.deepcopy(artifact.manifest)
    man.update(format=FORMAT_NAME, format_version=FORMAT_VERSION)
    entries: dict[str, Any] = {}
    offset = 0
    for name in sorted(artifact.tensors):
        t = artifact.tensors[name]
        if t.dtype not in _TAGS:
            raise ArtifactError(f"tensor {name!r}: dtype {t.dtype} cannot be stored")
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": _TAGS[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        desc = man.setdefault("tensors", {}).setdefault(name, {"layout": {"kind": "plain"}})
        desc.update(dtype=_TAGS[t.dtype], shape=list(t.shape), sha256=sha256(t))
        offset += nbytes
    missing = set(man.get("tensors", {})) - set(artifact.tensors)
    if missing:
        raise ArtifactError(f"manifest describes tensors that are not provided: {sorted(missing)[:3]}")
    try:  # never write what load refuses: NaN/inf have no JSON spelling, a lone surrogate is not Unicode
        text = json.dumps(man, sort_keys=True, allow_nan=False)
        _StrictJSON("manifest").check(man)
    except (ValueError, ArtifactError) as e:
        raise ArtifactError(f"manifest cannot be saved: {e}") from None
    meta = {MANIFEST_KEY: text, MANIFEST_KEY + "_sha256": hashlib.sha256(text.encode()).hexdigest()}
    header = {"__metadata__": meta, **entries}
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for name in sorted(artifact.tensors):
            f.write(_raw(artifact.tensors[name]))
    os.replace(tmp, path)
    return path.stat().st_size


class _NotANumber:
    """Stands in for a ``NaN``/``Infinity`` literal or an overflowing number while parsing, so the error can name
    where it sits."""

    def __init__(self, text: str) -> None:
        self.text = text


class _StrictJSON:
    """``json.loads`` as strict as the safetensors library reads headers: duplicate keys, ``NaN``/``Infinity`` and
    numbers that overflow a float are errors (not "last one wins" or ``inf``), integers are bounded in length, and
    every string must be valid Unicode (a ``\\ud800`` escape yields a lone surrogate nothing can encode or print)."""

    MAX_INT_DIGITS = 40  # offsets and sizes are u64 (20 digits); nothing in a manifest is larger

    def __init__(self, what: str) -> None:
        self.what = what

    def pairs(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        d = dict(pairs)
        if len(d) != len(pairs):
            seen: set[str] = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise ArtifactError(f"corrupt {self.what}: duplicate key {dup!r}")
        return d

    @staticmethod
    def number(text: str) -> Any:
        v = float(text)
        return v if math.isfinite(v) else _NotANumber(text)

    def integer(self, text: str) -> int:
        if len(text.lstrip("-")) > self.MAX_INT_DIGITS:
            raise ArtifactError(f"corrupt {self.what}: integer literal of {len(text.lstrip('-'))} digits")
        return int(text)

    def loads(self, text: str) -> Any:
        try:
            obj = json.loads(
                text,
                object_pairs_hook=self.pairs,
                parse_constant=_NotANumber,
                parse_float=self.number,
                parse_int=self.integer,
            )
        except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError
            raise ArtifactError(f"corrupt {self.what}: not valid JSON ({e.__class__.__name__})") from None
        self.check(obj)
        return obj

    def check(self, obj: Any) -> None:
        """Walk every value (iteratively: the parser already bounded the depth) for lone surrogates and
        non-finite numbers, naming the first one's place."""
        stack: list[tuple[str, Any]] = [("", obj)]
        while stack:
            path, v = stack.pop()
            if isinstance(v, _NotANumber):
                raise ArtifactError(
                    f"corrupt {self.what}: {path or 'the value'} is {v.text[:20]}, which is not a "
                    f"finite number (JSON has no NaN or infinity)"
                )
            if isinstance(v, str):
                if not _encodable(v):
                    raise ArtifactError(
                        f"corrupt {self.what}: the string at {path or 'top level'} holds a lone "
                        f"surrogate (not valid Unicode)"
                    )
                continue
            items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
            for k, x in items:
                if isinstance(k, str) and not _encodable(k):
                    raise ArtifactError(
                        f"corrupt {self.what}: a key at {path or 'top level'} holds a lone "
                        f"surrogate (not valid Unicode): {k[:40]!r}"
                    )
                stack.append((f"{path}[{k if isinstance(k, int) else repr(k[:60])}]", x))


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _header_length(prefix: bytes, size: int) -> int:
    if len(prefix) < 8 or size < 8:
        raise ArtifactError("file is truncated: shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > _MAX_HEADER or 8 + n > size:
        raise ArtifactError(f"file is truncated or corrupt: header claims {n} bytes, file has {size - 8}")
    return n


def _parse_header(raw: bytes) -> dict:
    if not raw.startswith(b"{") or not raw.rstrip(b" ").endswith(b"}"):
        raise ArtifactError("corrupt header: not a JSON object padded with spaces")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ArtifactError("corrupt header: UnicodeDecodeError") from None
    header = _StrictJSON("header").loads(text)
    if not isinstance(header, dict):
        raise ArtifactError("corrupt header: not a JSON object")
    if len(header) > _MAX_TENSORS + 1:
        raise ArtifactError(f"corrupt header: {len(header) - 1} tensors (more than {_MAX_TENSORS} is not a model)")
    return header


def _parse_manifest(header: dict) -> dict:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or MANIFEST_KEY not in meta:
        raise ArtifactError("not a .p4q artifact: no manifest in the safetensors metadata")
    text = meta[MANIFEST_KEY]
    if not isinstance(text, str) or hashlib.sha256(text.encode()).hexdigest() != meta.get(MANIFEST_KEY + "_sha256"):
        raise ArtifactError("manifest sha256 mismatch (the header is corrupt)")
    man = _StrictJSON("manifest").loads(text)
    if not isinstance(man, dict) or man.get("format") != FORMAT_NAME:
        raise ArtifactError("not a .p4q artifact: manifest format field missing")
    version = man.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # type(): true is not version 1
        raise ArtifactError(f"unsupported format version {version!r} (this build reads version {FORMAT_VERSION})")
    if not isinstance(man.get("tensors"), dict):
        raise ArtifactError("corrupt manifest: no tensor table")
    for name, desc in man["tensors"].items():
        layout = desc.get("layout") if isinstance(desc, dict) else None
        if not isinstance(layout, dict) or not isinstance(layout.get("kind"), str):
            raise ArtifactError(f"tensor {name!r}: the manifest gives it no layout (an object with a kind)")
    return man


@dataclass
class _Entry:
    """One tensor's place in the data section, checked against the manifest before any data is read."""

    name: str
    dtype: torch.dtype
    shape: list[int]
    lo: int
    hi: int
    sha256: Any


def _entry(name: str, entry: Any, desc: Any, data_len: int) -> _Entry:
    if not isinstance(entry, dict) or not isinstance(desc, dict):
        raise ArtifactError(f"tensor {name!r}: malformed header entry")
    dtype = _DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    shape, offs = entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise ArtifactError(f"tensor {name!r}: unsupported dtype {entry.get('dtype')!r}")
    if (
        not isinstance(shape, list)
        or not all(type(s) is int and 0 <= s < 2**63 for s in shape)  # type(): no bools
        or not isinstance(offs, list)
        or len(offs) != 2
        or not all(type(o) is int for o in offs)
    ):
        raise ArtifactError(f"tensor {name!r}: malformed shape or offsets")
    if desc.get("shape") != shape or desc.get("dtype") != entry.get("dtype"):
        raise ArtifactError(
            f"tensor {name!r}: manifest says {desc.get('dtype')}{desc.get('shape')}, "
            f"file has {entry.get('dtype')}{shape}"
        )
    if len(shape) > 8 or math.prod(max(s, 1) for s in shape) >= 2**62:  # strides of an empty tensor overflow too
        raise ArtifactError(f"tensor {name!r}: shape {shape} is too large for a tensor")
    nbytes = math.prod(shape) * _SIZES[dtype]
    lo, hi = offs
    if not (0 <= lo <= hi <= data_len) or hi - lo != nbytes:
        raise ArtifactError(f"tensor {name!r}: data is truncated or its offsets are corrupt")
    return _Entry(name, dtype, shape, lo, hi, desc.get("sha256"))


def _readinto(f: Any, buf: memoryview) -> int:
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


def _open_regular(path: str | os.PathLike) -> tuple[Any, int]:
    """Open ``path`` for reading only if it is a regular file, without blocking (a FIFO or a device would hang the
    read or never end). Returns the open file and its size."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError, TypeError) as e:  # ValueError: a NUL byte in the path
        raise ArtifactError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, device or socket)"
            raise ArtifactError(f"cannot read {path}: it is {kind}")
        return os.fdopen(fd, "rb", buffering=0), st.st_size
    except BaseException:
        os.close(fd)
        raise


def load(path: str | os.PathLike) -> Artifact:
    """Read and fully verify a ``.p4q`` file; raises :class:`ArtifactError` on any inconsistency.

    Only regular files are read. The 8-byte length, the header and the manifest are read and checked first -
    against the file size, and every tensor's offsets against the data section - so a corrupt or hostile file is
    refused before its body is read; then each tensor is read straight into its own buffer and its sha256 checked.
    """
    f, size = _open_regular(path)
    try:
        with f:
            return _load(f, size)
    except ArtifactError:
        raise
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, TypeError, OverflowError, KeyError, IndexError, RuntimeError, AttributeError) as e:
        raise ArtifactError(f"corrupt artifact {path}: {e.__class__.__name__}: {e}") from None


def _load(f: Any, size: int) -> Artifact:
    n = _header_length(f.read(8) if size >= 8 else b"", size)
    raw = bytearray(n)
    if _readinto(f, memoryview(raw)) != n:
        raise ArtifactError("file is truncated: it changed while being read")
    header = _parse_header(bytes(raw))
    man = _parse_manifest(header)
    data_len = size - 8 - n
    names = [k for k in header if k != "__metadata__"]
    missing = sorted(set(man["tensors"]) - set(names))
    if missing:
        raise ArtifactError(f"missing tensor {missing[0]!r} described by the manifest")
    extra = sorted(set(names) - set(man["tensors"]))
    if extra:
        raise ArtifactError(f"tensor {extra[0]!r} is not described by the manifest")
    entries = sorted((_entry(k, header[k], man["tensors"][k], data_len) for k in names), key=lambda e: (e.lo, e.hi))
    end = 0  # safetensors: the data buffer is covered by the tensors exactly, no gaps, overlaps or trailing bytes
    for e in entries:
        if e.lo != end:
            raise ArtifactError(f"tensor data has a gap or overlap at byte {e.lo} (the offsets are corrupt)")
        end = e.hi
    if end != data_len:
        raise ArtifactError(f"file has {data_len - end} unexpected trailing bytes after the tensor data")
    tensors: dict[str, torch.Tensor] = {}
    for e in entries:  # in file order: one sequential pass, each tensor read once into its own storage
        buf = torch.empty(e.hi - e.lo, dtype=torch.uint8)
        if buf.numel() and _readinto(f, memoryview(buf.numpy())) != buf.numel():
            raise ArtifactError(f"tensor {e.name!r}: data is truncated (the file changed while being read)")
        if hashlib.sha256(buf.numpy()).hexdigest() != e.sha256:
            raise ArtifactError(f"tensor {e.name!r}: sha256 mismatch (the file is corrupt)")
        tensors[e.name] = buf.view(e.dtype).reshape(e.shape)
    return Artifact(man, {k: tensors[k] for k in names})
