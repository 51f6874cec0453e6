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
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from p4q_engine.errors import P4QError

FORMAT_NAME = "p4q"
FORMAT_VERSION = 1
MANIFEST_KEY = "p4q_manifest"
_MAX_HEADER = 64 << 20  # a header larger than this is corrupt, not a model

#: safetensors dtype tags we write and accept.
_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "I64": torch.int64,
}
_TAGS = {v: k for k, v in _DTYPES.items()}


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
    text = json.dumps(man, sort_keys=True)
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


def _parse_header(buf: bytes) -> tuple[dict, int]:
    if len(buf) < 8:
        raise ArtifactError("file is truncated: shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > _MAX_HEADER or 8 + n > len(buf):
        raise ArtifactError(f"file is truncated or corrupt: header claims {n} bytes, file has {len(buf) - 8}")
    raw = buf[8 : 8 + n]
    if not raw.startswith(b"{") or not raw.rstrip(b" ").endswith(b"}"):
        raise ArtifactError("corrupt header: not a JSON object padded with spaces")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, int digit limit
        raise ArtifactError(f"corrupt header: {e.__class__.__name__}") from None
    if not isinstance(header, dict):
        raise ArtifactError("corrupt header: not a JSON object")
    return header, 8 + n


def _parse_manifest(header: dict) -> dict:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or MANIFEST_KEY not in meta:
        raise ArtifactError("not a .p4q artifact: no manifest in the safetensors metadata")
    text = meta[MANIFEST_KEY]
    if not isinstance(text, str) or hashlib.sha256(text.encode()).hexdigest() != meta.get(MANIFEST_KEY + "_sha256"):
        raise ArtifactError("manifest sha256 mismatch (the header is corrupt)")
    try:
        man = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise ArtifactError("corrupt manifest: not valid JSON") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT_NAME:
        raise ArtifactError("not a .p4q artifact: manifest format field missing")
    if man.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"unsupported format version {man.get('format_version')!r} "
                            f"(this build reads version {FORMAT_VERSION})")
    if not isinstance(man.get("tensors"), dict):
        raise ArtifactError("corrupt manifest: no tensor table")
    return man


def _read_tensor(name: str, entry: Any, desc: Any, data: memoryview) -> torch.Tensor:
    if not isinstance(entry, dict) or not isinstance(desc, dict):
        raise ArtifactError(f"tensor {name!r}: malformed header entry")
    dtype = _DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    shape, offs = entry.get("shape"), entry.get("data_offsets")
    if dtype is None:
        raise ArtifactError(f"tensor {name!r}: unsupported dtype {entry.get('dtype')!r}")
    if (not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape)  # type(): no bools
            or not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)):
        raise ArtifactError(f"tensor {name!r}: malformed shape or offsets")
    if desc.get("shape") != shape or desc.get("dtype") != entry.get("dtype"):
        raise ArtifactError(f"tensor {name!r}: manifest says {desc.get('dtype')}{desc.get('shape')}, "
                            f"file has {entry.get('dtype')}{shape}")
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    lo, hi = offs
    if not (0 <= lo <= hi <= len(data)) or hi - lo != nbytes:
        raise ArtifactError(f"tensor {name!r}: data is truncated or its offsets are corrupt")
    raw = bytes(data[lo:hi])
    if hashlib.sha256(raw).hexdigest() != desc.get("sha256"):
        raise ArtifactError(f"tensor {name!r}: sha256 mismatch (the file is corrupt)")
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return t.view(dtype).reshape(shape).clone()


def load(path: str | os.PathLike) -> Artifact:
    """Read and fully verify a ``.p4q`` file; raises :class:`ArtifactError` on any inconsistency."""
    try:
        buf = Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {path}: {e.strerror or e}") from None
    header, start = _parse_header(buf)
    man = _parse_manifest(header)
    data = memoryview(buf)[start:]
    names = [k for k in header if k != "__metadata__"]
    missing = sorted(set(man["tensors"]) - set(names))
    if missing:
        raise ArtifactError(f"missing tensor {missing[0]!r} described by the manifest")
    extra = sorted(set(names) - set(man["tensors"]))
    if extra:
        raise ArtifactError(f"tensor {extra[0]!r} is not described by the manifest")
    tensors = {n: _read_tensor(n, header[n], man["tensors"][n], data) for n in names}
    end = 0  # safetensors: the data buffer is covered by the tensors exactly, no gaps, overlaps or trailing bytes
    for lo, hi in sorted(tuple(header[n]["data_offsets"]) for n in names):
        if lo != end:
            raise ArtifactError(f"tensor data has a gap or overlap at byte {lo} (the offsets are corrupt)")
        end = hi
    if end != len(data):
        raise ArtifactError(f"file has {len(data) - end} unexpected trailing bytes after the tensor data")
    return Artifact(man, tensors)
