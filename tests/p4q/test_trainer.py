"""P4Q training: gradient flow, overfitting, resume determinism, cached features, save/load/export parity."""

import dataclasses

import pytest
import torch

from p4q_engine.errors import ConfigError
from p4q_engine.p4q.adapter import QAdapter
from p4q_engine.p4q.features import FeatureSet, cached_features, compute_features
from p4q_engine.p4q.trainer import P4QConfig, evaluate_features, train


def _subset(data, n):
    t = data.train
    return dataclasses.replace(data, train=FeatureSet(t.student[:n], t.teacher[:n], t.labels[:n]))


def test_adapter_gradient_and_formula():
    torch.manual_seed(0)
    ad = QAdapter(32, reduction=4, alpha=0.2, w_bits=4, a_bits=8, observer="minmax", seed=0)
    z = torch.randn(16, 32)
    for q in (ad.in_quant, ad.fc2.input_quant):
        q.start_calibration()
    ad(z)
    for q in (ad.in_quant, ad.fc2.input_quant):
        q.freeze()
    out = ad(z)
    zq = ad.in_quant(z)
    h = ad.fc2(torch.relu(ad.fc1(zq)))
    assert torch.allclose(out, 0.2 * h + 0.8 * zq)
    out.pow(2).sum().backward()
    for p in (ad.fc1.weight, ad.fc2.weight, ad.fc1.bias, ad.fc2.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_prompt_and_adapter_change_during_training(prepared):
    data = _subset(prepared.data, 64)
    cfg = P4QConfig(n_ctx=4, epochs=1, batch_size=32)
    r0 = train(
        prepared.student,
        prepared.loaded.tokenizer,
        data,
        dataclasses.replace(cfg, epochs=1),
        progress=False,
        stop_after_epoch=None,
    )
    from p4q_engine.p4q.prompt import PromptLearner

    init = PromptLearner(prepared.student, prepared.loaded.tokenizer, data.classnames, 4, seed=0).ctx
    assert not torch.allclose(r0.prompt.ctx, init), "the prompt did not move"
    assert r0.history[0]["loss"] > 0


def test_overfits_a_tiny_batch(prepared):
    data = _subset(prepared.data, 16)
    cfg = P4QConfig(n_ctx=4, epochs=60, batch_size=16, loss="ce", prompt_lr=0.05, adapter_lr=1e-2, alpha=0.5)
    r = train(prepared.student, prepared.loaded.tokenizer, data, cfg, progress=False)
    assert r.history[-1]["loss"] < 0.5 * r.history[0]["loss"]
    assert r.metrics["train"]["top1"] == 100.0


def test_resume_equals_uninterrupted(prepared, tmp_path):
    data = _subset(prepared.data, 64)
    cfg = P4QConfig(n_ctx=4, epochs=3, batch_size=32)
    full = train(prepared.student, prepared.loaded.tokenizer, data, cfg, out_dir=tmp_path / "a", progress=False)
    part = train(
        prepared.student,
        prepared.loaded.tokenizer,
        data,
        cfg,
        out_dir=tmp_path / "b",
        progress=False,
        stop_after_epoch=1,
    )
    assert len(part.history) == 1
    resumed = train(prepared.student, prepared.loaded.tokenizer, data, cfg, out_dir=tmp_path / "b", progress=False)
    assert torch.equal(full.prompt.ctx, resumed.prompt.ctx)
    for k, v in full.adapter.state_dict().items():
        assert torch.equal(v, resumed.adapter.state_dict()[k]), k
    assert full.history == resumed.history
    assert full.metrics["test"] == resumed.metrics["test"]
    with pytest.raises(ConfigError, match="different configuration"):
        train(
            prepared.student,
            prepared.loaded.tokenizer,
            data,
            dataclasses.replace(cfg, alpha=0.5),
            out_dir=tmp_path / "b",
            progress=False,
        )


def test_cached_features_equal_recomputed(prepared, tmp_path, monkeypatch):
    from p4q_engine.data.datasets import load_dataset

    monkeypatch.setenv("P4Q_CACHE", str(tmp_path))
    ds = load_dataset("reference", "adapt_test", transform=prepared.loaded.preprocess, size=24).dataset
    fresh = compute_features(prepared.student, prepared.teacher, ds, batch_size=8, progress=False)
    first = cached_features(prepared.student, prepared.teacher, ds, "k", progress=False)
    assert list((tmp_path / "features").glob("*.safetensors")), "nothing was cached"
    again = cached_features(prepared.student, prepared.teacher, ds, "k", progress=False)
    for fs in (first, again):
        assert torch.allclose(fs.student, fresh.student, atol=1e-5) and torch.equal(fs.labels, fresh.labels)
        assert torch.allclose(fs.teacher, fresh.teacher, atol=1e-5)
    assert not torch.allclose(fresh.student, fresh.teacher), "student must be the quantized tower"
    # the cached student features are what the training loop would compute from images
    images = torch.stack([ds[i][0] for i in range(24)])
    with torch.no_grad():
        assert torch.allclose(prepared.student.encode_image(images), again.student, atol=1e-5)


def test_no_prompt_no_adapter_is_rejected(prepared):
    with pytest.raises(ConfigError):
        train(
            prepared.student,
            prepared.loaded.tokenizer,
            prepared.data,
            P4QConfig(prompt=False, adapter=False),
            progress=False,
        )


def test_adapter_only_uses_template_text(prepared):
    data = _subset(prepared.data, 32)
    r = train(prepared.student, prepared.loaded.tokenizer, data, P4QConfig(prompt=False, epochs=1), progress=False)
    assert r.prompt is None and torch.equal(r.text_features, data.student_text)
    assert r.metrics["test"] == evaluate_features(prepared.student, None, r.adapter, data.test, data)


def test_adapter_ptq_ablation_quantizes_after_float_training(prepared):
    data = _subset(prepared.data, 32)
    r = train(
        prepared.student,
        prepared.loaded.tokenizer,
        data,
        P4QConfig(prompt=False, epochs=1, adapter_qat=False),
        progress=False,
    )
    assert r.adapter.fc1.w_spec is not None and r.adapter.fc1.w_spec.bits == 8
    assert r.adapter.in_quant.calibrated and r.adapter.fc2.input_quant.calibrated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_matches_cpu_closely(prepared):
    data = _subset(prepared.data, 64)
    cfg = P4QConfig(n_ctx=4, epochs=2, batch_size=32)
    cpu = train(prepared.student, prepared.loaded.tokenizer, data, cfg, progress=False)
    gpu = train(prepared.student, prepared.loaded.tokenizer, data, cfg, progress=False, device="cuda")
    assert gpu.metrics["device"] == "cuda" and gpu.prompt.ctx.device.type == "cpu"
    assert torch.allclose(cpu.prompt.ctx, gpu.prompt.ctx, atol=1e-3)
    assert abs(cpu.metrics["test"]["top1"] - gpu.metrics["test"]["top1"]) <= 3.0
