"""The ``.p4q`` container: lossless save/load, and a typed, named :class:`ArtifactError` for every corruption."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from p4q_engine.artifact.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_KEY,
    Artifact,
    ArtifactError,
    load,
    save,
    sha256,
)
from p4q_engine.errors import P4QError


def mixed_artifact() -> Artifact:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 2, 2, generator=g).bfloat16(),
        "i64": torch.tensor([-(2**62), 0, 2**62 + 5]),
        "i32": torch.randint(-(2**31), 2**31 - 1, (4, 3), generator=g, dtype=torch.int64).to(torch.int32),
        "i16": torch.tensor([-32768, 32767, 1], dtype=torch.int16),
        "i8": torch.tensor([[-128, 127], [0, -1]], dtype=torch.int8),
        "u8": torch.arange(256).to(torch.uint8).reshape(16, 16),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "packed.p0": torch.tensor([[0x87654321 - (1 << 32)]], dtype=torch.int32),
    }
    manifest = {
        "model": {"name": "unit", "recipe": {"bits": "4-4-8"}, "unicode": "caf\u00e9 \u732b"},
        "classes": {"names": ["a", 'b "quoted"', "c\nnewline"], "logit_scale": 14.25},
        "tensors": {"packed.p0": {"layout": {"kind": "packed", "bits": 4, "planes": [4], "logical_shape": [1, 8]}}},
    }
    return Artifact(manifest, tensors)


# ------------------------------------------------------------------ helpers to take a file apart and rebuild it
def split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(header: dict, data: bytes) -> bytes:
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


def with_manifest(header: dict, man: dict) -> dict:
    """``header`` with its manifest replaced (and re-checksummed, so only the semantic change is seen)."""
    text = json.dumps(man, sort_keys=True)
    header = dict(header)
    header["__metadata__"] = {MANIFEST_KEY: text, MANIFEST_KEY + "_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return header


def manifest_of(header: dict) -> dict:
    return json.loads(header["__metadata__"][MANIFEST_KEY])


def expect_error(path: Path, *fragments: str) -> ArtifactError:
    with pytest.raises(ArtifactError) as info:
        load(path)
    msg = str(info.value)
    assert any(f in msg for f in fragments), f"{msg!r} names none of {fragments}"
    return info.value


@pytest.fixture()
def saved(tmp_path) -> tuple[Path, bytes, Artifact]:
    art = mixed_artifact()
    path = tmp_path / "m.p4q"
    save(art, path)
    return path, path.read_bytes(), art


# ------------------------------------------------------------------ round trip
def test_roundtrip_mixed_dtypes(saved):
    path, blob, art = saved
    assert path.stat().st_size == len(blob)
    assert not path.with_name(path.name + ".tmp").exists()
    back = load(path)
    assert set(back.tensors) == set(art.tensors)
    for name, t in art.tensors.items():
        u = back.tensors[name]
        assert u.dtype == t.dtype and u.shape == t.shape, name
        assert torch.equal(u, t), name
    man = back.manifest
    assert man["format"] == FORMAT_NAME and man["format_version"] == FORMAT_VERSION
    assert man["model"] == art.manifest["model"] and man["classes"] == art.manifest["classes"]
    for name, t in art.tensors.items():
        desc = man["tensors"][name]
        assert desc["sha256"] == sha256(t) and desc["shape"] == list(t.shape)
    assert back.layout("packed.p0") == art.manifest["tensors"]["packed.p0"]["layout"]
    assert back.layout("f32") == {"kind": "plain"}


def test_save_is_deterministic_and_reload_resave_is_identical(saved, tmp_path):
    path, blob, art = saved
    save(mixed_artifact(), tmp_path / "again.p4q")
    assert (tmp_path / "again.p4q").read_bytes() == blob
    save(load(path), tmp_path / "resaved.p4q")
    assert (tmp_path / "resaved.p4q").read_bytes() == blob


def test_save_does_not_mutate_the_callers_manifest(tmp_path):
    art = mixed_artifact()
    before = json.loads(json.dumps(art.manifest))
    packed_desc = art.manifest["tensors"]["packed.p0"]
    save(art, tmp_path / "m.p4q")
    assert art.manifest == before  # no format fields, no dtype/shape/sha256, no entries for the plain tensors
    assert "format" not in art.manifest and set(art.manifest["tensors"]) == {"packed.p0"}
    assert art.manifest["tensors"]["packed.p0"] is packed_desc and "sha256" not in packed_desc
    # The file still carries everything.
    back = load(tmp_path / "m.p4q")
    assert set(back.manifest["tensors"]) == set(art.tensors) and back.manifest["format"] == FORMAT_NAME


def test_save_twice_after_dropping_a_tensor(tmp_path):
    """A first save must not leave entries behind that make a later save of the same artifact inconsistent."""
    art = mixed_artifact()
    save(art, tmp_path / "a.p4q")
    del art.tensors["f32"]
    save(art, tmp_path / "b.p4q")
    assert "f32" not in load(tmp_path / "b.p4q").tensors


def test_file_is_plain_safetensors(saved):
    path, _, art = saved
    plain = load_file(str(path))
    for name, t in art.tensors.items():
        assert torch.equal(plain[name], t)


def test_save_rejects_unstorable(tmp_path):
    with pytest.raises(ArtifactError, match="cannot be stored"):
        save(Artifact({}, {"b": torch.zeros(2, dtype=torch.bool)}), tmp_path / "x.p4q")
    with pytest.raises(ArtifactError, match="not provided"):
        save(Artifact({"tensors": {"ghost": {"layout": {"kind": "plain"}}}}, {}), tmp_path / "y.p4q")
    assert not (tmp_path / "x.p4q").exists() and not (tmp_path / "y.p4q").exists()


# ------------------------------------------------------------------ truncation
@pytest.mark.parametrize("where", ["zero", "four", "header_middle", "header_end", "data_middle", "last_byte"])
def test_truncated(saved, where):
    path, blob, _ = saved
    (n,) = struct.unpack("<Q", blob[:8])
    cut = {
        "zero": 0,
        "four": 4,
        "header_middle": 8 + n // 2,
        "header_end": 8 + n,
        "data_middle": 8 + n + (len(blob) - 8 - n) // 2,
        "last_byte": len(blob) - 1,
    }[where]
    path.write_bytes(blob[:cut])
    err = expect_error(path, "truncated")
    assert isinstance(err, P4QError)


def test_error_is_not_a_bare_exception_type(saved):
    path, blob, _ = saved
    path.write_bytes(blob[:3])
    with pytest.raises(P4QError):  # the CLI catches the base class
        load(path)


# ------------------------------------------------------------------ flipped bytes
def test_flipped_byte_in_tensor_data(saved):
    path, blob, art = saved
    header, data = split(blob)
    lo, hi = header["u8"]["data_offsets"]
    corrupt = bytearray(blob)
    corrupt[len(blob) - len(data) + lo + 77] ^= 0x10
    path.write_bytes(bytes(corrupt))
    err = expect_error(path, "sha256 mismatch")
    assert "'u8'" in str(err)


@pytest.mark.parametrize("needle", [b"format_version", b"logit_scale", b"caf"])
def test_flipped_byte_in_manifest(saved, needle):
    path, blob, _ = saved
    at = blob.index(needle)
    assert at < 8 + struct.unpack("<Q", blob[:8])[0]
    corrupt = bytearray(blob)
    corrupt[at + 1] ^= 0x01
    path.write_bytes(bytes(corrupt))
    expect_error(path, "manifest sha256 mismatch")


def test_flipped_byte_in_manifest_checksum(saved):
    path, blob, _ = saved
    at = blob.index(b'_sha256":"') + len(b'_sha256":"')
    corrupt = bytearray(blob)
    corrupt[at] = ord("0") if corrupt[at] != ord("0") else ord("1")
    path.write_bytes(bytes(corrupt))
    expect_error(path, "manifest sha256 mismatch")


def test_flipped_structural_header_byte(saved):
    path, blob, _ = saved
    corrupt = bytearray(blob)
    corrupt[8] = ord("[")  # the header no longer opens a JSON object
    path.write_bytes(bytes(corrupt))
    expect_error(path, "corrupt header")
    corrupt = bytearray(blob)
    corrupt[blob.index(b'"data_offsets":[') - 1] = ord(";")
    path.write_bytes(bytes(corrupt))
    expect_error(path, "corrupt header")


def test_flipped_offset_digit(saved):
    path, blob, _ = saved
    header, data = split(blob)
    lo, hi = header["f32"]["data_offsets"]
    header["f32"]["data_offsets"] = [lo + 4, hi + 4]  # same length, shifted: no longer the stored bytes
    path.write_bytes(join(header, data))
    expect_error(path, "sha256 mismatch", "offsets are corrupt", "gap or overlap")


def test_header_length_prefix_corrupt(saved):
    path, blob, _ = saved
    path.write_bytes(struct.pack("<Q", 1 << 40) + blob[8:])
    expect_error(path, "header claims")
    (n,) = struct.unpack("<Q", blob[:8])
    path.write_bytes(struct.pack("<Q", n + 8) + blob[8:])  # header swallows data bytes
    expect_error(path, "corrupt header")


# ------------------------------------------------------------------ versions and manifests
@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, "1", None])
def test_unknown_format_version(saved, version):
    path, blob, _ = saved
    header, data = split(blob)
    man = manifest_of(header)
    man["format_version"] = version
    path.write_bytes(join(with_manifest(header, man), data))
    expect_error(path, f"unsupported format version {version!r}")


def test_not_a_p4q_manifest(saved):
    path, blob, _ = saved
    header, data = split(blob)
    man = manifest_of(header)
    man["format"] = "gguf"
    path.write_bytes(join(with_manifest(header, man), data))
    expect_error(path, "format field")
    del man["format"]
    path.write_bytes(join(with_manifest(header, man), data))
    expect_error(path, "format field")


def test_manifest_without_tensor_table(saved):
    path, blob, _ = saved
    header, data = split(blob)
    man = manifest_of(header)
    man["tensors"] = ["f32"]
    path.write_bytes(join(with_manifest(header, man), data))
    expect_error(path, "no tensor table")


def test_manifest_not_json(saved):
    path, blob, _ = saved
    header, data = split(blob)
    text = "{not json"
    header["__metadata__"] = {MANIFEST_KEY: text, MANIFEST_KEY + "_sha256": hashlib.sha256(text.encode()).hexdigest()}
    path.write_bytes(join(header, data))
    expect_error(path, "not valid JSON")


def test_missing_tensor(saved):
    path, blob, _ = saved
    header, data = split(blob)
    del header["i16"]  # the manifest still describes it
    path.write_bytes(join(header, data))
    err = expect_error(path, "missing tensor")
    assert "'i16'" in str(err)


def test_extra_tensor(saved):
    path, blob, _ = saved
    header, data = split(blob)
    header["intruder"] = {"dtype": "U8", "shape": [4], "data_offsets": [len(data), len(data) + 4]}
    path.write_bytes(join(header, data + b"\x00" * 4))
    err = expect_error(path, "not described by the manifest")
    assert "'intruder'" in str(err)


def test_shape_mismatch_between_manifest_and_file(saved):
    path, blob, _ = saved
    header, data = split(blob)
    man = manifest_of(header)
    man["tensors"]["f32"]["shape"] = [5, 3]  # same bytes, different shape
    path.write_bytes(join(with_manifest(header, man), data))
    err = expect_error(path, "manifest says")
    assert "'f32'" in str(err) and "[5, 3]" in str(err)


def test_dtype_mismatch_between_manifest_and_file(saved):
    path, blob, _ = saved
    header, data = split(blob)
    header["i32"]["dtype"] = "F32"  # the manifest still says I32
    path.write_bytes(join(header, data))
    expect_error(path, "manifest says")


@pytest.mark.parametrize("dtype", ["F64", "BOOL", ["F32"], 7, None])
def test_unsupported_or_malformed_dtype(saved, dtype):
    path, blob, _ = saved
    header, data = split(blob)
    header["f32"]["dtype"] = dtype
    man = manifest_of(header)
    man["tensors"]["f32"]["dtype"] = dtype
    path.write_bytes(join(with_manifest(header, man), data))
    expect_error(path, "unsupported dtype")


@pytest.mark.parametrize("shape", [[-1, 15], [3.0, 5], "3x5", [True, 15]])
def test_malformed_shape(saved, shape):
    path, blob, _ = saved
    header, data = split(blob)
    header["f32"]["shape"] = shape
    man = manifest_of(header)
    man["tensors"]["f32"]["shape"] = shape
    path.write_bytes(join(with_manifest(header, man), data))
    expect_error(path, "malformed shape", "truncated or its offsets", "sha256 mismatch")


def test_trailing_bytes_rejected(saved):
    path, blob, _ = saved
    path.write_bytes(blob + b"\x00")
    expect_error(path, "trailing bytes")


def test_gap_between_tensors_rejected(saved):
    path, blob, _ = saved
    header, data = split(blob)
    # move the last tensor one byte further, leaving a one-byte hole (its bytes and checksum stay valid)
    name = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
    lo, hi = header[name]["data_offsets"]
    header[name]["data_offsets"] = [lo + 1, hi + 1]
    path.write_bytes(join(header, data[:lo] + b"\x00" + data[lo:]))
    expect_error(path, "gap or overlap")


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'{"a":' + b"[" * 50000 + b"]" * 50000 + b"}",
        b'{"a":' + b"9" * 5000 + b"}",
        b"\xff\xfe{}",
        b' {"__metadata__":{}}',
    ],
)
def test_hostile_headers(tmp_path, body):
    """Non-object headers, absurd nesting, huge integers, invalid UTF-8: all ArtifactError, no other exception."""
    body += b" " * (-len(body) % 8)
    path = tmp_path / "h.p4q"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    expect_error(path, "corrupt header")


def test_header_padding_must_be_spaces(saved):
    path, blob, _ = saved
    (n,) = struct.unpack("<Q", blob[:8])
    raw = blob[8 : 8 + n]
    pad = len(raw) - len(raw.rstrip(b" "))
    if pad == 0:
        pytest.skip("this header needs no padding")
    path.write_bytes(blob[:8] + raw.rstrip(b" ") + b"\n" * pad + blob[8 + n :])
    expect_error(path, "corrupt header")


# ------------------------------------------------------------------ not an artifact at all
def test_nonexistent_path(tmp_path):
    err = expect_error(tmp_path / "nope" / "missing.p4q", "cannot read")
    assert "missing.p4q" in str(err)


def test_directory_path(tmp_path):
    expect_error(tmp_path, "cannot read")


def test_plain_safetensors_without_manifest(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 3)}, str(path))
    expect_error(path, "no manifest")
    save_file({"w": torch.zeros(2, 3)}, str(path), metadata={"format": "pt"})
    expect_error(path, "no manifest")


def test_random_bytes_file(tmp_path):
    path = tmp_path / "noise.p4q"
    path.write_bytes(bytes(range(256)) * 4)
    expect_error(path, "truncated", "corrupt")
