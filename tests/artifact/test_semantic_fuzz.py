"""Semantic fuzzing of a real artifact's manifest (``test_fuzz.py`` mutates bytes; this mutates meaning).

Each case applies one to three mutations to the parsed manifest of a real folded artifact - a value of another type
(str/int/float/bool/list/dict/null), a number out of range (negative, zero, huge, ``NaN``/``Infinity`` literals,
digits beyond any integer type), a deleted or added key, a duplicated key (first or last wins), a deleted, added or
repeated list item, unicode (lone surrogates, very long strings, NUL, non-BMP) in values and keys, a value copied
from elsewhere in the manifest - then writes it back with a *correct* manifest checksum, so the checksum cannot
refuse it trivially. The oracle: ``Engine.load`` either loads it and classifies a fixed image to finite logits (and
``p4q inspect``'s summary prints it), or raises exactly :class:`ArtifactError` with a message - never another
exception type, never a hang (a per-case wall-clock alarm and CPU-time bound).

A fixed seed and a fixed number of cases: the same manifests every run, ~20 s on one core.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from p4q_engine.artifact.format import MANIFEST_KEY, ArtifactError, load
from p4q_engine.artifact.inspect import summarize
from p4q_engine.runtime.engine import Engine

SEED = 13
CASES = 300
CASE_WALL_S = 30  # alarm: a case still running after this is a hang
CASE_CPU_S = 10.0  # a correct load of this 0.1 MB artifact takes ~0.05 s


class Raw:
    """A JSON literal written verbatim (``NaN``, ``1e400``, a 5000-digit integer)."""

    def __init__(self, text: str) -> None:
        self.text = text


class Dup:
    """A JSON object written with a repeated key: ``pairs`` in order, duplicates included."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs


def dump(v: Any) -> str:
    """JSON text of ``v`` with :class:`Raw` literals and :class:`Dup` objects (``json.dumps`` for the rest)."""
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, Dup):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(x)}" for k, x in v.pairs) + "}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(dump(x) for x in v) + "]"
    return json.dumps(v)  # ensure_ascii: a lone surrogate becomes a \\udXXX escape, as a hostile writer would emit


TYPE_SWAPS: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    4,
    4.9,
    1e-3,
    "4",
    "false",
    "",
    "RGB",
    [],
    {},
    [1, 2],
    [32, 32],
    {"a": 1},
    [None],
    {"bits": 4},
]
NUMBERS: list[Any] = [
    0,
    -1,
    -0.0,
    1,
    2,
    3,
    5,
    7,
    8,
    15,
    16,
    255,
    256,
    1000,
    2**31,
    2**63,
    2**64,
    -(2**63),
    10**30,
    1e-45,
    1e-300,
    1e300,
    3.5e38,
    0.5,
    -14.0,
    1e39,
    Raw("NaN"),
    Raw("Infinity"),
    Raw("-Infinity"),
    Raw("1e400"),
    Raw("-1e400"),
    Raw("1" + "0" * 60),
    Raw("9" * 5000),
]
STRINGS: list[Any] = [
    "\ud800",
    "a\udfffb",
    "x" * 100_000,
    "\x00",
    "\U0001f600 cat",
    "\u202eevil",
    "   ",
    "",
    "class 0",
    "visual.blocks.0.attn.q",
    "bicubic",
    "squash",
    "tok",
    "quick_gelu",
    "full",
]


def nodes(v: Any, path: tuple = ()) -> list[tuple]:
    """Paths to every value inside ``v`` (dict keys and list indices), ``v`` itself included."""
    out = [path]
    if isinstance(v, dict):
        for k, x in v.items():
            out += nodes(x, path + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += nodes(x, path + (i,))
    return out


def get(root: Any, path: tuple) -> Any:
    for k in path:
        root = root[k]
    return root


def pick_path(rng: random.Random, man: dict) -> tuple:
    """A node under a random top-level section (uniform over sections, so the big tensor table does not drown the
    small configs), or a whole section."""
    envelope = ("format", "format_version")  # checked first by the container: rarely worth a case
    sections = sorted(k for k in man if k not in envelope)
    if not sections or rng.random() > 0.97:
        sections = sorted(man)
    section = rng.choice(sections)
    paths = nodes(man[section], (section,))
    return rng.choice(paths) if rng.random() < 0.9 else (section,)


def mutate(rng: random.Random, man: dict, tries: int = 50) -> str:
    """Apply one mutation to ``man`` in place; returns what it did (for the failure message)."""
    if not man or not tries:
        return "nothing"
    path = pick_path(rng, man)
    parent, key = (get(man, path[:-1]), path[-1]) if path else (None, None)
    value = get(man, path)
    op = rng.choice(
        ["type", "range", "range", "delete", "add_key", "dup_key", "unicode", "unicode_key", "list", "copy"]
    )
    if op == "type" and parent is not None:
        parent[key] = rng.choice(TYPE_SWAPS)
    elif op == "range" and parent is not None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and rng.random() < 0.4:
            parent[key] = rng.choice([value + 1, value - 1, -value, value * 2, value * 1000, value / 3])
        else:
            parent[key] = rng.choice(NUMBERS)
    elif op == "delete" and isinstance(parent, dict):
        del parent[key]
    elif op == "delete" and isinstance(parent, list):
        parent.pop(key)
    elif op == "add_key" and isinstance(value, dict):
        value[rng.choice(["extra", "bits", "scale", "signed", "names", "layers", "\ud800", "x" * 5000])] = rng.choice(
            TYPE_SWAPS + NUMBERS[:8]
        )
    elif op == "dup_key" and isinstance(value, dict) and value and parent is not None:
        k = rng.choice(list(value))
        other = rng.choice(TYPE_SWAPS + NUMBERS + [value[k]])
        pairs = list(value.items())
        pairs.insert(rng.randrange(len(pairs) + 1), (k, other))
        parent[key] = Dup(pairs)
    elif op == "unicode" and parent is not None:
        parent[key] = rng.choice(STRINGS)
    elif op == "unicode_key" and isinstance(parent, dict):
        parent[rng.choice(STRINGS[:6]) + str(key)[: rng.choice([0, 3, 1000])]] = parent.pop(key)
    elif op == "list" and isinstance(value, list):
        if value and rng.random() < 0.5:
            value.append(value[rng.randrange(len(value))])
        elif value:
            value.pop(rng.randrange(len(value)))
        else:
            value.append(rng.choice(TYPE_SWAPS))
    elif op == "copy" and parent is not None:
        donor = get(man, pick_path(rng, man))
        parent[key] = json.loads(json.dumps(donor)) if not isinstance(donor, (Raw, Dup)) else donor
    else:
        return mutate(rng, man, tries - 1)  # the op does not apply to this node: draw again
    return f"{op} at {path!r}"[:200]


def artifact_bytes(header: dict, text: str, data: bytes) -> bytes:
    """The file with ``text`` as its manifest and a correct manifest checksum."""
    header = dict(header)
    sha = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    header["__metadata__"] = {MANIFEST_KEY: text, MANIFEST_KEY + "_sha256": sha}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def check_case(path: Path, blob: bytes, pixels: torch.Tensor) -> str:
    """The oracle; returns ``"loaded"`` or the ArtifactError message; raises on anything else."""
    path.write_bytes(blob)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_WALL_S)
    t0 = time.process_time()
    try:
        eng = Engine.load(path)
        logits = eng.logits(pixels)
        assert torch.isfinite(logits).all(), "a loaded artifact gives non-finite logits"
        assert all(isinstance(c, str) and c.encode() for c in eng.classnames)
        summarize(load(path), eng.manifest_spec)  # p4q inspect prints every artifact the engine loads
        return "loaded"
    except ArtifactError as e:
        msg = str(e)
        assert msg and msg.encode("utf-8"), "ArtifactError without a printable message"
        return msg
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        assert time.process_time() - t0 < CASE_CPU_S, "a case took too much CPU"


@pytest.fixture(scope="module")
def parts(folded) -> tuple[dict, dict, bytes]:
    blob = folded("3-3-8", "full").path.read_bytes()  # QAdapter, 2-plane 3-bit weights, every site quantized
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    return header, json.loads(header["__metadata__"][MANIFEST_KEY]), blob[8 + n :]


def test_untouched_manifest_round_trips(parts, tmp_path):
    header, man, data = parts
    pixels = torch.zeros(1, 3, 32, 32)
    assert check_case(tmp_path / "orig.p4q", artifact_bytes(header, dump(man), data), pixels) == "loaded"


def test_semantic_fuzz(parts, tmp_path):
    header, man, data = parts
    rng = random.Random(SEED)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(SEED))
    outcomes: dict[str, int] = {}
    for case in range(CASES):
        m = json.loads(json.dumps(man))
        what = [mutate(rng, m) for _ in range(rng.choice([1, 1, 2, 3]))]
        try:
            text = dump(m)
        except (ValueError, TypeError):  # a non-string dict key cannot be written as JSON: not a case
            continue
        try:
            result = check_case(tmp_path / "case.p4q", artifact_bytes(header, text, data), pixels)
        except Hang:
            pytest.fail(f"case {case} ({what}): Engine.load did not finish within {CASE_WALL_S} s")
        except Exception as e:  # noqa: BLE001 - anything but ArtifactError escaping is the bug looked for
            pytest.fail(f"case {case} ({what}): {type(e).__name__} escaped (expected ArtifactError): {e}"[:2000])
        kind = "loaded" if result == "loaded" else "refused"
        outcomes[kind] = outcomes.get(kind, 0) + 1
        outcomes["checksum"] = outcomes.get("checksum", 0) + ("manifest sha256 mismatch" in result)
    # the fuzzer exercised both sides, and the manifest checksum refused nothing (it was always correct)
    assert outcomes.get("refused", 0) >= CASES // 2 and outcomes.get("loaded", 0) >= 5, outcomes
    assert outcomes["checksum"] == 0, outcomes
