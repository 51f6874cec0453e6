"""One weight grid everywhere: the quantizer, the packed layout, both engines' unpacking and old artifacts."""

from __future__ import annotations

import copy

import pytest
import torch

from p4q_engine.artifact.format import Artifact, ArtifactError, load
from p4q_engine.errors import ConfigError
from p4q_engine.quant.quantizer import qparams_from_range, quantize
from p4q_engine.quant.spec import SIGNED_GRIDS, WEIGHT_GRID, QuantSpec, act_spec, weight_spec
from p4q_engine.runtime.engine import Engine, unpack_weight

PREFIX = "visual.blocks.0.mlp.c_fc"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grids(bits):
    full, restricted = QuantSpec(bits, True), QuantSpec(bits, True, narrow_range=True)
    q = (1 << (bits - 1)) - 1
    assert (full.qmin, full.qmax, full.grid) == (-q - 1, q, "full")
    assert (restricted.qmin, restricted.qmax, restricted.grid) == (-q, q, "restricted")
    assert full.storage_offset == restricted.storage_offset == q + 1  # the packed layout does not depend on the grid
    spec = weight_spec(bits)
    assert spec.grid == WEIGHT_GRID and spec.narrow_range == SIGNED_GRIDS[WEIGHT_GRID]
    assert act_spec(bits).grid == "unsigned" and act_spec(bits).storage_offset == 0
    with pytest.raises(ConfigError):
        QuantSpec(bits, False, narrow_range=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_clamps_at_the_grid(bits):
    """A range narrower than max|w| (what OMSE and percentile calibrate) reaches qmin on the full grid only."""
    w = torch.linspace(-2.0, 1.0, 301)[None]
    for narrow in (False, True):
        spec = QuantSpec(bits, True, per_channel=True, narrow_range=narrow)
        codes = quantize(w, qparams_from_range(torch.tensor([-1.0]), torch.tensor([1.0]), spec))
        assert int(codes.min()) == spec.qmin and int(codes.max()) == spec.qmax


def _with_layout(art: Artifact, prefix: str, **changes) -> Artifact:
    man = copy.deepcopy(art.manifest)
    for name, entry in man["tensors"].items():
        if name.startswith(f"{prefix}.w.p"):
            entry["layout"].update(changes)
            for k, v in changes.items():
                if v is None:
                    del entry["layout"][k]
    return Artifact(man, dict(art.tensors))


def test_artifact_records_the_grid(folded):
    art = load(folded("2-2-8", "full").path)
    layouts = [t["layout"] for t in art.manifest["tensors"].values() if t["layout"]["kind"] == "packed"]
    assert layouts and all(lay["grid"] == WEIGHT_GRID and lay["offset"] == 1 << (lay["bits"] - 1) for lay in layouts)


def test_old_artifact_without_grid_loads_as_full(folded):
    """Artifacts written before layouts named their grid hold the full grid: they load, with the same codes."""
    art = load(folded("2-2-8", "full").path)
    old = _with_layout(art, PREFIX, grid=None)
    assert "grid" not in old.layout(f"{PREFIX}.w.p0")
    codes, _ = unpack_weight(old, f"{PREFIX}.w")
    assert torch.equal(codes, unpack_weight(art, f"{PREFIX}.w")[0])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Engine(old).logits(x), Engine(art).logits(x))


def _with_min_code(art: Artifact, prefix: str) -> Artifact:
    """``art`` with one weight code of ``prefix`` set to the full grid's ``qmin`` (what a clipping range produces)."""
    from p4q_engine.artifact.bitpack import pack, to_unsigned

    codes, _ = unpack_weight(art, f"{prefix}.w")
    spec = QuantSpec(art.layout(f"{prefix}.w.p0")["bits"], True, per_channel=True)
    codes[0, 0] = spec.qmin
    tensors = dict(art.tensors)
    for i, plane in enumerate(pack(to_unsigned(codes, spec), spec.bits)):
        tensors[f"{prefix}.w.p{i}"] = plane
    return Artifact(art.manifest, tensors)


def test_codes_outside_the_declared_grid_are_refused(folded):
    art = _with_min_code(load(folded("2-2-8", "full").path), PREFIX)
    assert int(unpack_weight(art, f"{PREFIX}.w")[0].min()) == -2  # legal on the full grid
    Engine(art)
    with pytest.raises(ArtifactError, match=r"outside its restricted 2-bit grid \[-1, 1\]"):
        Engine(_with_layout(art, PREFIX, grid="restricted"))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"grid": "ternary"}, "unknown weight grid 'ternary'"),
        ({"offset": 1}, r"stored-code offset 1 is not 2"),
        ({"signed": False}, "packed weights must be signed"),
    ],
)
def test_bad_grid_layouts_are_refused(folded, changes, message):
    art = load(folded("2-2-8", "full").path)
    with pytest.raises(ArtifactError, match=message):
        Engine(_with_layout(art, PREFIX, **changes))
