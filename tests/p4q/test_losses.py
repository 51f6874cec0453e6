"""L_c and L_dist on hand-computed cases."""

import math

import pytest
import torch

from p4q_engine.errors import ConfigError
from p4q_engine.p4q.losses import P4QLoss, contrastive_loss, distillation_loss, similarity_logits


def test_similarity_logits_are_scaled_cosines():
    img = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    out = similarity_logits(img, txt, 10.0)
    s = 10.0 / math.sqrt(2)
    assert torch.allclose(out, torch.tensor([[10.0, 0.0], [s, s]]))


def test_contrastive_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    # -log softmax: row 0 -> log(1 + e^-2); row 1 -> log(1 + e^1)
    want = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2
    assert contrastive_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)


def test_distillation_is_kl_teacher_to_student():
    pt = torch.tensor([[0.7, 0.2, 0.1]])
    ps = torch.tensor([[0.5, 0.3, 0.2]])
    want = float((pt * (pt.log() - ps.log())).sum())
    got = distillation_loss(ps.log(), pt.log())
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert distillation_loss(pt.log(), pt.log()).item() == pytest.approx(0.0, abs=1e-7)
    # temperature: T^2 * KL of the softened distributions
    t = 2.0
    pt2, ps2 = torch.softmax(pt.log() / t, -1), torch.softmax(ps.log() / t, -1)
    want_t = t * t * float((pt2 * (pt2.log() - ps2.log())).sum())
    assert distillation_loss(ps.log(), pt.log(), t).item() == pytest.approx(want_t, rel=1e-5)


def test_distillation_gives_no_gradient_to_the_teacher():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    distillation_loss(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_total_loss_modes_and_lambda():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    ce, kd = contrastive_loss(s, y).item(), distillation_loss(s, t).item()
    assert P4QLoss("both", 1.5)(s, y, t)[0].item() == pytest.approx(ce + 1.5 * kd, rel=1e-6)
    assert P4QLoss("ce")(s, y, t)[0].item() == pytest.approx(ce, rel=1e-6)
    assert P4QLoss("kd", 0.5)(s, y, t)[0].item() == pytest.approx(kd, rel=1e-6)
    total, parts = P4QLoss("both", 0.5)(s, y, t)
    assert set(parts) == {"ce", "kd"} and parts["kd"] == pytest.approx(0.5 * kd, rel=1e-6)


@pytest.mark.parametrize("kwargs", [{"mode": "mse"}, {"lam": -1.0}])
def test_bad_loss_config(kwargs):
    with pytest.raises(ConfigError):
        P4QLoss(**kwargs)


def test_kd_needs_teacher():
    with pytest.raises(ConfigError):
        P4QLoss("kd")(torch.randn(2, 3), torch.tensor([0, 1]))
