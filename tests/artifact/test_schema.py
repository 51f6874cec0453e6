"""Issue 13's artifact findings, one test each: artifacts that loaded but lied, untyped exceptions escaping
``Engine.load``, and files the loader hung on or read whole. Every corruption is written with valid checksums (via
``save`` or a re-checksummed header), so only the schema, the semantic checks or the load-time self-test can refuse
it - and each must be an :class:`ArtifactError` naming the field.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import struct
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from p4q_engine.artifact.format import MANIFEST_KEY, Artifact, ArtifactError, load, save
from p4q_engine.artifact.schema import ManifestSpec, validate_manifest
from p4q_engine.runtime.engine import Engine

SITE = "visual.blocks.0.attn.in_proj.in"  # a 4-bit input site in the 4-4-8 artifact
W = "visual.blocks.0.mlp.c_fc"


@pytest.fixture(scope="module")
def base(folded) -> Artifact:
    """The 4-4-8 full-scope artifact with QAdapter, as loaded from disk."""
    return load(folded("4-4-8", "full").path)


def mutated(base: Artifact, mutate: Callable[[dict, dict], Any]) -> Artifact:
    man, tensors = copy.deepcopy(base.manifest), {k: v.clone() for k, v in base.tensors.items()}
    mutate(man, tensors)
    return Artifact(man, tensors)


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header_text: str, data: bytes) -> bytes:
    hb = header_text.encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


def _header_with_manifest_text(header: dict, text: str) -> dict:
    header = dict(header)
    header["__metadata__"] = {
        MANIFEST_KEY: text,
        MANIFEST_KEY + "_sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
    }
    return header


#: A value ``save`` writes as a plain number, swapped afterwards for a literal it refuses to write (NaN, Infinity).
PLACEHOLDER = 123456.789


def saved(tmp_path: Path, art: Artifact, literal: str | None = None) -> Path:
    path = tmp_path / "bad.p4q"
    save(art, path)
    if literal is not None:
        header, data = _split(path.read_bytes())
        text = header["__metadata__"][MANIFEST_KEY]
        assert text.count(repr(PLACEHOLDER)) == 1
        path.write_bytes(
            _join(json.dumps(_header_with_manifest_text(header, text.replace(repr(PLACEHOLDER), literal))), data)
        )
    return path


def _site(**kv):
    return lambda man, t: man["sites"][SITE].update(kv)


def _field(section: str, **kv):
    return lambda man, t: man[section].update(kv)


def _tensor(name: str, index: int, value: float):
    def mutate(man, t):
        t[name].view(-1)[index] = value

    return mutate


# ------------------------------------------------------------------ artifacts that loaded but lied
JSON_SITE = r"\['sites'\]\['visual.blocks.0.attn.in_proj.in'\]"
LIES = {
    # activation site scales: NaN / inf (JSON literals, refused by the parser, which names where they sit) / zero /
    # negative / beyond float32
    "site_scale_nan": (_site(scale=PLACEHOLDER), "NaN", JSON_SITE + r"\['scale'\] is NaN, which is not a finite"),
    "site_scale_inf": (_site(scale=PLACEHOLDER), "Infinity", JSON_SITE + r"\['scale'\] is Infinity"),
    "site_scale_zero": (_site(scale=0.0), r"\.scale must be a finite number > 0"),
    "site_scale_negative": (_site(scale=-0.5), r"\.scale must be a finite number > 0"),
    "site_scale_float32_overflow": (_site(scale=1e39), r"\.scale must be a finite number > 0 \(as float32\)"),
    # weight and class-feature scale tensors
    "weight_scale_nan": (_tensor(f"{W}.w_scale", 3, math.nan), rf"tensors\['{W}.w_scale'\] must hold finite scales"),
    "weight_scale_inf": (_tensor(f"{W}.w_scale", 0, math.inf), r"w_scale'\] must hold finite scales > 0"),
    "weight_scale_zero": (_tensor(f"{W}.w_scale", 5, 0.0), r"holds 0.0 at index 5"),
    "weight_scale_negative": (_tensor(f"{W}.w_scale", 1, -0.01), r"w_scale'\] must hold finite scales > 0"),
    "text_scale_nan": (_tensor("text.features_scale", 2, math.nan), r"tensors\['text.features_scale'\]"),
    # zero points: outside uint8, and outside the 4-bit grid while inside uint8
    "zero_point_1000": (_site(zero_point=1000), r"\.zero_point must be an integer >= 0 and <= 255, got 1000"),
    "zero_point_outside_4bit_grid": (_site(zero_point=16), r"\.zero_point must be an integer in \[0, 15\]"),
    "zero_point_negative": (_site(zero_point=-1), r"\.zero_point must be an integer"),
    # the string "false" (bool("false") is True)
    "signed_string_false": (_site(signed="false"), r"\.signed must be false .* got 'false'"),
    "signed_true": (_site(signed=True), r"\.signed must be false"),
    # embeddings and LayerNorm parameters
    "pos_embedding_inf": (
        _tensor("visual.positional_embedding", 7, math.inf),
        r"tensors\['visual.positional_embedding'\] must be finite, holds inf",
    ),
    "class_embedding_nan": (_tensor("visual.class_embedding", 0, math.nan), r"visual.class_embedding'\] must be fin"),
    "ln_weight_nan": (_tensor("visual.blocks.1.ln_2.weight", 0, math.nan), r"visual.blocks.1.ln_2.weight"),
    # class features: NaN logit scale (NaN probabilities), a negative one (inverted ranking)
    "logit_scale_nan": (_field("classes", logit_scale=PLACEHOLDER), "NaN", r"\['classes'\]\['logit_scale'\] is NaN"),
    "logit_scale_negative": (_field("classes", logit_scale=-14.0), r"classes.logit_scale must be a finite number"),
    # preprocessing that disagrees with the tower, or cannot normalise
    "preprocess_size_33": (
        _field("preprocess", size=[33, 33]),
        r"preprocess.size \[33, 33\] must equal vision.image_size \[32, 32\]",
    ),
    "preprocess_size_20000": (_field("preprocess", size=20000), r"preprocess.size"),
    "preprocess_std_zero": (_field("preprocess", std=[0.0, 0.0, 0.0]), r"preprocess.std must be a list of three"),
    "preprocess_mean_nan": (_field("preprocess", mean=[PLACEHOLDER, 0.5, 0.5]), "NaN", r"\['mean'\]\[0\] is NaN"),
    "preprocess_mean_out_of_range": (_field("preprocess", mean=[2.0, 0.5, 0.5]), r"preprocess.mean must be"),
    # counts and sizes bounded by what is stored
    "vision_layers_1e8": (_field("vision", layers=10**8), r"vision.layers must be an integer >= 1 and <= 4096"),
    "vision_layers_1000": (_field("vision", layers=1000), r"vision.layers is 1000, but the artifact stores only"),
}


@pytest.mark.parametrize("case", sorted(LIES))
def test_artifacts_that_lied_are_refused_naming_the_field(base, tmp_path, case):
    mutate, *literal, message = LIES[case]
    path = saved(tmp_path, mutated(base, mutate), *literal)
    if literal:
        with pytest.raises(ArtifactError, match=message):
            load(path)  # no JSON parser may accept NaN/Infinity silently
        return
    load(path)  # the checksums are fine: the container is intact
    t0 = time.process_time()
    with pytest.raises(ArtifactError, match=message):
        Engine.load(path)
    assert time.process_time() - t0 < 5.0  # vision.layers = 10**8 used to build set(range(10**8))


def test_the_untouched_artifact_still_loads(base, tmp_path):
    path = saved(tmp_path, mutated(base, lambda man, t: None))
    eng = Engine.load(path)
    assert torch.isfinite(eng.logits(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))).all()


# ------------------------------------------------------------------ strict types
STRICT = {
    "site_bits_4.9": (_site(bits=4.9), r"\.bits must be a supported bit width .* got 4.9"),
    "site_bits_string": (_site(bits="4"), r"\.bits must be a supported bit width .* got '4'"),
    "site_bits_true": (_site(bits=True), r"\.bits must be a supported bit width"),
    "site_bits_4.0": (_site(bits=4.0), r"\.bits must be a supported bit width"),
    "weight_bits_string": (
        lambda man, t: man["linears"][W].update(weight_bits="4"),
        rf"linears\['{W}'\].weight_bits must be a supported bit width",
    ),
    "layout_bits_float": (
        lambda man, t: man["tensors"][f"{W}.w.p0"]["layout"].update(bits=4.0),
        rf"tensors\['{W}.w.p0'\].layout.bits must be a supported bit width",
    ),
    "zero_point_float": (_site(zero_point=7.0), r"\.zero_point must be an integer"),
    "bias_string": (lambda man, t: man["linears"][W].update(bias="true"), r"\.bias must be true or false"),
    "ln_pre_int": (_field("vision", ln_pre=1), r"vision.ln_pre must be true or false"),
    "logit_scale_string": (_field("classes", logit_scale="14.3"), r"classes.logit_scale must be a finite number"),
    "unknown_site_field": (_site(per_channel=True), r"\.per_channel is not a field of this format"),
    "unknown_top_level_field": (lambda man, t: man.update(prompt="a photo"), r"prompt is not a field of this format"),
    "class_name_not_a_string": (
        lambda man, t: man["classes"]["names"].__setitem__(2, 7),
        r"classes.names\[2\] must be a string",
    ),
    "layer_table_entry_int": (lambda man, t: man["linears"].update({W: 5}), rf"linears\['{W}'\] must be a JSON obj"),
    "unknown_layer": (
        lambda man, t: man["linears"].update({"visual.extra": dict(man["linears"][W])}),
        r"linears\['visual.extra'\] is not a layer of this model",
    ),
    "interpolation_unknown": (_field("preprocess", interpolation="lanczos"), r"preprocess.interpolation must be one"),
    "resize_mode_unknown": (_field("preprocess", resize_mode="crop"), r"preprocess.resize_mode must be one of"),
    "text_bits_disagree": (_field("classes", text_bits=4), r"classes.text_bits is 4, the class features' layout"),
}


@pytest.mark.parametrize("case", sorted(STRICT))
def test_strict_types_and_known_fields(base, tmp_path, case):
    mutate, message = STRICT[case]
    with pytest.raises(ArtifactError, match=message):
        Engine.load(saved(tmp_path, mutated(base, mutate)))


# ------------------------------------------------------------------ optional fields: valid and loaded
@pytest.mark.parametrize(
    "drop",
    [
        ("model",),
        ("classes", "text_bits"),
        ("classes", "dim"),
        ("vision", "mlp_width"),
        ("preprocess", "interpolation"),
        ("preprocess", "resize_mode"),
    ],
)
def test_optional_fields_may_be_absent(base, tmp_path, drop):
    def mutate(man, t):
        d = man
        for k in drop[:-1]:
            d = d[k]
        del d[drop[-1]]

    eng = Engine.load(saved(tmp_path, mutated(base, mutate)))
    assert eng.classnames


# ------------------------------------------------------------------ the load-time self-test
def test_self_test_refuses_parameters_that_overflow_together(folded, tmp_path):
    """Every value finite and in range, but a LayerNorm gain of 3e38 overflows the (float) projection: NaN logits
    on every image. Only running an image finds it."""

    def mutate(man, t):
        t["visual.ln_post.weight"].fill_(3e38)

    art = mutated(load(folded("fp32", "full", adapter=False).path), mutate)
    validate_manifest(art.manifest, art.tensors)  # passes every field check
    with pytest.raises(ArtifactError, match=r"self-test: a synthetic image gets non-finite"):
        Engine.load(saved(tmp_path, art))


def test_engine_load_runs_the_self_test(base, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(Engine, "self_test", lambda self: calls.append(type(self).__name__))
    Engine.load(saved(tmp_path, mutated(base, lambda man, t: None)))
    assert calls == ["Engine"]


# ------------------------------------------------------------------ the JSON itself: raw headers
@pytest.fixture(scope="module")
def parts(folded) -> tuple[dict, str, bytes]:
    header, data = _split(folded("4-4-8", "full").path.read_bytes())
    return header, header["__metadata__"][MANIFEST_KEY], data


def _with_text(parts, edit: Callable[[str], str]) -> bytes:
    header, text, data = parts
    new = edit(text)
    assert new != text
    return _join(json.dumps(_header_with_manifest_text(header, new)), data)


#: (text replaced, replacement, expected message): the first occurrence in the manifest JSON is edited.
RAW = {
    # OverflowError escaped: Infinity as site bits / zero point
    "bits_infinity": ('"bits": 4', '"bits": Infinity', r"\['bits'\] is Infinity, which is not a finite number"),
    "zero_point_infinity": (
        '"zero_point": ',
        '"zero_point": -Infinity, "x": ',
        r"\['zero_point'\] is -Infinity, which is not a finite",
    ),
    "nan_literal": ('"logit_scale": ', '"logit_scale": NaN, "y": ', r"\['classes'\]\['logit_scale'\] is NaN"),
    "float_overflow": ('"logit_scale": ', '"logit_scale": 1e400, "y": ', r"\['classes'\]\['logit_scale'\] is 1e400"),
    "huge_integer": ('"width": 64', '"width": 1' + "0" * 4000, r"integer literal of 4001 digits"),
    "huge_integer_beyond_the_digit_limit": ('"width": 64', '"width": 1' + "0" * 5000, r"integer literal of 5001"),
    # last-one-wins duplicates, which the safetensors library itself rejects
    "duplicate_manifest_key": (
        '"logit_scale": ',
        '"logit_scale": 1.0, "logit_scale": ',
        r"corrupt manifest: duplicate key 'logit_scale'",
    ),
    # UnicodeEncodeError escaped: a lone surrogate in a class name (escaped in the manifest JSON)
    "lone_surrogate_class_name": (
        '"class 3"',
        '"class \\ud800"',
        r"the string at \['classes'\]\['names'\]\[3\] holds a lone surrogate",
    ),
    "lone_surrogate_key": ('"model": {', '"model": {"\\udfff": 1, ', r"a key at \['model'\] holds a lone surrogate"),
}


@pytest.mark.parametrize("case", sorted(RAW))
def test_hostile_manifest_json(parts, tmp_path, case):
    old, new, message = RAW[case]
    path = tmp_path / "raw.p4q"
    path.write_bytes(_with_text(parts, lambda text: text.replace(old, new, 1)))
    with pytest.raises(ArtifactError, match=message):
        Engine.load(path)


def test_lone_surrogate_in_the_manifest_text_itself(parts, tmp_path):
    """A ``\\ud800`` escape in the *header* JSON puts a lone surrogate into the manifest string: its sha256 could not
    even be computed (UnicodeEncodeError escaped)."""
    header, text, data = parts
    hdr = json.dumps(_header_with_manifest_text(header, text.replace('"class 3"', '"class \ud800"', 1)))
    assert "\\ud800" in hdr
    path = tmp_path / "raw.p4q"
    path.write_bytes(_join(hdr, data))
    with pytest.raises(ArtifactError, match=r"corrupt header: the string at .* holds a lone surrogate"):
        Engine.load(path)


def test_duplicate_header_key(parts, tmp_path):
    header, text, data = parts
    hdr = json.dumps(header)
    name = next(k for k in header if k != "__metadata__")
    entry = json.dumps(header[name])
    dup = hdr.replace(f'"{name}": {entry}', f'"{name}": {entry}, "{name}": {entry}', 1)
    assert dup != hdr
    path = tmp_path / "raw.p4q"
    path.write_bytes(_join(dup, data))
    with pytest.raises(ArtifactError, match=rf"corrupt header: duplicate key '{name}'"):
        load(path)


@pytest.mark.parametrize("shape", [[0, 2**64], [0, 2**63 - 1, 4], [2**70]])
def test_absurd_empty_tensor_shapes(parts, tmp_path, shape):
    """``[0, 2**64]`` holds no bytes, so the byte count matched; building it raised TypeError/RuntimeError."""
    header, text, data = parts
    man = json.loads(text)
    header = dict(header)
    header["ghost"] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data)]}
    man["tensors"]["ghost"] = {
        "dtype": "F32",
        "shape": shape,
        "sha256": hashlib.sha256(b"").hexdigest(),
        "layout": {"kind": "plain"},
    }
    path = tmp_path / "raw.p4q"
    path.write_bytes(_join(json.dumps(_header_with_manifest_text(header, json.dumps(man, sort_keys=True))), data))
    with pytest.raises(ArtifactError, match=r"tensor 'ghost': (malformed shape|shape .* is too large)"):
        Engine.load(path)


# ------------------------------------------------------------------ what the loader reads
def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.p4q"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(ArtifactError, match="not a regular file"):
        load(fifo)  # used to block forever waiting for a writer
    assert time.monotonic() - t0 < 5.0


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_character_device_is_refused():
    with pytest.raises(ArtifactError, match="not a regular file"):
        load("/dev/zero")  # used to grow without bound


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io to count bytes read")
@pytest.mark.parametrize("prefix", [b"", struct.pack("<Q", 0), struct.pack("<Q", 16) + b'{"a":1}' + b" " * 9])
def test_big_file_of_zeros_is_refused_from_its_header(tmp_path, prefix):
    """A sparse 1 GiB file (no disk used): the header check must refuse it after reading a few bytes, not the whole
    file (a 4.5 GiB one took 32 s and 5 GB of memory). Counted in bytes read, not time."""
    path = tmp_path / "zeros.p4q"
    with open(path, "wb") as f:
        f.write(prefix)
        f.truncate(1 << 30)
    before = _bytes_read()
    with pytest.raises(ArtifactError, match="corrupt|truncated|no manifest"):
        load(path)
    assert _bytes_read() - before < 1 << 20


def test_body_is_not_read_when_the_header_already_fails(parts, tmp_path):
    """Offsets promising more data than the file holds: refused from the header, before reading the data."""
    header, text, data = parts
    path = tmp_path / "short.p4q"
    path.write_bytes(_join(json.dumps(header), data[: len(data) // 2]))
    before = _bytes_read() if Path("/proc/self/io").exists() else None
    with pytest.raises(ArtifactError, match="truncated"):
        load(path)
    if before is not None:
        assert _bytes_read() - before < 8 + len(json.dumps(header)) + 4096


def test_schema_validation_is_fast(base):
    """Milliseconds for a manifest, so loading stays dominated by reading the tensors."""
    t0 = time.process_time()
    for _ in range(20):
        spec = validate_manifest(base.manifest, base.tensors)
    assert isinstance(spec, ManifestSpec)
    assert (time.process_time() - t0) / 20 < 0.5


def test_huge_but_finite_values_are_not_called_non_finite(base):
    """The finiteness check's fast path (a float32 sum) overflows on two 3e38 values: it must fall back to the exact
    check instead of refusing finite values."""
    art = mutated(base, lambda man, t: t["visual.class_embedding"][:2].fill_(3e38))
    validate_manifest(art.manifest, art.tensors)
    art.tensors["visual.class_embedding"][5] = math.inf
    with pytest.raises(ArtifactError, match=r"visual.class_embedding'\] must be finite, holds inf at index 5"):
        validate_manifest(art.manifest, art.tensors)
