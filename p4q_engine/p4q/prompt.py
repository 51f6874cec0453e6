"""Learnable prompt (CoOp, Sec. 3.2, Eq. 8-9) fed through the *quantized* text tower.

Each class's input sequence is assembled from token embeddings: ``[SOT] ctx_1 .. ctx_M <class tokens> . [EOT]``
(class token at the end; ``middle`` and ``front`` are options). The full stop is left out when the sequence
would not otherwise fit the text tower's context (the reference model's 20 tokens at M = 16). The class-name,
period, SOT and EOT embeddings come from the frozen quantized token-embedding table and are computed once; the M
context vectors are the only parameters. The assembled embeddings go through
:meth:`QuantCLIP.encode_text_embeddings`, whose first step adds
the positional embedding and quantizes the sum (``text_input_quant``, Eq. 9) before the first block, and the
features are pooled at the EOT token.

Gradients reach the context through every fake-quant site by the straight-through estimator (the authors'
released code rounds without one, so its prompt never trains; ``tests/p4q/test_prompt.py`` checks ours does).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from p4q_engine.clip.qmodel import QuantCLIP
from p4q_engine.errors import ConfigError

#: Where the class name sits relative to the learned context.
CLASS_POSITIONS = ("end", "middle", "front")


def _content_ids(tokenizer, qmodel: QuantCLIP, text: str) -> tuple[int, list[int], int]:
    """``(sot_id, content ids, eot_id)`` of ``text`` under ``tokenizer``, found via the model's own pooling rule."""
    ids = tokenizer([text])[0]
    eot_pos = int(qmodel.pool_index(ids[None])[0])
    if eot_pos < 1:
        raise ConfigError(f"cannot locate the start/end tokens of {text!r} with this tokenizer")
    return int(ids[0]), [int(i) for i in ids[1:eot_pos]], int(ids[eot_pos])


class PromptLearner(nn.Module):
    """M shared (or class-specific) context vectors plus fixed class-name tokens -> class text features."""

    def __init__(
        self,
        qmodel: QuantCLIP,
        tokenizer,
        classnames: Sequence[str],
        n_ctx: int = 16,
        ctx_init: Optional[str] = None,
        class_position: str = "end",
        class_specific: bool = False,
        init_std: float = 0.02,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if class_position not in CLASS_POSITIONS:
            raise ConfigError(
                f"unknown class token position {class_position!r}; choose from {', '.join(CLASS_POSITIONS)}"
            )
        if not classnames:
            raise ConfigError("a prompt learner needs at least one class name")
        dim = qmodel.token_embedding.embedding_dim
        init = self._init_context(qmodel, tokenizer, n_ctx, ctx_init, dim, init_std, seed)
        n_ctx = init.shape[0]
        if n_ctx < 1:
            raise ConfigError("n_ctx must be >= 1 (use no prompt learner for M = 0)")
        self.n_ctx, self.class_position, self.class_specific = n_ctx, class_position, class_specific
        self.classnames = list(classnames)
        ctx = init.expand(len(classnames), -1, -1).clone() if class_specific else init.clone()
        self.ctx = nn.Parameter(ctx)
        tokens, ctx_pos = self._sequences(qmodel, tokenizer, self.classnames)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("ctx_positions", ctx_pos, persistent=False)
        with torch.no_grad():
            base = qmodel.embed_tokens(tokens)
        self.register_buffer("base_embeddings", base, persistent=False)
        self.register_buffer("pool", qmodel.pool_index(tokens), persistent=False)

    @staticmethod
    def _init_context(qmodel, tokenizer, n_ctx, ctx_init, dim, std, seed) -> torch.Tensor:
        """N(0, std) (CoOp's default) or the quantized token embeddings of a phrase such as ``"a photo of a"``."""
        if ctx_init:
            _, ids, _ = _content_ids(tokenizer, qmodel, ctx_init)
            if not ids:
                raise ConfigError(f"--ctx-init {ctx_init!r} has no tokens")
            with torch.no_grad():
                return qmodel.embed_tokens(torch.tensor(ids)[None])[0].detach().float()
        if n_ctx < 1:
            raise ConfigError(f"n_ctx must be >= 1, got {n_ctx}")
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(n_ctx, dim, generator=gen) * std

    def _sequences(self, qmodel, tokenizer, classnames) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[C, L]`` with placeholders where the context goes, and the ``[C, M]`` context positions."""
        length = qmodel.context_length
        rows, positions = [], []
        for name in classnames:
            sot, name_ids, eot = _content_ids(tokenizer, qmodel, name)
            _, period, _ = _content_ids(tokenizer, qmodel, ".")
            m = self.n_ctx
            if self.class_position == "end":
                parts = [("ctx", m), ("ids", name_ids + period)]
            elif self.class_position == "front":
                parts = [("ids", name_ids), ("ctx", m), ("ids", period)]
            else:
                parts = [("ctx", m // 2), ("ids", name_ids), ("ctx", m - m // 2), ("ids", period)]
            seq, pos = [sot], []
            for kind, val in parts:
                if kind == "ctx":
                    pos += list(range(len(seq), len(seq) + val))
                    seq += [sot] * val  # placeholder id; its embedding is replaced by the context
                else:
                    seq += val
            seq.append(eot)
            if len(seq) > length and period and seq[-2 - len(period) + 1 : -1] == period:
                seq = seq[: -1 - len(period)] + [eot]  # drop the full stop rather than fail (as truncation would)
            if len(seq) > length:
                raise ConfigError(
                    f"prompt for {name!r} needs {len(seq)} tokens (M={m} context + class name) but "
                    f"the text tower's context length is {length}; use a smaller --n-ctx"
                )
            rows.append(seq + [0] * (length - len(seq)))
            positions.append(pos)
        tokens = torch.tensor(rows, dtype=torch.long)
        if not (qmodel.pool_index(tokens) == torch.tensor([len(r) - r.count(0) - 1 for r in rows])).all():
            raise ConfigError("the tokenizer's end-of-text token is not where the text tower pools")
        return tokens, torch.tensor(positions, dtype=torch.long)

    def embeddings(self) -> torch.Tensor:
        """``[C, L, D]`` input embeddings with the learned context in place."""
        c = len(self.classnames)
        ctx = self.ctx if self.class_specific else self.ctx.expand(c, -1, -1)
        x = self.base_embeddings.clone()
        index = self.ctx_positions[..., None].expand(-1, -1, x.shape[-1])
        return x.scatter(1, index, ctx.to(x.dtype))

    def forward(self, qmodel: QuantCLIP, normalize: bool = True) -> torch.Tensor:
        """Class text features ``[C, D]`` through the (quantized) text tower."""
        feats = qmodel.encode_text_embeddings(self.embeddings(), self.pool)
        return F.normalize(feats, dim=-1) if normalize else feats
