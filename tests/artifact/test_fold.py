"""Folding refuses what the engines cannot execute."""

import copy

import pytest
import torch

from p4q_engine.artifact.fold import fold
from p4q_engine.errors import ConfigError


def test_fold_rejects_unsupported_pool_type(quant_clip, tiny_preprocess_cfg):
    q = copy.deepcopy(quant_clip("4-4-8"))
    q.visual.pool_type = "none"
    d = q.image_proj.out_features
    with pytest.raises(ConfigError, match="pool_type"):
        fold(q, torch.randn(3, d), ["a", "b", "c"], {"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3})


def test_fold_accepts_token_pooling(quant_clip):
    q = quant_clip("4-4-8")
    d = q.image_proj.out_features
    art = fold(q, torch.randn(3, d), ["a", "b", "c"], {"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3})
    assert art.manifest["vision"]["pool_type"] in ("tok", "avg")


def test_adapter_fc1_reads_the_adapter_input_site(folded):
    """The QAdapter's fc1 multiplies z_hat = in_quant(z): its own input quantizer is off, so the fold must give it
    the adapter's input site, or the engine would multiply the unquantized z (a bug the divergence tracer found)."""
    art = folded("4-4-8", "full").artifact
    lin = art.manifest["linears"]
    assert lin["adapter.fc1"]["in_site"] == "adapter.in" and art.manifest["sites"]["adapter.in"] is not None
    assert lin["adapter.fc2"]["in_site"] is not None
