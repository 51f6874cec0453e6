"""QAdapter (Eq. 10-11, Fig. 4): a low-bit bottleneck on the image feature, trained quantization-aware.

``v = alpha * h2(Q(relu(h1(z_hat)))) + (1 - alpha) * z_hat`` with ``z_hat = Q(z)`` the quantized image feature.
Both Linear layers are :class:`QuantLinear` with per-channel weights (8 bits as in the paper, or the model's W bits)
re-quantized from their current values every step, so the straight-through estimator trains them as they will be
executed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from p4q_engine.errors import ConfigError
from p4q_engine.quant.modules import ActQuantizer, QuantLinear
from p4q_engine.quant.spec import act_spec, weight_spec


class QAdapter(nn.Module):
    """Quantized residual bottleneck ``d -> d/r -> d`` with adapt ratio ``alpha``."""

    def __init__(
        self,
        dim: int,
        reduction: int = 4,
        alpha: float = 0.2,
        w_bits: Optional[int] = 8,
        a_bits: Optional[int] = 8,
        observer: str = "minmax",
        seed: Optional[int] = None,
    ) -> None:
        super().__init__()
        if dim % reduction:
            raise ConfigError(f"feature dim {dim} is not divisible by the reduction {reduction}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
        self.dim, self.hidden, self.alpha = dim, dim // reduction, float(alpha)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        fc1 = nn.Linear(dim, self.hidden)
        fc2 = nn.Linear(self.hidden, dim)
        for lin in (fc1, fc2):  # deterministic init given the seed
            bound = lin.in_features**-0.5
            with torch.no_grad():
                lin.weight.copy_(torch.empty_like(lin.weight).uniform_(-bound, bound, generator=gen))
                lin.bias.zero_()
        self.in_quant = ActQuantizer(act_spec(a_bits), observer)  # Eq. 10: z_hat = Q(z)
        self.fc1 = QuantLinear.from_linear(fc1, weight_spec(w_bits), None, observer)  # input is z_hat already
        self.fc2 = QuantLinear.from_linear(fc2, weight_spec(w_bits), act_spec(a_bits), observer)
        for p in (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias):
            p.requires_grad_(True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        zq = self.in_quant(z)
        h = self.fc2(torch.relu(self.fc1(zq)))
        return self.alpha * h + (1.0 - self.alpha) * zq
