"""The CPU integer engine against the fake-quant reference, its classify/embed API, image inputs and its errors.

Parity rule (no fixed counts, no logit tolerance a correct engine could exceed): the engine and the fake-quant model
compute the same integer codes up to float32 rounding of the dequantization (the engine accumulates in exact
integers and scales once; the reference multiplies dequantized floats). A value within float rounding of a ``.5``
boundary may therefore get a code one step apart - a *float tie* (``p4q_engine.quant.ties``) - and that
perturbation propagates. So every image whose top-1 differs, or whose logits differ by more than float noise
(``NOISE``), is traced to its first differing activation code (``p4q_engine.runtime.divergence``), and that code must
be a float tie. A real bug (a 1% scale error, a wrong zero point) fails it: see the mutation tests at the end.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from p4q_engine.artifact.format import Artifact
from p4q_engine.errors import ConfigError, ImageError
from p4q_engine.quant.modules import QuantLinear
from p4q_engine.quant.quantizer import QParams, quantize
from p4q_engine.quant.spec import act_spec, weight_spec
from p4q_engine.runtime.engine import Engine, IntLinear, unpack_weight


def _shared_fixtures():
    """tests/artifact/conftest.py (the module pytest already imported, if any, so session caches are shared)."""
    path = Path(__file__).resolve().parents[1] / "artifact" / "conftest.py"
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve() == path:
            return mod
    spec = importlib.util.spec_from_file_location("_p4q_tests_artifact_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


_fx = _shared_fixtures()
# fixtures used here (pytest finds fixtures by name in the test module's namespace)
single_torch_thread = _fx.single_torch_thread
tiny_model_name, tiny_model, tiny_preprocess_cfg = _fx.tiny_model_name, _fx.tiny_model, _fx.tiny_preprocess_cfg
class_tokens, calib_images, quant_clip, folded = _fx.class_tokens, _fx.calib_images, _fx.quant_clip, _fx.folded
make_images, CLASSNAMES = _fx.make_images, _fx.CLASSNAMES

#: Logit difference of two evaluations with identical codes everywhere: float32 noise of a scaled cosine (~1e-5).
NOISE = 1e-3


@pytest.fixture(scope="module")
def bundle(folded):
    return folded("4-4-8", "full")


@pytest.fixture(scope="module")
def engine(bundle) -> Engine:
    return Engine.load(bundle.path)


def _encode(b):
    return lambda x: b.adapter(b.qmodel.encode_image(x)) if b.adapter is not None else b.qmodel.encode_image(x)


def assert_tie_only_parity(b, eng: Engine, x: torch.Tensor) -> list[dict]:
    """Engine vs fake-quant on ``x``: identical up to float noise, or traced to a float tie. Returns the traces."""
    from p4q_engine.runtime.divergence import trace_disagreements

    ref = b.reference_logits(x, eng.text, eng.logit_scale)
    out = eng.logits(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert float(ref.std()) > 0.1  # the logits are not degenerate (the comparison means something)
    traces = trace_disagreements(eng, _encode(b), x, out, ref, noise=NOISE)
    untied = [t for t in traces if not t["tie"]]
    assert not untied, f"{len(untied)} of {len(x)} images differ without a float tie; first: {untied[0]!r}"
    return traces


# ------------------------------------------------------------------ parity with the fake-quant reference
@pytest.mark.parametrize("scope", ["full", "release"])
@pytest.mark.parametrize("bits", ["fp32", "8-8-8", "4-4-8", "3-3-8", "2-2-8"])
def test_parity_with_fake_quant(folded, bits, scope):
    b = folded(bits, scope)
    eng = Engine.load(b.path)
    assert eng.classnames == CLASSNAMES
    assert_tie_only_parity(b, eng, make_images(64, seed=1000))  # fresh: not the calibration images


def test_parity_without_adapter(folded):
    b = folded("4-4-8", "full", adapter=False)
    eng = Engine.load(b.path)
    assert eng.adapter is None
    assert_tie_only_parity(b, eng, make_images(64, seed=1001))


def test_text_features_match_fake_quant_text_tower(bundle, engine):
    """The stored 8-bit class features are the quantized text tower's normalized outputs, per-row quantized."""
    assert engine.text.shape == bundle.text_features.shape
    # per-row symmetric 8-bit: error <= half a step = max|row| / 127 / 2
    step = bundle.text_features.abs().amax(dim=1, keepdim=True) / 127
    assert bool(((engine.text - bundle.text_features).abs() <= step / 2 + 1e-7).all())
    assert engine.logit_scale == pytest.approx(float(bundle.qmodel.logit_scale.exp()))


# ------------------------------------------------------------------ embed / classify
def test_embed_rows_unit_norm(engine):
    x = make_images(10, seed=5)
    emb = engine.embed(x)
    assert emb.shape == (10, engine.text.shape[1])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(10), atol=1e-5)
    assert engine.embed(x[:0]).shape == (0, engine.text.shape[1])


def test_classify_top_k(engine):
    x = make_images(6, seed=6)
    logits = engine.logits(x)
    preds = engine.classify(x, top_k=3)
    assert len(preds) == 6
    for p, row in zip(preds, logits):
        assert len(p.labels) == len(p.probs) == len(p.indices) == 3
        assert p.probs == sorted(p.probs, reverse=True)
        assert all(0.0 <= v <= 1.0 for v in p.probs) and sum(p.probs) <= 1.0 + 1e-6
        assert all(lab in CLASSNAMES for lab in p.labels)
        assert [CLASSNAMES[i] for i in p.indices] == p.labels
        assert p.indices[0] == int(row.argmax())
        assert p.probs == pytest.approx(row.softmax(-1).sort(descending=True).values[:3].tolist(), abs=1e-6)
    full = engine.classify(x, top_k=100)  # clipped to the number of classes
    assert all(len(p.labels) == len(CLASSNAMES) and sum(p.probs) == pytest.approx(1.0, abs=1e-5) for p in full)
    assert all(len(p.labels) == 1 for p in engine.classify(x, top_k=0))


def test_classify_label_subset(engine):
    x = make_images(5, seed=7)
    subset = ["class 7", "class 2", "class 4"]
    logits = engine.logits(x)
    preds = engine.classify(x, top_k=5, labels=subset)
    for p, row in zip(preds, logits):
        assert len(p.labels) == 3 and set(p.labels) == set(subset)
        assert sum(p.probs) == pytest.approx(1.0, abs=1e-5) and p.probs == sorted(p.probs, reverse=True)
        assert [CLASSNAMES[i] for i in p.indices] == p.labels  # indices are global class ids
        sub = torch.tensor([CLASSNAMES.index(s) for s in subset])
        assert p.indices[0] == int(sub[row[sub].argmax()])
    one = engine.classify(x, labels=["class 9"])
    assert all(p.labels == ["class 9"] and p.probs == pytest.approx([1.0]) for p in one)


def test_classify_unknown_or_empty_labels(engine):
    x = make_images(2, seed=8)
    with pytest.raises(ConfigError, match="unknown labels"):
        engine.classify(x, labels=["class 1", "giraffe"])
    with pytest.raises(ConfigError, match="empty"):
        engine.classify(x, labels=[])


# ------------------------------------------------------------------ images from files
def _write_png(path: Path, w: int, h: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path)
    return path


@pytest.fixture(scope="module")
def png_paths(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("images")
    return [_write_png(d / f"img{i}.png", w, h, i) for i, (w, h) in enumerate([(32, 32), (48, 40), (40, 64), (2, 2)])]


def test_classify_paths_equals_preprocessed_tensor(engine, png_paths, tiny_preprocess_cfg):
    cfg = tiny_preprocess_cfg
    transform = open_clip.image_transform(
        cfg["size"],
        is_train=False,
        mean=cfg["mean"],
        std=cfg["std"],
        resize_mode=cfg["resize_mode"],
        interpolation=cfg["interpolation"],
    )
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in png_paths])
    assert torch.equal(engine.preprocess(png_paths), pixels)
    assert torch.equal(engine.logits(png_paths), engine.logits(pixels))
    by_path = engine.classify([str(p) for p in png_paths], top_k=4)
    by_tensor = engine.classify(pixels, top_k=4)
    assert [p.labels for p in by_path] == [p.labels for p in by_tensor]
    assert [p.probs for p in by_path] == [p.probs for p in by_tensor]
    # bytes and PIL images are the same inputs too
    by_bytes = engine.classify([p.read_bytes() for p in png_paths], top_k=4)
    by_pil = engine.classify([Image.open(p) for p in png_paths], top_k=4)
    assert [p.probs for p in by_bytes] == [p.probs for p in by_pil] == [p.probs for p in by_tensor]
    emb = engine.embed(png_paths)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(png_paths)), atol=1e-5)


def test_uint8_pixels_give_the_float_pixels_answers(engine, png_paths):
    """8-bit pixels (``Preprocess.load(raw=True)``: what the server queues) normalised inside the engine give the
    same features as the float pixels, bit for bit."""
    raw = torch.stack([engine.transform.load(p, raw=True) for p in png_paths])
    floats = torch.stack([engine.transform.load(p) for p in png_paths])
    assert raw.dtype == torch.uint8
    assert torch.equal(engine.encode(raw), engine.encode(floats))
    assert torch.equal(engine.logits(raw), engine.logits(floats))


def test_undecodable_file_names_the_path(engine, png_paths, tmp_path):
    bad = tmp_path / "not_really.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    with pytest.raises(ImageError) as info:
        engine.classify([png_paths[0], bad])
    assert str(bad) in str(info.value) and "decode" in str(info.value)
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(ImageError, match="notes.jpg"):
        engine.embed([text])


def test_missing_file_names_the_path(engine, tmp_path):
    with pytest.raises(ImageError, match="ghost.png"):
        engine.classify([tmp_path / "ghost.png"])


def test_one_pixel_image_rejected(engine, tmp_path):
    tiny = _write_png(tmp_path / "dot.png", 1, 1, 0)
    with pytest.raises(ImageError, match=r"dot\.png.*1x1"):
        engine.classify([tiny])
    with pytest.raises(ImageError, match="1x1"):
        engine.classify([Image.new("RGB", (1, 1))])
    with pytest.raises(ImageError):
        engine.classify([_write_png(tmp_path / "line.png", 64, 1, 0)])


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (3, 32, 32), (2, 1, 32, 32), (2, 3, 32, 33), (1, 2, 3, 32, 32)])
def test_wrong_tensor_shape(engine, shape):
    with pytest.raises(ConfigError, match="expected images of shape"):
        engine.classify(torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16, torch.int8, torch.bool])
def test_integer_pixels_other_than_uint8_rejected(engine, dtype):
    """uint8 means raw 8-bit pixels; an int64 tensor of the same values would otherwise run as if normalised."""
    with pytest.raises(ConfigError, match="float .normalised. or uint8"):
        engine.classify(torch.zeros(2, 3, *engine.image_size, dtype=dtype))


def test_empty_batch_gives_no_rows(engine):
    for dtype in (torch.float32, torch.uint8):
        out = engine.encode(torch.zeros(0, 3, *engine.image_size, dtype=dtype))
        assert out.shape == (0, engine.proj_dim) and out.dtype == torch.float32


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pixels(engine, bad):
    x = make_images(3, seed=9)
    x[1, 2, 5, 7] = bad
    with pytest.raises(ConfigError, match="NaN or inf"):
        engine.logits(x)


def test_device_must_be_cpu_for_the_reference_engine(bundle):
    from p4q_engine.artifact.format import load

    with pytest.raises(ConfigError):
        Engine(load(bundle.path), device="meta")


# ------------------------------------------------------------------ exact integer accumulation
def _int64_accumulator(lin: IntLinear, x: torch.Tensor, w_codes: torch.Tensor) -> torch.Tensor:
    """sum_k (xq - zp) * w in int64 - the definition the engine's float64 accumulation must equal exactly."""
    qp = lin.site.qp
    xq = quantize(x, qp).to(torch.int64) - int(qp.zero_point)
    return xq @ w_codes.to(torch.int64).T


def _check_int_linear(lin: IntLinear, x: torch.Tensor, w_codes: torch.Tensor) -> torch.Tensor:
    acc_int = _int64_accumulator(lin, x, w_codes)
    acc_eng = lin.site.codes(x) @ lin.w_codes  # the engine's accumulation expression
    assert acc_eng.dtype == torch.float64
    assert torch.equal(acc_eng, acc_eng.round()), "accumulator is not integral"
    assert torch.equal(acc_eng.to(torch.int64), acc_int)
    expected = acc_int.to(torch.float32) * (lin.site.scale * lin.w_scale)
    if lin.bias is not None:
        expected = expected + lin.bias
    assert torch.equal(lin(x), expected)  # dequantized once, after the exact sum
    return acc_int


@pytest.mark.parametrize(
    "prefix",
    [
        "visual.blocks.0.mlp.c_fc",
        "visual.blocks.1.mlp.c_proj",
        "visual.blocks.0.attn.in_proj",
        "visual.proj",
        "adapter.fc2",
    ],
)
def test_int_linear_accumulation_is_exact_on_the_artifact(bundle, engine, prefix):
    art = bundle.artifact
    lin = IntLinear(art, prefix)
    assert lin.site is not None and lin.w_codes is not None
    codes, scale = unpack_weight(art, f"{prefix}.w")
    assert torch.equal(lin.w_scale, scale)
    x = torch.randn(3, 7, lin.in_features, generator=torch.Generator().manual_seed(11)) * 2
    _check_int_linear(lin, x, codes)


def test_int_linear_accumulation_exact_beyond_float32_range():
    """8-bit codes, K=3072, extreme inputs: |acc| ~ 1e8 > 2^24, where float32 accumulation would round."""
    from p4q_engine.artifact.fold import _Folder

    g = torch.Generator().manual_seed(0)
    n, k = 16, 3072
    w = torch.randn(n, k, generator=g).sign() * (0.5 + torch.rand(n, k, generator=g) * 0.01)  # near +-max codes
    ql = QuantLinear(w, torch.randn(n, generator=g), weight_spec(8), act_spec(8), "minmax")
    ql.input_quant.set_qparams(QParams(torch.tensor(0.01), torch.tensor(3, dtype=torch.int32), act_spec(8)))
    f = _Folder()
    f.linear("lin", ql)
    man = {"linears": f.linears, "sites": f.sites, "tensors": {k_: {"layout": v} for k_, v in f.layouts.items()}}
    lin = IntLinear(Artifact(man, f.tensors), "lin")
    codes, _ = ql.weight_codes()
    unpacked = lin.w_codes.T.to(torch.int8)
    assert torch.equal(unpacked, codes)  # pack -> unpack is lossless
    # inputs clipped to code 255 / 0 following the signs of weight row 0: that row's accumulator is ~5e7
    x = torch.where(w[0] > 0, 5.0, -5.0).repeat(4, 1)
    x = torch.cat([x, torch.randn(2, k, generator=g) * 3])
    acc = _check_int_linear(lin, x, unpacked)
    assert int(acc.abs().max()) > 2**24
    # and the engine agrees with the fake-quant layer up to float rounding
    assert torch.allclose(lin(x), ql(x), rtol=1e-4, atol=1e-3 * float(ql(x).abs().max()))


# ------------------------------------------------------------------ vision config validation
def _with_vision(bundle, **changes) -> Artifact:
    import copy

    from p4q_engine.artifact.format import load

    art = load(bundle.path)
    man = copy.deepcopy(art.manifest)
    man["vision"].update(changes)
    return Artifact(man, dict(art.tensors))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"heads": 3}, r"heads \(3\) does not divide width \(64\)"),
        ({"heads": 0}, r"heads must be an integer >= 1"),
        ({"heads": True}, r"heads must be an integer"),
        ({"layers": 1}, r"says 1 layers but the tensors hold blocks \[0, 1\]"),
        ({"layers": 3}, r"says 3 layers but the tensors hold blocks \[0, 1\]"),
        ({"width": 32, "heads": 2}, r"visual.conv is 192 -> 64 features, the vision config \(width 32\)"),
        ({"patch_size": [7, 7]}, r"patch_size \[7, 7\] does not tile image_size \[32, 32\]"),
        ({"grid_size": [3, 3]}, r"grid_size \[3, 3\] is not image_size"),
        ({"pool_type": "none"}, r"unsupported pool_type 'none'"),
        ({"mlp_width": 128}, r"visual.blocks.0.mlp.c_fc is 64 -> 256 features"),
        ({"ln_eps": -1.0}, r"ln_eps must be a small positive number"),
    ],
)
def test_inconsistent_vision_config_is_refused_with_a_named_problem(bundle, changes, message):
    from p4q_engine.artifact.format import ArtifactError

    with pytest.raises(ArtifactError, match=message):
        Engine(_with_vision(bundle, **changes))


def test_vision_config_validation_survives_save_and_load(bundle, tmp_path):
    from p4q_engine.artifact.format import ArtifactError, load, save

    save(_with_vision(bundle, heads=5), tmp_path / "bad.p4q")
    load(tmp_path / "bad.p4q")  # checksums are fine; the engine refuses it
    with pytest.raises(ArtifactError, match="heads"):
        Engine.load(tmp_path / "bad.p4q")


def test_extra_block_in_the_tensors_is_refused(bundle):
    from p4q_engine.artifact.format import ArtifactError

    art = _with_vision(bundle)
    art.tensors["visual.blocks.7.ln_1.weight"] = torch.ones(64)
    with pytest.raises(ArtifactError, match=r"says 2 layers but the tensors hold blocks \[0, 1, 7\]"):
        Engine(art)


# ------------------------------------------------------------------ divergence tracing
# (p4q_engine/runtime/divergence.py)
def test_divergence_trace_aligns_every_site(folded):
    """Both paths' activation quantizations pair up site by site (patches vs image, k transposed, p before v), and on
    an unperturbed engine any differing code is a float tie."""
    from p4q_engine.runtime.divergence import first_divergence

    b = folded("3-3-8", "full")
    eng = Engine.load(b.path)
    for img in make_images(4, seed=1002):
        t = first_divergence(eng, _encode(b), img)
        assert t["aligned"], t
        assert t["sites"] == 1 + 8 * eng.cfg["layers"] + 1 + (2 if b.adapter is not None else 0)
        assert t["site"] is None or t["float_tie"], repr(t)


def test_divergence_trace_catches_a_real_difference(folded):
    """A wrong scale at block 0's c_fc input site (1% off) is found at that site and is not called a float tie."""
    from p4q_engine.runtime.divergence import first_divergence

    b = folded("4-4-8", "full")
    eng = Engine.load(b.path)
    site = eng.blocks[0].c_fc.site
    site.qp = type(site.qp)(site.qp.scale * 1.01, site.qp.zero_point, site.qp.spec)
    t = first_divergence(eng, _encode(b), make_images(1, seed=1003)[0])
    assert t["aligned"] and t["site"] is not None and t["codes_differ"] > 10
    assert t["shape"][-1] == eng.blocks[0].c_fc.in_features and not t["float_tie"]


# ------------------------------------------------------------------ the relaxed parity rule still catches bugs
def _mutated(b, mutate) -> Engine:
    eng = Engine.load(b.path)
    mutate(eng)
    return eng


def _scale_site(site, factor: float) -> None:
    site.qp = type(site.qp)(site.qp.scale * factor, site.qp.zero_point, site.qp.spec)


def _wrong_zero_point(site, delta: int) -> None:
    """The accumulator's zero-point correction uses ``zp + delta`` (quantization still uses ``zp``)."""
    codes = site.codes
    site.codes = lambda x: codes(x) - delta


@pytest.mark.parametrize("bits", ["8-8-8", "3-3-8"])
@pytest.mark.parametrize(
    "mutation",
    [
        pytest.param(lambda e: _scale_site(e.blocks[-1].c_proj.site, 1.01), id="last-c_proj-scale-1pct"),
        pytest.param(lambda e: _scale_site(e.blocks[0].in_proj.site, 0.99), id="first-in_proj-scale-1pct"),
        pytest.param(lambda e: _wrong_zero_point(e.blocks[-1].c_fc.site, 1), id="last-c_fc-zero-point+1"),
        pytest.param(lambda e: _wrong_zero_point(e.blocks[0].c_proj.site, -1), id="first-c_proj-zero-point-1"),
    ],
)
def test_tie_only_parity_fails_on_a_real_bug(folded, bits, mutation):
    """The same check as the parity tests, on an engine with one site's scale 1% off or one zero point one step
    off (in the first and in the last block): it must fail."""
    b = folded(bits, "full")
    with pytest.raises(AssertionError, match="without a float tie"):
        assert_tie_only_parity(b, _mutated(b, mutation), make_images(64, seed=1000))
