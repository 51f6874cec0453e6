"""``runtime/divergence.py``: a suspect image is traced in the batch it was compared in, not alone.

A float tie is batch dependent (matmul blocking follows the batch size: on an AVX512-BF16 Xeon a tie at the QAdapter
input met in a batch of 64 did not recur in a batch of one, and the parity test reported an untied difference that
was a tie), so the tracer replays the suspect's whole ``Engine.logits`` chunk and slices the image out.
"""

from __future__ import annotations

import torch

from p4q_engine.runtime import divergence


def test_image_of_slices_the_batch_dimension():
    calls = [
        (torch.arange(24.0).view(4, 3, 2), 0.0, 0, 255),
        (torch.arange(24.0).view(3, 4, 2), 1.0, 0, 255),
        (torch.zeros(5), 2.0, 0, 255),
    ]
    out = divergence._image_of(calls, 2, 4)
    assert torch.equal(out[0][0], calls[0][0][2:3])  # batch first
    assert torch.equal(out[1][0], calls[1][0][:, 2:3])  # sequence first
    assert out[2][0].shape == (5,) and out[2][1:] == (2.0, 0, 255)  # no batch dimension: kept


def test_suspects_are_traced_in_their_chunk(monkeypatch):
    seen = []

    def fake_record(engine, encode, images):
        seen.append(len(images))
        return [], []

    monkeypatch.setattr(divergence, "_record", fake_record)
    images = torch.zeros(100, 3, 4, 4)
    ref = torch.zeros(100, 3)
    ref[:, 0] = 1.0
    out = ref.clone()
    out[[10, 20, 70], 1] = 2.0  # top-1 flips in chunk 0 (twice) and chunk 1
    engine = type("E", (), {"patch": (2, 2)})()
    traces = divergence.trace_disagreements(engine, None, images, out, ref, batch_size=64)
    assert seen == [64, 36]  # each chunk recorded once, at the size it was compared at
    assert [t["index"] for t in traces] == [10, 20, 70]
