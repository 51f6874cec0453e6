"""The strongest peers a skilled user writes in ~30 lines of torch, for the engine to be measured against.

* **compile peer**: the image tower in bf16 with the patch embedding as reshape + GEMM (no cuDNN conv), attention
  through ``F.scaled_dot_product_attention`` (flash), under ``torch.compile`` (``reduce-overhead``: CUDA graphs).
* **fp8 peer**: the same tower with every block Linear on fp8 tensor cores, row-wise dynamic scaling
  (``torch._scaled_mm`` with a per-row activation scale computed on the fly and a per-output-channel weight
  scale), compiled the same way.

Both take an open_clip ``VisionTransformer`` and leave it untouched (deep copies).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

FP8_MAX = 448.0  # float8_e4m3fn


class PatchGEMM(nn.Module):
    """``conv1`` (kernel = stride = patch) as patchify + one GEMM: what a user writes instead of cuDNN's conv."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.patch = conv.kernel_size
        self.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1).clone(), requires_grad=False)
        self.out_channels = conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ph, pw = self.patch
        x = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * ph * pw)
        y = x @ self.weight.t()  # [B, L, width]
        return y.transpose(1, 2).reshape(b, self.out_channels, h // ph, w // pw)  # what open_clip expects


class Fp8RowwiseLinear(nn.Module):
    """``x W^T + b`` on fp8 tensor cores: per-row dynamic activation scale, per-output-channel weight scale."""

    def __init__(self, weight: torch.Tensor, bias) -> None:
        super().__init__()
        w = weight.detach().float()
        sw = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [N, 1]
        self.register_buffer("w", (w / sw).to(torch.float8_e4m3fn).t())  # [K, N], column-major for _scaled_mm
        self.register_buffer("sw", sw.t().contiguous())  # [1, N]
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        sx = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)  # [M, 1]
        xf = (x2.float() / sx).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xf, self.w, scale_a=sx, scale_b=self.sw, bias=self.bias, out_dtype=torch.bfloat16)
        return y.reshape(*shape[:-1], -1)


def _linear(weight: torch.Tensor, bias, fp8: bool) -> nn.Module:
    if fp8:
        return Fp8RowwiseLinear(weight, bias)
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class SDPAAttention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention, batch first) as two Linears around flash SDPA."""

    def __init__(self, mha: nn.MultiheadAttention, fp8: bool) -> None:
        super().__init__()
        self.heads = mha.num_heads
        self.in_proj = _linear(mha.in_proj_weight.detach(), mha.in_proj_bias, fp8)
        self.out_proj = _linear(mha.out_proj.weight.detach(), mha.out_proj.bias, fp8)

    def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None):
        b, n, d = q_x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.in_proj(q_x).chunk(3, -1))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.out_proj(o), None


def peer_tower(visual: nn.Module, fp8: bool = False, device: str = "cuda") -> nn.Module:
    """A bf16 copy of ``visual`` on ``device`` with the GEMM patch embedding, SDPA attention and (``fp8``) fp8 block
    Linears. The fp8 modules are built after the bf16 cast: casting them would turn their fp8 weights and fp32
    scales into bf16."""
    m = copy.deepcopy(visual).to(device=device, dtype=torch.bfloat16)
    m.conv1 = PatchGEMM(m.conv1)
    for blk in m.transformer.resblocks:
        blk.attn = SDPAAttention(blk.attn, fp8)
        if fp8:
            blk.mlp.c_fc = Fp8RowwiseLinear(blk.mlp.c_fc.weight.detach(), blk.mlp.c_fc.bias)
            blk.mlp.c_proj = Fp8RowwiseLinear(blk.mlp.c_proj.weight.detach(), blk.mlp.c_proj.bias)
    return m.eval()


def compiled(tower: nn.Module, mode: str = "reduce-overhead"):
    """``torch.compile`` of the tower (static shapes: one graph per batch size, as a server would warm them)."""
    return torch.compile(tower, mode=mode, dynamic=False)


def torchao_tower(visual: nn.Module, kind: str, device: str = "cuda") -> nn.Module:
    """The compile peer's tower with its block Linears quantized by torchao (``kind``: ``fp8``, row-wise dynamic
    float8; ``int8``, dynamic int8 activations and weights). Raises ImportError where torchao is not installed."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
        quantize_,
    )

    m = peer_tower(visual, fp8=False, device=device)
    config = (
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        if kind == "fp8"
        else Int8DynamicActivationInt8WeightConfig()
    )
    quantize_(m.transformer, config)
    return m


#: Peers by name: (row label, builder of a compiled callable from an open_clip VisionTransformer). The row labels
#: starting "compile peer (", "fp8 peer (" and "torchao " are the ones a headline ratio may pick as the best peer.
PEERS = {
    "compile": (
        "compile peer (bf16, GEMM patch embedding, SDPA, reduce-overhead)",
        lambda v: compiled(peer_tower(v)),
    ),
    "compile-max-autotune": (
        "compile peer (bf16, GEMM patch embedding, SDPA, max-autotune)",
        lambda v: compiled(peer_tower(v), mode="max-autotune"),
    ),
    "fp8": ("fp8 peer (row-wise dynamic _scaled_mm, compiled)", lambda v: compiled(peer_tower(v, fp8=True))),
    "torchao-fp8": ("torchao fp8 row-wise dynamic (compiled)", lambda v: compiled(torchao_tower(v, "fp8"))),
    "torchao-int8": ("torchao int8 dynamic (compiled)", lambda v: compiled(torchao_tower(v, "int8"))),
}
