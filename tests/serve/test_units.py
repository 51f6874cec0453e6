"""In-process checks of the serve building blocks (no HTTP): option parsing, ranking, and the batcher's batching
and failure containment."""

from __future__ import annotations

import asyncio

import pytest
import torch

from p4q_engine.serve.batcher import Batcher, FaultHooks
from p4q_engine.serve.errors import KINDS, ServeError
from p4q_engine.serve.inputs import ParsedRequest, check_labels, parse_top_k, prepare_images, rank
from tests.serve.conftest import CLASSNAMES


@pytest.mark.parametrize(
    "value,ok",
    [
        (1, True),
        ("3", True),
        (" 7 ", True),
        (0, False),
        (-1, False),
        ("x", False),
        (1.0, False),
        (True, False),
        (None, False),
        ([2], False),
    ],
)
def test_parse_top_k(value, ok):
    if ok:
        assert parse_top_k(value) == int(value)
    else:
        with pytest.raises(ServeError) as e:
            parse_top_k(value)
        assert e.value.kind == "bad_top_k" and e.value.status == 400


def test_check_labels():
    assert check_labels(None, CLASSNAMES) is None
    assert check_labels(["class 3", "class 1"], CLASSNAMES) == [3, 1]
    for bad, kind in (
        (["zebra"], "unknown_label"),
        ([], "unknown_label"),
        (["class 1", "class 1"], "unknown_label"),
        ("class 1", "bad_request"),
        ([1], "bad_request"),
    ):
        with pytest.raises(ServeError) as e:
            check_labels(bad, CLASSNAMES)
        assert e.value.kind == kind


def test_error_shape_and_kinds():
    e = ServeError("bad_image", "x: broken", index=2)
    assert e.body() == {"error": {"kind": "bad_image", "message": "x: broken", "index": 2}}
    assert ServeError("timeout", "late").body() == {"error": {"kind": "timeout", "message": "late"}}
    assert all(400 <= s < 600 for s in KINDS.values())
    with pytest.raises(ValueError):
        ServeError("nope", "")


def test_rank_equals_engine_classify(engine, good_images):
    pixels = prepare_images(engine, ParsedRequest(good_images), max_pixels=10**6)
    logits = engine.logits(pixels)
    for subset, labels in ((None, None), ([4, 2, 9], ["class 4", "class 2", "class 9"])):
        got = rank(logits, engine.classnames, 3, subset)
        want = engine.classify(good_images, top_k=3, labels=labels)
        assert [g["labels"] for g in got] == [w.labels for w in want]
        assert [g["indices"] for g in got] == [w.indices for w in want]


class _FlakyEngine:
    """Delegates to a real engine; raises on chosen calls (counted from 1)."""

    def __init__(self, engine, fail_calls=()):
        self.engine, self.fail_calls, self.calls, self.sizes = engine, set(fail_calls), 0, []
        self.logit_scale, self.text = engine.logit_scale, engine.text

    def embed(self, pixels, batch_size=64):
        self.calls += 1
        self.sizes.append(pixels.shape[0])
        if self.calls in self.fail_calls:
            raise RuntimeError("boom")
        return self.engine.embed(pixels, batch_size)


def _run(batcher: Batcher, jobs_pixels: list[torch.Tensor]) -> list:
    async def go():
        with batcher.preparing():  # as the app does: a started batch waits for images still being prepared
            jobs = [batcher.submit(p) for p in jobs_pixels]
        return await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)

    return asyncio.run(go())


def test_batcher_splits_and_coalesces_and_contains_failures(engine, good_images):
    pixels = prepare_images(engine, ParsedRequest(good_images), max_pixels=10**6)  # 6 images
    want = engine.embed(pixels)
    flaky = _FlakyEngine(engine, fail_calls={2})
    b = Batcher(flaky, max_batch=3, max_wait_s=0.05, max_queue=64, hooks=FaultHooks())
    b.start()
    try:
        # 3 requests of 2 images queued together: batches of 3 + 3, the middle request split across both
        out = _run(b, [pixels[0:2], pixels[2:4], pixels[4:6]])
        assert flaky.sizes == [3, 3]
        assert not isinstance(out[0], BaseException)
        assert torch.allclose(out[0].embeddings, want[0:2], atol=1e-6)
        # batch 2 failed: the request split across it fails too, the one fully in batch 1 does not
        assert isinstance(out[1], ServeError) and out[1].kind == "internal"
        assert isinstance(out[2], ServeError) and out[2].kind == "internal"
        assert b.alive
        again = _run(b, [pixels[3:6]])
        assert torch.allclose(again[0].embeddings, want[3:6], atol=1e-6)
        assert torch.allclose(again[0].logits, engine.logits(pixels[3:6]), atol=1e-5)
        # a request larger than the whole queue can never be admitted
        small = Batcher(flaky, max_queue=2)
        small.start()
        try:
            with pytest.raises(ServeError) as e:
                _run(small, [pixels[0:3]])
            assert e.value.kind == "too_many_images" and e.value.status == 413
        finally:
            small.stop(5)
    finally:
        b.stop(5)
    assert not b.alive
    with pytest.raises(ServeError) as e:
        _run(b, [pixels[0:1]])
    assert e.value.kind == "not_ready"


def test_warm_up_runs_every_bucket_once_on_graph_engines():
    """A CUDA-graph engine sees each power-of-two bucket up to --max-batch before the server is ready; an engine
    without graphs (CPU) is not run at all."""
    import torch

    from p4q_engine.runtime.kernel_engine import KernelEngine
    from p4q_engine.serve.server import warm_up

    class FakeGraphEngine:
        use_graphs = True
        image_size = (8, 8)
        bucket = staticmethod(KernelEngine.bucket)

        def __init__(self) -> None:
            self.seen: list[tuple] = []

        def embed(self, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
            self.seen.append((tuple(pixels.shape), batch_size))
            return torch.zeros(pixels.shape[0], 4)

        def precompile(self, sizes: list[int]) -> dict:
            self.seen.append(("precompile", tuple(sizes)))
            return {}

    eng = FakeGraphEngine()
    assert warm_up(eng, 48) == [1, 2, 4, 8, 16, 32, 64]
    # every bucket's kernels compiled at once (in parallel), before the first capture
    assert eng.seen == [("precompile", (1, 2, 4, 8, 16, 32, 64))] + [
        ((b, 3, 8, 8), b) for b in (1, 2, 4, 8, 16, 32, 64)
    ]
    eng.use_graphs = False
    eng.seen.clear()
    assert warm_up(eng, 48) == [] and eng.seen == []


def test_batch_invariant_flag_reaches_the_kernels(monkeypatch):
    """``p4q serve --batch-invariant`` -> ``ServeConfig.batch_invariant`` -> ``P4Q_BATCH_INVARIANT=1`` in the serving
    process (read by kernels/tuning.py when the warm-up picks tiles); off by default."""
    import os

    from p4q_engine.kernels import tuning

    from p4q_engine.cli import build_parser
    from p4q_engine.serve.config import ServeConfig
    from p4q_engine.serve.server import engine_settings

    assert build_parser().parse_args(["serve", "m.p4q"]).batch_invariant is False
    assert build_parser().parse_args(["serve", "m.p4q", "--batch-invariant"]).batch_invariant is True
    monkeypatch.setenv("P4Q_BATCH_INVARIANT", "0")  # restored after the test
    with engine_settings(ServeConfig()):
        pass
    assert not tuning.batch_invariant()
    with engine_settings(ServeConfig(batch_invariant=True)):
        pass
    assert os.environ["P4Q_BATCH_INVARIANT"] == "1" and tuning.batch_invariant()


def test_batch_invariant_setting_precedes_the_engine_load(monkeypatch):
    """The load's self-test is the engine's first forward (on a GPU it captures the batch-1 graph): the serving
    settings are in effect there already, and a load that fails leaves the environment as it was."""
    from p4q_engine.kernels import tuning

    from p4q_engine.artifact.format import ArtifactError
    from p4q_engine.runtime import engine as engine_mod
    from p4q_engine.serve.config import ServeConfig
    from p4q_engine.serve.server import load_engine

    seen = []

    class Loaded:
        use_graphs = False

    def fake_load(path, device):
        seen.append((tuning.batch_invariant(), device))
        if path == "bad":
            raise ArtifactError("bad artifact")
        return Loaded()

    monkeypatch.setattr(engine_mod.Engine, "load", staticmethod(fake_load))
    monkeypatch.delenv("P4Q_BATCH_INVARIANT", raising=False)
    with pytest.raises(ArtifactError):
        load_engine("bad", ServeConfig(batch_invariant=True, device="cpu"))
    assert seen == [(True, "cpu")] and not tuning.batch_invariant()
    engine, warmed = load_engine("good", ServeConfig(batch_invariant=True, device="cpu"))
    assert isinstance(engine, Loaded) and warmed == [] and seen[-1] == (True, "cpu") and tuning.batch_invariant()
    monkeypatch.delenv("P4Q_BATCH_INVARIANT")
