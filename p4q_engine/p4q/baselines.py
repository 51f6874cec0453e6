"""The other rows of the paper's Table 1, on the same cached features as P4Q.

* zero-shot FP and zero-shot PTQ: template-ensemble class features against the teacher's / student's image features;
* linear probe (FP): multinomial logistic regression on the full-precision image features (CLIP's protocol:
  L-BFGS, the L2 strength picked on a held-out fifth of the training features, then refit on all of them);
* quantized linear probe: the same on the quantized model's image features, with the classifier's weights
  fake-quantized per class at 8 bits (so the whole classifier is integer-executable);
* CoOp (FP + learnable prompt) is :func:`p4q_engine.p4q.trainer.train` on an fp32 model with no adapter and
  ``loss="ce"``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from p4q_engine.eval.zeroshot import topk_correct
from p4q_engine.p4q.features import AdaptationData
from p4q_engine.p4q.losses import similarity_logits
from p4q_engine.quant.observers import MinMaxObserver
from p4q_engine.quant.quantizer import fake_quantize
from p4q_engine.quant.spec import weight_spec

#: L2 strengths tried by the linear probe.
LP_WEIGHT_DECAYS: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    c = topk_correct(logits, labels)
    n = labels.numel()
    return {"top1": 100.0 * c[1] / n, "top5": 100.0 * c[5] / n, "n": n}


@torch.no_grad()
def zero_shot(data: AdaptationData, quantized: bool) -> dict:
    """Template zero-shot accuracy on the test features: FP (teacher) or PTQ (student)."""
    feats = data.test.student if quantized else data.test.teacher
    text = data.student_text if quantized else data.teacher_text
    return _accuracy(similarity_logits(feats, text, data.logit_scale), data.test.labels)


def _fit_logreg(x: torch.Tensor, y: torch.Tensor, classes: int, wd: float, iters: int = 200) -> torch.nn.Linear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + wd * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def _quantized_logits(lin: torch.nn.Linear, x: torch.Tensor, bits: Optional[int]) -> torch.Tensor:
    w = lin.weight.detach()
    if bits is not None:
        obs = MinMaxObserver(weight_spec(bits))
        obs.observe(w)
        w = fake_quantize(w, obs.qparams())
    return x @ w.T + lin.bias.detach()


def linear_probe(
    data: AdaptationData,
    quantized: bool,
    classifier_bits: Optional[int] = 8,
    weight_decays: Sequence[float] = LP_WEIGHT_DECAYS,
) -> dict:
    """Linear-probe accuracy on the test features (FP teacher features, or quantized student features with an
    8-bit classifier)."""
    pick = (lambda fs: fs.student) if quantized else (lambda fs: fs.teacher)
    x, y = F.normalize(pick(data.train), dim=-1), data.train.labels
    xt = F.normalize(pick(data.test), dim=-1)
    classes = len(data.classnames)
    bits = classifier_bits if quantized else None
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    n_val = max(1, len(y) // 5)
    val, fit = perm[:n_val], perm[n_val:]
    scores = {}
    for wd in weight_decays:
        lin = _fit_logreg(x[fit], y[fit], classes, wd)
        scores[wd] = _accuracy(_quantized_logits(lin, x[val], bits), y[val])["top1"]
    best = max(weight_decays, key=lambda w: (scores[w], -w))
    lin = _fit_logreg(x, y, classes, best)
    return {
        **_accuracy(_quantized_logits(lin, xt, bits), data.test.labels),
        "weight_decay": best,
        "classifier_bits": bits,
    }
