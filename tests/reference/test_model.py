"""The committed P4Q-Ref-Tiny checkpoint: loads, is a stock open_clip CLIP, and is accurate zero-shot."""

import json

import pytest
import torch
import torch.nn.functional as F

from p4q_engine.data.reference import REFERENCE_CLASSNAMES, REFERENCE_TEMPLATES, normalize_uint8, render_tensor_batch
from p4q_engine.errors import ModelLoadError
from p4q_engine.reference.model import (
    DEFAULT_CHECKPOINT,
    DEFAULT_METRICS,
    REFERENCE_MODEL_NAME,
    load_reference_model,
    register_reference_config,
)


@pytest.fixture(scope="module")
def loaded():
    return load_reference_model()


def test_checkpoint_committed_and_small():
    assert DEFAULT_CHECKPOINT.is_file() and DEFAULT_CHECKPOINT.stat().st_size <= 16 * 2**20
    meta = json.loads(DEFAULT_METRICS.read_text())
    assert 50.0 <= meta["test_top1"] <= 90.0


def test_registered_config_builds_through_open_clip():
    import open_clip
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    register_reference_config()
    register_reference_config()  # idempotent
    assert REFERENCE_MODEL_NAME in open_clip.list_models()
    m = open_clip.create_model(REFERENCE_MODEL_NAME, pretrained=None)
    assert isinstance(m, open_clip.CLIP) and isinstance(m.visual, VisionTransformer)
    assert isinstance(m.transformer.resblocks[0], ResidualAttentionBlock)
    assert isinstance(m.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    assert isinstance(m.visual.transformer.resblocks[0], ResidualAttentionBlock)
    assert getattr(m.visual, "attn_pool", None) is None
    assert m.text_pool_type == "argmax"
    assert sum(p.numel() for p in m.parameters()) < 10_000_000


def test_load_shapes(loaded):
    model, preprocess, tok = loaded
    assert not model.training
    assert model.context_length == tok.context_length
    assert model.vocab_size == tok.vocab_size
    from p4q_engine.data.reference import render

    x = preprocess(render(0, "test")[0])[None]
    img = model.encode_image(x)
    txt = model.encode_text(tok(["a red circle.", "a blue star."]))
    assert img.shape == (1, 128) and txt.shape == (2, 128)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()


@torch.no_grad()
def test_zero_shot_held_out_smoke(loaded):
    model, _, tok = loaded
    texts = [t.format(c) for c in REFERENCE_CLASSNAMES for t in REFERENCE_TEMPLATES]
    f = F.normalize(model.encode_text(tok(texts)), dim=-1).view(100, len(REFERENCE_TEMPLATES), -1)
    cls = F.normalize(f.mean(1), dim=-1)
    x, y, _ = render_tensor_batch("test", 0, 200)
    pred = (F.normalize(model.encode_image(normalize_uint8(x)), dim=-1) @ cls.T).argmax(1)
    acc = (pred == y).float().mean().item()
    assert acc > 0.40, acc


def test_missing_and_corrupt_checkpoints_raise(tmp_path):
    with pytest.raises(ModelLoadError):
        load_reference_model(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelLoadError):
        load_reference_model(bad)
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    save_file({"foo": torch.zeros(2)}, str(wrong))
    with pytest.raises(ModelLoadError):
        load_reference_model(wrong)
