"""ReferenceTokenizer: closed vocabulary, open_clip-compatible layout (eot = highest id, zero padding)."""

import torch

from p4q_engine.data.reference import REFERENCE_CLASSNAMES, REFERENCE_TEMPLATES, render_tensor_batch
from p4q_engine.reference.tokenizer import ReferenceTokenizer


def test_special_ids_and_determinism():
    tok = ReferenceTokenizer()
    assert tok.encoder["<pad>"] == 0 and tok.pad_token_id == 0
    assert tok.eot_token_id == tok.vocab_size - 1 == max(tok.encoder.values())
    assert tok.sot_token_id == tok.vocab_size - 2
    words = tok.vocab[2:-2]
    assert words == sorted(words)
    assert ReferenceTokenizer().vocab == tok.vocab
    assert tok.context_length in (16, 20)


def test_roundtrip_over_classnames_templates_and_captions():
    tok = ReferenceTokenizer()
    texts = [t.format(c) for c in REFERENCE_CLASSNAMES for t in REFERENCE_TEMPLATES]
    texts += render_tensor_batch("train", 0, 50)[2]
    for t in texts:
        ids = tok.encode(t)
        assert tok.unk_token_id not in ids, t
        assert tok.decode(ids).replace(" .", ".") == t.lower()
    toks = tok(texts)
    assert toks.shape == (len(texts), tok.context_length) and toks.dtype == torch.long
    assert (toks[:, 0] == tok.sot_token_id).all()
    # every caption fits: nothing truncated
    assert all(len(tok.encode(t)) + 2 <= tok.context_length for t in texts)


def test_argmax_pooling_finds_eot_and_padding():
    tok = ReferenceTokenizer()
    toks = tok(["a red circle.", "a photo of a large blue star in the top left on a gray background."])
    eot_pos = toks.argmax(dim=-1)
    assert (toks[torch.arange(2), eot_pos] == tok.eot_token_id).all()
    n0 = len(tok.encode("a red circle.")) + 2
    assert eot_pos[0] == n0 - 1 and (toks[0, n0:] == 0).all()


def test_truncation_keeps_eot():
    tok = ReferenceTokenizer()
    long = " ".join(["red"] * 50)
    t = tok(long)
    assert t.shape == (1, tok.context_length)
    assert t[0, -1] == tok.eot_token_id and t[0, 0] == tok.sot_token_id and (t[0, 1:-1] > 0).all()
    assert tok(long, context_length=8).shape == (1, 8) and tok(long, context_length=8)[0, -1] == tok.eot_token_id


def test_unknown_words_map_to_unk():
    tok = ReferenceTokenizer()
    ids = tok.encode("a Zebra riding")
    assert ids == [tok.encoder["a"], tok.unk_token_id, tok.unk_token_id]
    assert tok.encode("a red circle!")[-1] == tok.unk_token_id  # unknown punctuation too
    assert tok("a zebra").shape == (1, tok.context_length)
    assert tok.encode("RED Circle") == tok.encode("red circle")
