"""kernels/compile_ahead.py: launches become compiles only inside the context, the tuner refuses to time there, the
context always resets, and a compile that fails is left for the real launch. Triton's ``AsyncCompileMode`` is
replaced by a recording fake (a real compile needs a CUDA driver; the GPU test in tests/runtime/test_kernel_engine.py
runs the real one)."""

from __future__ import annotations

import pytest
import torch
import triton
from p4q_engine.kernels import compile_ahead, tuning
from p4q_engine.kernels.compile_ahead import NotTuned, launch
from p4q_engine.kernels.compile_ahead import compile_ahead as ahead
from p4q_engine.kernels.tuning import TileConfig, pick_config

from p4q_engine.errors import ConfigError


class FakeKernel:
    """Records how it was called: a launch (``kernel[grid](...)``) or a compile-only ``warmup``."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getitem__(self, grid):
        return lambda *a, **k: self.calls.append(("launch", grid, a, k))

    def warmup(self, *a, grid, **k):
        self.calls.append(("warmup", grid, a, k))


class FakeMode:
    """Stands in for ``triton.AsyncCompileMode``; ``fail_on_exit`` makes its exit raise as a failed compile does."""

    instances: list["FakeMode"] = []
    fail_on_exit = False

    def __init__(self, executor, *, ignore_errors=False) -> None:
        self.executor, self.ignore_errors, self.exited = executor, ignore_errors, False
        FakeMode.instances.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.exited = True
        if FakeMode.fail_on_exit:
            raise RuntimeError("PassManager::run failed")
        return False


@pytest.fixture
def fake_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton, "AsyncCompileMode", FakeMode, raising=False)
    monkeypatch.setattr(FakeMode, "instances", [])
    monkeypatch.setattr(FakeMode, "fail_on_exit", False)


def test_launch_compiles_only_inside_the_context(fake_triton):
    k = FakeKernel()
    launch(k, (3,), 1, X=2)
    with ahead(2) as on:
        assert on and compile_ahead.active()
        launch(k, (3,), 1, X=2)
    assert not compile_ahead.active()
    launch(k, (4,), 5)
    assert [c[0] for c in k.calls] == ["launch", "warmup", "launch"]
    assert k.calls[1] == ("warmup", (3,), (1,), {"X": 2})  # the same arguments: the same specialization
    (mode,) = FakeMode.instances
    assert mode.exited and mode.ignore_errors  # failed compiles are left for the real launch


@pytest.mark.parametrize("workers, interpret", [(0, "0"), (4, "1")])
def test_off_without_workers_or_under_the_interpreter(monkeypatch, fake_triton, workers, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    k = FakeKernel()
    with ahead(workers) as on:
        assert not on and not compile_ahead.active()
        launch(k, (1,))
    assert [c[0] for c in k.calls] == ["launch"] and FakeMode.instances == []


def test_off_on_a_triton_without_async_compile(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delattr(triton, "AsyncCompileMode", raising=False)
    with ahead(4) as on:
        assert not on


def test_errors_in_the_body_propagate_and_reset(fake_triton):
    with pytest.raises(NotTuned):
        with ahead(2):
            raise NotTuned("k")
    assert not compile_ahead.active()
    FakeMode.fail_on_exit = True  # a compile failed: swallowed here, the real launch fails the same way later
    with ahead(2) as on:
        assert on
    assert not compile_ahead.active()
    with pytest.raises(ValueError):  # the body's own error is never swallowed
        with ahead(2):
            raise ValueError("bug")
    assert not compile_ahead.active()


def test_nested_context_is_one_pass(fake_triton):
    with ahead(2) as outer, ahead(2) as inner:
        assert outer and not inner and compile_ahead.active()
    assert len(FakeMode.instances) == 1 and not compile_ahead.active()


def test_default_workers(monkeypatch):
    monkeypatch.setenv("P4Q_COMPILE_WORKERS", "0")
    assert compile_ahead.default_workers() == 0
    monkeypatch.setenv("P4Q_COMPILE_WORKERS", "3")
    assert compile_ahead.default_workers() == 3
    monkeypatch.setenv("P4Q_COMPILE_WORKERS", "many")
    with pytest.raises(ConfigError, match="P4Q_COMPILE_WORKERS"):
        compile_ahead.default_workers()
    monkeypatch.delenv("P4Q_COMPILE_WORKERS")
    assert 1 <= compile_ahead.default_workers() <= 16


def test_tuner_compiles_every_candidate_inside_the_context(fake_triton, monkeypatch, tmp_path):
    """A shape the table and cache lack must be timed by real launches: inside a compile-ahead pass every fitting
    candidate is handed to ``bench`` once (under the pass: compiled, not timed), one that raises is skipped, the
    first is returned, nothing is cached and the key is noted for the report; a known one is looked up (no bench);
    an untimed pick (no bench) is as usual."""
    monkeypatch.setenv("P4Q_TUNE_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setattr(tuning, "_memory", {})
    monkeypatch.setattr(tuning, "_user", {})
    monkeypatch.setattr(tuning, "_loaded", False)
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tmp_path / "none")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    gpu = torch.device("cuda")
    compiled: list = []
    cands = (TileConfig(64, 64, 64), TileConfig(32, 32, 64), TileConfig(64, 32, 64))

    def bench(cfg):
        compiled.append(cfg)
        if cfg == cands[1]:
            raise RuntimeError("out of shared memory")  # skipped, as the tuner skips it

    with ahead(2):
        assert pick_config("qgemm", 64, 768, 768, 8, gpu, bench, cands) == cands[0]
        assert compiled == list(cands)
        assert compile_ahead.untuned() == [tuning._key("qgemm", 64, 768, 768, 8, gpu)]
        assert pick_config("qgemm", 64, 768, 768, 8, gpu, bench, cands) == cands[0]  # the next layer's same key
        assert compiled == list(cands) and len(compile_ahead.untuned()) == 1  # submitted once per pass
        assert pick_config("qgemm", 64, 768, 768, 8, gpu, None, cands) == cands[0]
    assert tuning._user == {} and tuning._key("qgemm", 64, 768, 768, 8, gpu) not in tuning._memory
    assert compile_ahead.untuned() == []  # per pass
    compiled.clear()
    tuning._memory[tuning._key("qgemm", 64, 768, 768, 8, gpu)] = cands[1]
    with ahead(2):
        assert pick_config("qgemm", 64, 768, 768, 8, gpu, bench, cands) == cands[1]
        assert compile_ahead.untuned() == []
    assert compiled == []
    monkeypatch.setenv("P4Q_AUTOTUNE", "0")  # untimed picks: the first candidate, compiled now, kept by nobody
    with ahead(2):
        assert pick_config("qgemm", 32, 64, 64, 8, gpu, bench, cands) == cands[1]  # the first fitting 32 rows
    assert compiled == [] and tuning._user == {} and tuning._key("qgemm", 32, 64, 64, 8, gpu) not in tuning._memory
