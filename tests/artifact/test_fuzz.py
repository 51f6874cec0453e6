"""Fuzzing a real folded artifact: whatever happens to its bytes, ``Engine.load`` either loads the untouched file
or raises :class:`ArtifactError` - never another exception, never a silently different model. Plus manifests that
are semantically wrong but carry valid checksums: ``Engine(...)`` must refuse them with :class:`ArtifactError`.

Hypothesis runs derandomized (the same examples on every run) with no example database, ~150 examples in all.
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p4q_engine.artifact.format import Artifact, ArtifactError, load, save
from p4q_engine.runtime.engine import Engine

FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def header_len(artifact_bytes) -> int:
    return 8 + struct.unpack("<Q", artifact_bytes[:8])[0]


def check_load(path: Path, mutated: bytes, original: bytes) -> None:
    """The fuzz oracle."""
    path.write_bytes(mutated)
    try:
        eng = Engine.load(path)
    except ArtifactError as e:
        assert mutated != original, f"the untouched artifact was refused: {e}"
        assert str(e), "ArtifactError without a message"
        return
    except Exception as e:  # noqa: BLE001 - anything else escaping is the bug this test looks for
        pytest.fail(f"{type(e).__name__} escaped Engine.load (expected ArtifactError): {e}")
    assert mutated == original, "a modified artifact was loaded without complaint"
    assert eng.classnames


def test_original_loads(artifact_path, artifact_bytes, fuzz_dir):
    check_load(fuzz_dir / "orig.p4q", artifact_bytes, artifact_bytes)


def positions(blob_len: int, header_len: int):
    """Uniform over the file, or over the 8-byte prefix + header (where structure lives)."""
    return st.one_of(st.integers(0, blob_len - 1), st.integers(0, header_len - 1))


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_byte_flips(artifact_bytes, header_len, fuzz_dir, data):
    flips = data.draw(
        st.lists(st.tuples(positions(len(artifact_bytes), header_len), st.integers(1, 255)), min_size=1, max_size=4)
    )
    blob = bytearray(artifact_bytes)
    for pos, mask in flips:
        blob[pos] ^= mask
    check_load(fuzz_dir / "flip.p4q", bytes(blob), artifact_bytes)


@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_truncations(artifact_bytes, header_len, fuzz_dir, data):
    cut = data.draw(positions(len(artifact_bytes), header_len))
    check_load(fuzz_dir / "cut.p4q", artifact_bytes[:cut], artifact_bytes)


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_insertions_and_deletions(artifact_bytes, header_len, fuzz_dir, data):
    edges = [0, 8, header_len, len(artifact_bytes)]  # before/after the length prefix, the header, the data
    pos = data.draw(st.one_of(st.integers(0, len(artifact_bytes)), st.integers(0, header_len), st.sampled_from(edges)))
    if data.draw(st.booleans()):
        ins = data.draw(st.binary(min_size=1, max_size=16))
        blob = artifact_bytes[:pos] + ins + artifact_bytes[pos:]
    else:
        n = data.draw(st.integers(1, 16))
        blob = artifact_bytes[:pos] + artifact_bytes[pos + n :]
    check_load(fuzz_dir / "indel.p4q", blob, artifact_bytes)


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_header_overwrites(artifact_bytes, header_len, fuzz_dir, data):
    """Overwrite bytes of the header JSON with JSON-ish characters (more likely to stay parseable) or raw bytes."""
    pos = data.draw(st.integers(8, header_len - 1))
    chars = st.one_of(
        st.binary(min_size=1, max_size=8),
        st.text(alphabet='{}[]":,0123456789 \t\n\\-.eEtrufalsn', min_size=1, max_size=8).map(str.encode),
    )
    new = data.draw(chars)[: header_len - pos]
    blob = artifact_bytes[:pos] + new + artifact_bytes[pos + len(new) :]
    assert len(blob) == len(artifact_bytes)
    check_load(fuzz_dir / "over.p4q", blob, artifact_bytes)


# ------------------------------------------------------------------ semantic corruption, checksums intact
def _set_layout(key: str, **kv):
    def mutate(man, tensors):
        for name, desc in man["tensors"].items():
            if name.startswith(key + ".p"):
                desc["layout"].update(kv)

    return mutate


def _del(path: tuple, where: str = "man"):
    def mutate(man, tensors):
        d = man if where == "man" else tensors
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]

    return mutate


def _set(path: tuple, value):
    def mutate(man, tensors):
        d = man
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return mutate


FC = "visual.blocks.0.mlp.c_fc"
SEMANTIC = {
    "in_features_disagree": _set(("linears", FC, "in_features"), 63),
    "out_features_disagree": _set(("linears", FC, "out_features"), 255),
    "packed_bits_5": _set_layout(FC + ".w", bits=5),
    "packed_bits_8_with_3bit_planes": _set_layout(FC + ".w", bits=8),
    "plane_list_too_short": _set_layout(FC + ".w", planes=[2]),
    "logical_shape_wrong": _set_layout(FC + ".w", logical_shape=[256, 65]),
    "weight_bits_disagree": _set(("linears", FC, "weight_bits"), 4),
    "missing_vision": _del(("vision",)),
    "vision_layers_too_many": _set(("vision", "layers"), 3),
    "vision_layers_negative": _set(("vision", "layers"), -1),
    "vision_layers_not_int": _set(("vision", "layers"), "two"),
    "unknown_activation": _set(("vision", "act"), "swish"),
    "grid_disagrees_with_pos_embedding": _set(("vision", "grid_size"), [5, 5]),
    "vision_layers_too_few": _set(("vision", "layers"), 1),
    "vision_layers_zero": _set(("vision", "layers"), 0),
    "vision_heads_not_dividing_width": _set(("vision", "heads"), 3),
    "vision_heads_zero": _set(("vision", "heads"), 0),
    "vision_width_disagrees": _set(("vision", "width"), 32),
    "vision_patch_does_not_tile_image": _set(("vision", "patch_size"), [7, 7]),
    "vision_unknown_pool_type": _set(("vision", "pool_type"), "none"),
    "vision_missing_heads": _del(("vision", "heads")),
    "missing_site": _del(("sites", "visual.blocks.0.attn.q")),
    "site_bits_5": _set(("sites", FC + ".in", "bits"), 5),
    "site_not_a_dict": _set(("sites", FC + ".in"), [8, False]),
    "linears_not_a_table": _set(("linears",), []),
    "missing_linear": _del(("linears", "visual.blocks.1.attn.out_proj")),
    "missing_adapter_linear": _del(("linears", "adapter.fc1")),
    "missing_adapter_site": _del(("sites", "adapter.in")),
    "class_names_short": _set(("classes", "names"), ["only one"]),
    "class_names_missing": _del(("classes", "names")),
    "text_features_plain": _set_layout("text.features", kind="plain"),
    "preprocess_empty": _set(("preprocess",), {}),
    "missing_block_tensor": _del(("visual.blocks.1.ln_1.weight",), where="tensors"),
    "missing_plane_tensor": _del((FC + ".w.p1",), where="tensors"),
    "missing_scale_tensor": _del((FC + ".w_scale",), where="tensors"),
}


@pytest.mark.parametrize("case", sorted(SEMANTIC))
def test_semantic_corruption_raises_artifact_error(artifact_path, case):
    art = load(artifact_path)
    man, tensors = copy.deepcopy(art.manifest), dict(art.tensors)
    SEMANTIC[case](man, tensors)
    try:
        Engine(Artifact(man, tensors))
    except ArtifactError as e:
        assert str(e)
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{case}: {type(e).__name__} escaped Engine(...) (expected ArtifactError): {e}")
    pytest.fail(f"{case}: the inconsistent artifact was accepted")


@pytest.mark.parametrize("case", ["in_features_disagree", "packed_bits_5", "vision_layers_too_many", "missing_vision"])
def test_semantic_corruption_survives_save_and_is_caught_on_load(artifact_path, tmp_path, case):
    """The same corruptions written through ``save`` (valid checksums): the file loads, the engine refuses it."""
    art = load(artifact_path)
    man, tensors = copy.deepcopy(art.manifest), dict(art.tensors)
    SEMANTIC[case](man, tensors)
    path = tmp_path / "bad.p4q"
    save(Artifact(man, tensors), path)
    load(path)  # checksums are fine
    with pytest.raises(ArtifactError):
        Engine.load(path)


def test_well_formed_artifact_still_builds(artifact_path):
    eng = Engine(load(artifact_path))
    assert eng.classnames and eng.text.shape[0] == len(eng.classnames)
    assert torch.isfinite(eng.logits(torch.zeros(1, 3, 32, 32))).all()
