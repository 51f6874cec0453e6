"""Shared fixtures: the embedded reference CLIP, PTQ-calibrated at 4-4-8 on one small batch, with small cached
feature sets (so every P4Q test runs in seconds on a CPU)."""

import pytest
import torch

from p4q_engine.clip.recipe import QuantRecipe
from p4q_engine.p4q.pipeline import Source, prepare
from p4q_engine.ptq import PTQSettings


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    import os

    os.environ["P4Q_CACHE"] = str(tmp_path_factory.mktemp("p4q_cache"))
    torch.manual_seed(0)
    src = Source(train_size=200, eval_size=100)
    return prepare(src, QuantRecipe("4-4-8"), PTQSettings(calib_batches=1, batch_size=64, progress=False))
