"""The load-time self-test is shared by both engines: ``from_artifact`` (what ``Engine.load`` runs after reading the
file) classifies one synthetic image and refuses non-finite outputs, on the CPU engine and on the kernel engine
(Triton interpreter in CI)."""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from p4q_engine.artifact.format import Artifact, ArtifactError, load
from p4q_engine.errors import ConfigError
from p4q_engine.runtime.engine import Engine


def _shared_fixtures():
    """tests/artifact/conftest.py (the module pytest already imported, if any, so session caches are shared)."""
    path = Path(__file__).resolve().parents[1] / "artifact" / "conftest.py"
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve() == path:
            return mod
    spec = importlib.util.spec_from_file_location("_p4q_tests_artifact_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


_fx = _shared_fixtures()
tiny_model_name, tiny_model, tiny_preprocess_cfg = _fx.tiny_model_name, _fx.tiny_model, _fx.tiny_preprocess_cfg
class_tokens, calib_images, quant_clip, folded = _fx.class_tokens, _fx.calib_images, _fx.quant_clip, _fx.folded
single_torch_thread = _fx.single_torch_thread


def _overflowing(folded) -> Artifact:
    """Every field in range, every value finite, yet a LayerNorm gain of 3e38 overflows the float projection."""
    art = load(folded("fp32", "full", adapter=False).path)
    tensors = dict(art.tensors)
    tensors["visual.ln_post.weight"] = torch.full_like(tensors["visual.ln_post.weight"], 3e38)
    return Artifact(copy.deepcopy(art.manifest), tensors)


def test_cpu_engine_self_test(folded):
    Engine.from_artifact(load(folded("fp32", "full", adapter=False).path))
    with pytest.raises(ArtifactError, match="self-test: a synthetic image gets non-finite image features"):
        Engine.from_artifact(_overflowing(folded))


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or the Triton interpreter",
)
def test_kernel_engine_self_test(folded):
    from p4q_engine.runtime.kernel_engine import KernelEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    KernelEngine.from_artifact(load(folded("fp32", "full", adapter=False).path), device)
    with pytest.raises(ArtifactError, match="self-test: a synthetic image gets non-finite"):
        KernelEngine.from_artifact(_overflowing(folded), device)


def test_self_test_failures_inside_the_forward_are_typed(folded, monkeypatch):
    """An exception the forward raises on this artifact (not on user input) is an ArtifactError, not a crash."""
    art = load(folded("fp32", "full", adapter=False).path)

    def broken(self, pixels):
        raise RuntimeError("shape mismatch deep inside")

    monkeypatch.setattr(Engine, "_forward", broken)
    with pytest.raises(ArtifactError, match="self-test: a synthetic image fails in this artifact: RuntimeError"):
        Engine.from_artifact(art)


@pytest.mark.parametrize("device", ["garbage", None, "cuda:x"])
def test_a_bad_device_is_a_config_error(folded, device):
    """``torch.device`` raised RuntimeError/TypeError straight out of ``Engine.load``."""
    with pytest.raises(ConfigError, match="device"):
        Engine.load(folded("fp32", "full", adapter=False).path, device=device)
