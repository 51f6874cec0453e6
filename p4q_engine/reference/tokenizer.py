"""Word-level tokenizer over the reference task's closed vocabulary.

Ids: ``0`` = ``<pad>``, ``1`` = ``<unk>``, then the sorted vocabulary words, then ``<start_of_text>`` and
``<end_of_text>``. The end-of-text token has the **highest** id, so open_clip's ``argmax`` text pooling finds it
(as with OpenAI CLIP's BPE tokenizer). Sequences are ``sot + tokens + eot``, zero padded to ``context_length``;
truncation keeps the eot as the last token.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from p4q_engine.data.reference import split_words, vocabulary_words

__all__ = ["ReferenceTokenizer", "DEFAULT_CONTEXT_LENGTH"]

DEFAULT_CONTEXT_LENGTH = 20


class ReferenceTokenizer:
    PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<start_of_text>", "<end_of_text>"

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, words: Optional[Sequence[str]] = None):
        words = sorted(set(vocabulary_words() if words is None else words))
        self.vocab: list[str] = [self.PAD, self.UNK] + words + [self.SOT, self.EOT]
        self.encoder: dict[str, int] = {w: i for i, w in enumerate(self.vocab)}
        self.decoder: dict[int, str] = dict(enumerate(self.vocab))
        self.pad_token_id = 0
        self.unk_token_id = 1
        self.sot_token_id = self.encoder[self.SOT]
        self.eot_token_id = self.encoder[self.EOT]
        self.vocab_size = len(self.vocab)
        self.context_length = int(context_length)
        if self.context_length < 2:
            raise ValueError("context_length must be >= 2 (sot + eot)")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without sot/eot (unknown words -> ``<unk>``)."""
        return [self.encoder.get(w, self.unk_token_id) for w in split_words(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Words of ``ids``, skipping pad/sot/eot."""
        skip = {self.pad_token_id, self.sot_token_id, self.eot_token_id}
        return " ".join(self.decoder.get(int(i), self.UNK) for i in ids if int(i) not in skip)

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        n = self.context_length if context_length is None else int(context_length)
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(t)[: n - 2] + [self.eot_token_id]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def __repr__(self) -> str:
        return f"ReferenceTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"
