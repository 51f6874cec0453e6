"""Fake-quant CLIP: an open_clip ViT CLIP with every site of a :class:`QuantRecipe` quantized.

The image tower keeps open_clip's own ``VisionTransformer.forward`` (its patch embedding, attention and MLP layers
are swapped in place for quantized ones, its projection is moved out so it can be quantized too). The text tower is
run here from its parts, because P4Q feeds it *embeddings* (learned prompt vectors plus class-name tokens) rather
than token ids; :meth:`QuantCLIP.encode_text_embeddings` is that entry point.
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from p4q_engine.clip.attention import QuantMultiheadAttention
from p4q_engine.clip.recipe import QuantRecipe, ScopePlan
from p4q_engine.errors import ConfigError
from p4q_engine.quant.modules import ActQuantizer, QuantConv2d, QuantEmbedding, QuantLinear, QuantMode


def _check_vit(model: nn.Module) -> VisionTransformer:
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise ConfigError("only open_clip models with a VisionTransformer image tower can be quantized")
    if visual.attn_pool is not None:
        raise ConfigError("attentional-pooler image towers (CoCa) are not supported")
    return visual


def _quantize_block(blk: nn.Module, recipe: QuantRecipe, plan: ScopePlan) -> None:
    """Swap a residual block's attention and MLP Linear layers for quantized ones, in place."""
    if not isinstance(blk, ResidualAttentionBlock) or not isinstance(blk.attn, nn.MultiheadAttention):
        raise ConfigError(f"unsupported transformer block {type(blk).__name__}: only standard CLIP blocks")
    w, a = recipe.w(plan.block_linear.w), recipe.a(plan.block_linear.a)
    obs, kw = recipe.observer, recipe.observer_kwargs
    blk.attn = QuantMultiheadAttention(blk.attn, w, a, recipe.attn(plan.attn), obs, kw)
    blk.mlp.c_fc = QuantLinear.from_linear(blk.mlp.c_fc, w, a, obs, kw)
    blk.mlp.c_proj = QuantLinear.from_linear(blk.mlp.c_proj, w, a, obs, kw)


def _projection(proj: object, recipe: QuantRecipe, plan: ScopePlan) -> nn.Module:
    """A final projection (``x @ P`` parameter or ``nn.Linear``) as a QuantLinear; identity if absent."""
    w, a = recipe.w(plan.proj.w), recipe.a(plan.proj.a)
    if proj is None:
        return nn.Identity()
    if isinstance(proj, nn.Linear):
        return QuantLinear.from_linear(proj, w, a, recipe.observer, recipe.observer_kwargs)
    return QuantLinear(proj.detach().t(), None, w, a, recipe.observer, recipe.observer_kwargs)


class QuantCLIP(nn.Module):
    """A CLIP whose towers compute what the integer engine will compute (up to float rounding)."""

    def __init__(self, model: nn.Module, recipe: QuantRecipe | str = QuantRecipe(), copy_model: bool = True) -> None:
        super().__init__()
        recipe = QuantRecipe(recipe) if isinstance(recipe, str) else recipe
        _check_vit(model)
        model = copy.deepcopy(model) if copy_model else model
        self.recipe = recipe
        plan = recipe.plan()
        self._build_image_tower(model.visual, recipe, plan)
        self._build_text_tower(getattr(model, "text", model), recipe, plan)
        self.logit_scale = nn.Parameter(model.logit_scale.detach().clone(), requires_grad=False)
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.requires_grad_(False)
        self.eval()

    # ---------------------------------------------------------------- construction
    def _build_image_tower(self, visual: VisionTransformer, recipe: QuantRecipe, plan: ScopePlan) -> None:
        pe = plan.patch_embed
        visual.conv1 = QuantConv2d(
            visual.conv1, recipe.w(pe.w), recipe.a(pe.a), recipe.observer, recipe.observer_kwargs
        )
        for blk in visual.transformer.resblocks:
            _quantize_block(blk, recipe, plan)
        self.image_proj = _projection(visual.proj, recipe, plan)
        visual.proj = None  # open_clip's forward now returns the pooled token; image_proj projects it
        self.visual = visual

    def _build_text_tower(self, text: nn.Module, recipe: QuantRecipe, plan: ScopePlan) -> None:
        if getattr(text, "cls_emb", None) is not None:
            raise ConfigError("text towers with an appended CLS embedding (CoCa) are not supported")
        self.token_embedding = QuantEmbedding(text.token_embedding, recipe.w(plan.token_embed), recipe.observer)
        self.positional_embedding = nn.Parameter(text.positional_embedding.detach().clone())
        self.text_input_quant = ActQuantizer(recipe.a(plan.text_input), recipe.observer, **recipe.observer_kwargs)
        self.transformer = text.transformer
        for blk in self.transformer.resblocks:
            _quantize_block(blk, recipe, plan)
        self.ln_final = text.ln_final
        self.text_proj = _projection(text.text_projection, recipe, plan)
        mask = getattr(text, "attn_mask", None)
        self.register_buffer("attn_mask", None if mask is None else mask.detach().clone(), persistent=False)
        self.text_pool_type = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
        self.text_eos_id = getattr(text, "text_eos_id", getattr(text, "eos_id", None))
        self.context_length = self.positional_embedding.shape[0]

    # ---------------------------------------------------------------- forward
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.image_proj(self.visual(images))
        return F.normalize(x, dim=-1) if normalize else x

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Index of the token whose feature represents the sequence (EOT for CLIP's argmax pooling)."""
        n, length = tokens.shape
        if self.text_pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.text_pool_type == "eos":
            return (tokens == self.text_eos_id).int().argmax(dim=-1)
        if self.text_pool_type in ("last", "first"):
            return torch.full((n,), length - 1 if self.text_pool_type == "last" else 0, device=tokens.device)
        raise ConfigError(f"unsupported text pool type {self.text_pool_type!r}")

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens)

    def encode_text_embeddings(
        self, x: torch.Tensor, pool_index: torch.Tensor, normalize: bool = False
    ) -> torch.Tensor:
        """Text features from token *embeddings* ``[N, L, D]`` (a learned prompt can be part of ``x``)."""
        x = self.text_input_quant(x + self.positional_embedding[: x.shape[1]].to(x.dtype))
        mask = None if self.attn_mask is None else self.attn_mask[: x.shape[1], : x.shape[1]]
        x = self.ln_final(self.transformer(x, attn_mask=mask))
        x = self.text_proj(x[torch.arange(x.shape[0], device=x.device), pool_index])
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.encode_text_embeddings(self.embed_tokens(tokens), self.pool_index(tokens), normalize)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Image-to-text logits, as ``CLIP.get_logits`` returns them."""
        logits = self.logit_scale.exp() * self.encode_image(images, True) @ self.encode_text(tokens, True).T
        return logits if self.logit_bias is None else logits + self.logit_bias

    # ---------------------------------------------------------------- quantizer control
    def act_quantizers(self) -> Iterator[tuple[str, ActQuantizer]]:
        for name, mod in self.named_modules():
            if isinstance(mod, ActQuantizer) and mod.enabled:
                yield name, mod

    def set_quant_mode(self, mode: QuantMode | str) -> None:
        for _, q in self.act_quantizers():
            q.mode = QuantMode(mode)

    @property
    def is_float(self) -> bool:
        return self.recipe.bits.is_float


def quantize_clip(model: nn.Module, recipe: QuantRecipe | str = QuantRecipe(), copy_model: bool = True) -> QuantCLIP:
    """Build a fake-quant :class:`QuantCLIP` (uncalibrated; call :func:`~p4q_engine.clip.calibrate.calibrate`)."""
    return QuantCLIP(model, recipe, copy_model=copy_model)
