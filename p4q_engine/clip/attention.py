"""A quantizable drop-in for ``nn.MultiheadAttention`` (self-attention, as used in CLIP's residual blocks).

``nn.MultiheadAttention`` calls its ``out_proj`` functionally, so hooks and module swaps never see it, and the
q/k/v/probability tensors never exist as module outputs. This module computes attention explicitly so every matmul
input can be quantized: the in-projection input and weights (A/W bits), q, k, v and the softmax probabilities
(Attention bits) and the out-projection input and weights (A/W bits). With every spec ``None`` it equals
``nn.MultiheadAttention`` to float rounding.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from p4q_engine.errors import ConfigError
from p4q_engine.quant.modules import ActQuantizer, QuantLinear
from p4q_engine.quant.spec import QuantSpec


class QuantMultiheadAttention(nn.Module):
    """Self-attention with fake-quantized projections and attention matmul inputs."""

    def __init__(
        self,
        mha: nn.MultiheadAttention,
        w_spec: Optional[QuantSpec],
        a_spec: Optional[QuantSpec],
        attn_spec: Optional[QuantSpec],
        observer: str = "omse",
        observer_kwargs: Optional[dict] = None,
    ) -> None:
        super().__init__()
        kw = dict(observer_kwargs or {})
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ConfigError("only plain self-attention nn.MultiheadAttention modules can be quantized")
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.embed_dim // mha.num_heads
        self.batch_first = mha.batch_first
        self.in_proj = QuantLinear(mha.in_proj_weight, mha.in_proj_bias, w_spec, a_spec, observer, kw)
        self.out_proj = QuantLinear.from_linear(mha.out_proj, w_spec, a_spec, observer, kw)
        self.q_quant = ActQuantizer(attn_spec, observer, **kw)
        self.k_quant = ActQuantizer(attn_spec, observer, **kw)
        self.v_quant = ActQuantizer(attn_spec, observer, **kw)
        self.p_quant = ActQuantizer(attn_spec, observer, **kw)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``nn.MultiheadAttention`` semantics: bool ``True`` = masked out; float masks are added."""
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    def forward(
        self,
        query: torch.Tensor,
        key: Optional[torch.Tensor] = None,
        value: Optional[torch.Tensor] = None,
        need_weights: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
        **_: object,
    ) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ConfigError("QuantMultiheadAttention supports self-attention only (key and value must be query)")
        x = query if self.batch_first else query.transpose(0, 1)
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        q, k, v = self.q_quant(self._heads(q)), self.k_quant(self._heads(k)), self.v_quant(self._heads(v))
        logits = (q.float() @ k.float().transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if attn_mask is not None:
            logits = logits + self._additive(attn_mask, logits.dtype)
        if key_padding_mask is not None:
            logits = logits + self._additive(key_padding_mask, logits.dtype)[:, None, None, :]
        probs = self.p_quant(torch.softmax(logits, dim=-1))
        out = (probs @ v.float()).to(x.dtype).transpose(1, 2).reshape(x.shape)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None
