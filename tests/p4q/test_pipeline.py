"""A trained P4Q model on disk: reload gives the same accuracy; its artifact runs in the integer engine with the
fake-quant model's predictions; baselines."""

import dataclasses

import torch

from p4q_engine.p4q import baselines
from p4q_engine.p4q.features import FeatureSet
from p4q_engine.p4q.pipeline import export_trained, load_trained, trained_class_features
from p4q_engine.p4q.trainer import P4QConfig, save_trained, train
from p4q_engine.runtime.engine import Engine


def test_save_load_export_and_engine_parity(prepared, tmp_path):
    from dataclasses import asdict

    from p4q_engine.artifact.format import save

    t = prepared.data.train
    data = dataclasses.replace(prepared.data, train=FeatureSet(t.student[:64], t.teacher[:64], t.labels[:64]))
    r = train(
        prepared.student, prepared.loaded.tokenizer, data, P4QConfig(n_ctx=4, epochs=2, batch_size=32), progress=False
    )
    src = dataclasses.replace(
        __import__("p4q_engine.p4q.pipeline", fromlist=["Source"]).Source(), train_size=200, eval_size=100
    )
    save_trained(r, prepared.student, data, tmp_path, asdict(src))
    loaded = load_trained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(trained_class_features(loaded), r.text_features, atol=1e-5)
        z = data.test.student[:32]
        assert torch.allclose(loaded.adapter(z), r.adapter(z), atol=1e-6)
    art = export_trained(tmp_path)
    assert art.manifest["adapter"] is not None and art.manifest["model"]["source"] == "p4q"
    save(art, tmp_path / "m.p4q")
    eng = Engine.load(tmp_path / "m.p4q")
    from p4q_engine.data.datasets import load_dataset

    ds = load_dataset("reference", "adapt_test", transform=prepared.loaded.preprocess, size=64).dataset
    images = torch.stack([ds[i][0] for i in range(64)])
    with torch.no_grad():
        feats = torch.nn.functional.normalize(loaded.adapter(loaded.qmodel.encode_image(images)), dim=-1)
    ref = eng.logit_scale * feats @ eng.text.T  # same stored 8-bit class features, fake-quant image path
    out = eng.logits(images)
    # every image whose top-1 or logits differ beyond float noise traces to a float tie (tests/runtime/test_engine.py)
    from p4q_engine.runtime.divergence import untied_disagreements

    def encode(x):
        return loaded.adapter(loaded.qmodel.encode_image(x))

    assert untied_disagreements(eng, encode, images, out, ref, noise=1e-3) == []
    assert float(ref.std()) > 0.1  # the logits are not degenerate (the comparison means something)


def test_baselines_are_sane(prepared):
    d = prepared.data
    fp, q = baselines.zero_shot(d, False), baselines.zero_shot(d, True)
    assert fp["n"] == q["n"] == len(d.test) and 20 < fp["top1"] <= 100
    lp = baselines.linear_probe(d, quantized=False)
    qlp = baselines.linear_probe(d, quantized=True)
    assert lp["classifier_bits"] is None and qlp["classifier_bits"] == 8
    assert lp["top1"] > 100 / len(d.classnames) * 3  # far above chance
