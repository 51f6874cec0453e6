"""The prompt learner: sequence assembly, gradient through the fake-quant text tower, bad configurations."""

import pytest
import torch

from p4q_engine.errors import ConfigError
from p4q_engine.p4q.prompt import PromptLearner

NAMES = ["red circle", "blue star", "white bar"]


def _learner(prepared, **kw):
    return PromptLearner(prepared.student, prepared.loaded.tokenizer, NAMES, **kw)


def test_phrase_init_reproduces_the_hand_written_prompt(prepared):
    """Context initialised from "a photo of a" + class at the end = the template "a photo of a {}." exactly."""
    q, tok = prepared.student, prepared.loaded.tokenizer
    pl = _learner(prepared, ctx_init="a photo of a")
    assert pl.n_ctx == 4
    with torch.no_grad():
        got = pl(q)
        want = q.encode_text(tok([f"a photo of a {n}." for n in NAMES]), normalize=True)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_context_positions(prepared, position):
    pl = _learner(prepared, n_ctx=4, class_position=position)
    tok = prepared.loaded.tokenizer
    name_ids = tok(["red circle"])[0, 1:3].tolist()
    row = pl.tokens[0].tolist()
    pos = pl.ctx_positions[0].tolist()
    assert len(pos) == 4 and row[0] == tok.sot_token_id
    non_ctx = [t for i, t in enumerate(row) if i not in pos and t != 0]
    assert non_ctx[1:3] == name_ids and non_ctx[-1] == tok.eot_token_id
    first_name = row.index(name_ids[0])
    if position == "end":
        assert max(pos) < first_name
    elif position == "front":
        assert min(pos) > first_name
    else:
        assert min(pos) < first_name < max(pos)
    emb = pl.embeddings()
    assert torch.equal(emb[0, pos], pl.ctx.detach())


def test_gradient_reaches_the_prompt_through_the_quantized_tower(prepared):
    q = prepared.student
    assert not q.is_float and q.text_input_quant.calibrated  # really the fake-quant path
    pl = _learner(prepared, n_ctx=8)
    feats = pl(q)
    loss = torch.nn.functional.cross_entropy(feats @ feats.T * 10, torch.arange(len(NAMES)))
    loss.backward()
    g = pl.ctx.grad
    assert g is not None and torch.isfinite(g).all()
    assert (g.abs().sum(dim=-1) > 0).float().mean() > 0.5, "most context vectors must receive gradient"


def test_class_specific_context(prepared):
    pl = _learner(prepared, n_ctx=4, class_specific=True)
    assert pl.ctx.shape[0] == len(NAMES)
    with torch.no_grad():
        pl.ctx[1] += 1.0
    e = pl.embeddings()
    assert torch.equal(e[1, pl.ctx_positions[1]], pl.ctx[1]) and not torch.equal(e[0, pl.ctx_positions[0]], pl.ctx[1])


def test_too_long_prompt_is_rejected(prepared):
    with pytest.raises(ConfigError, match="context length"):
        _learner(prepared, n_ctx=32)


def test_full_stop_dropped_only_when_needed(prepared):
    tok = prepared.loaded.tokenizer
    period = tok(["."])[0, 1].item()
    assert period in _learner(prepared, n_ctx=8).tokens[0].tolist()
    assert period not in _learner(prepared, n_ctx=16).tokens[0].tolist()  # 1 + 16 + 2 + 1 = 20 tokens


@pytest.mark.parametrize("kw", [{"class_position": "left"}, {"n_ctx": 0}])
def test_bad_prompt_config(prepared, kw):
    with pytest.raises(ConfigError):
        _learner(prepared, **kw)
