"""P4Q's training objective (Sec. 3.3, Eq. 12-15): contrastive classification plus distillation.

``L = L_c + lambda * L_dist``:

* ``L_c`` (Eq. 12-13): cross-entropy of the label under ``softmax(tau * cos(v_i, t_c))`` - the CLIP logit scale
  ``tau`` times the cosine similarity of the (adapted) quantized image feature and each class text feature.
* ``L_dist``: standard knowledge distillation ``KL(p_t || p_s)`` between the full-precision teacher's class
  distribution ``p_t`` (FP image encoder, FP text features from the hand-written template ensemble) and the
  quantized student's ``p_s``, both at temperature ``T`` (default 1), scaled by ``T^2`` (Hinton et al.).
  Why not the paper: Eq. 14 as printed sums ``p_t * log p_s`` without a minus sign (a quantity to *maximise*,
  i.e. the cross-entropy with the sign flipped), and the text describes it as a cross entropy, which differs from
  the KL only by the teacher's entropy - a constant, so its gradient is the same as ours; the released code uses
  yet another form. We minimise the KL because it is zero exactly when the student matches the teacher, which makes
  the loss value readable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from p4q_engine.errors import ConfigError

#: ``--loss`` choices: which terms of ``L = L_c + lambda * L_dist`` are on.
LOSS_MODES = ("both", "ce", "kd")


def similarity_logits(image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: torch.Tensor | float):
    """``tau * cos(image, class)`` as ``[N, C]`` logits (Eq. 12)."""
    return float(logit_scale) * F.normalize(image_feats, dim=-1) @ F.normalize(text_feats, dim=-1).T


def contrastive_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``L_c`` (Eq. 13): mean cross-entropy of the labels under the similarity logits."""
    return F.cross_entropy(logits, labels)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """``L_dist = T^2 * KL(p_t || p_s)``, averaged over the batch; no gradient flows into the teacher."""
    if temperature <= 0:
        raise ConfigError(f"distillation temperature must be positive, got {temperature}")
    log_ps = F.log_softmax(student_logits / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * temperature**2


@dataclass(frozen=True)
class P4QLoss:
    """``L = L_c + lambda * L_dist`` with either term switchable off (Table 3b)."""

    mode: str = "both"
    lam: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in LOSS_MODES:
            raise ConfigError(f"unknown loss {self.mode!r}; choose from {', '.join(LOSS_MODES)}")
        if self.lam < 0:
            raise ConfigError(f"lambda must be >= 0, got {self.lam}")

    def __call__(self, student_logits, labels, teacher_logits=None) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts (as floats, for logging)."""
        parts: dict[str, torch.Tensor] = {}
        if self.mode in ("both", "ce"):
            parts["ce"] = contrastive_loss(student_logits, labels)
        if self.mode in ("both", "kd"):
            if teacher_logits is None:
                raise ConfigError("the distillation loss needs teacher logits")
            kd = distillation_loss(student_logits, teacher_logits, self.temperature)
            parts["kd"] = kd if self.mode == "kd" else self.lam * kd
        total = sum(parts.values())
        return total, {k: float(v.detach()) for k, v in parts.items()}
