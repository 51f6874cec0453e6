"""load_clip on tiny registered open_clip configs: checkpoint round trips, QuickGELU, errors (all offline)."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

open_clip = pytest.importorskip("open_clip")
from open_clip import factory  # noqa: E402
from open_clip import pretrained as oc_pretrained  # noqa: E402
from open_clip.transformer import QuickGELU  # noqa: E402

from p4q_engine.clip import loading  # noqa: E402
from p4q_engine.clip.loading import LoadedModel, load_clip, needs_quick_gelu  # noqa: E402
from p4q_engine.errors import ConfigError, ModelLoadError  # noqa: E402

TINY = "P4QTest-Tiny"
TINY_WIDE = "P4QTest-Tiny-W48"  # same layout, different widths: a checkpoint of one must not load into the other
TINY_RESNET = "P4QTest-Tiny-RN"


def _cfg(vision_width: int, text_width: int) -> dict:
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": vision_width, "head_width": 32, "patch_size": 16},
        # vocab_size must match open_clip's SimpleTokenizer (get_tokenizer) for real use
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": text_width, "heads": 2, "layers": 1},
    }


@pytest.fixture(scope="module", autouse=True)
def tiny_configs(tmp_path_factory):
    """Register tiny model configs with open_clip for this module only (its registry is global)."""
    d = tmp_path_factory.mktemp("model_configs")
    (d / f"{TINY}.json").write_text(json.dumps(_cfg(64, 32)))
    (d / f"{TINY_WIDE}.json").write_text(json.dumps(_cfg(96, 48)))
    rn = _cfg(64, 32)
    rn["vision_cfg"] = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16}
    (d / f"{TINY_RESNET}.json").write_text(json.dumps(rn))
    open_clip.add_model_config(d)
    yield d
    factory._MODEL_CONFIG_PATHS.remove(Path(d))
    for name in (TINY, TINY_WIDE, TINY_RESNET):
        factory._MODEL_CONFIGS.pop(name, None)


def _random_model(name=TINY, seed=0, quick_gelu=False) -> nn.Module:
    torch.manual_seed(seed)
    model = open_clip.create_model(name, force_quick_gelu=quick_gelu)
    with torch.no_grad():  # open_clip zero-inits some tensors; make every tensor distinctive
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _acts(model: nn.Module) -> set:
    return {type(blk.mlp.gelu) for blk in list(model.visual.transformer.resblocks) + list(model.transformer.resblocks)}


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("fmt", ["pt", "pt_wrapped", "pt_module_prefix", "safetensors"])
def test_checkpoint_round_trip(tmp_path, fmt):
    src = _random_model()
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "tiny.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "tiny.pt"
        if fmt == "pt_wrapped":  # what open_clip's training loop writes
            sd = {"epoch": 3, "name": "run", "state_dict": sd}
        elif fmt == "pt_module_prefix":  # DDP-wrapped state dicts
            sd = {"module." + k: v for k, v in sd.items()}
        torch.save(sd, path)
    loaded = load_clip(TINY, checkpoint=str(path))
    assert isinstance(loaded, LoadedModel)
    assert loaded.model_name == TINY and loaded.pretrained is None and loaded.checkpoint == str(path)
    assert not loaded.model.training
    _assert_same_state(src, loaded.model)
    assert _acts(loaded.model) == {nn.GELU} and loaded.quick_gelu is False

    tokens = loaded.tokenizer(["a photo of a cat.", "a dog"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 16)
    from PIL import Image

    x = loaded.preprocess(Image.new("RGB", (50, 40), (10, 200, 30)))
    assert x.shape == (3, 32, 32)
    with torch.no_grad():
        img = loaded.model.encode_image(x[None])
        ref = src.encode_image(x[None])
    assert torch.equal(img, ref)


def test_checkpoint_with_quick_gelu(tmp_path):
    src = _random_model(quick_gelu=True)
    path = tmp_path / "tiny.pt"
    torch.save(src.state_dict(), path)
    loaded = load_clip(TINY, checkpoint=path, quick_gelu=True)
    assert _acts(loaded.model) == {QuickGELU} and loaded.quick_gelu is True
    _assert_same_state(src, loaded.model)


def test_openai_named_checkpoint_warns(tmp_path):
    path = tmp_path / "ViT-tiny-openai.pt"
    torch.save(_random_model().state_dict(), path)
    with pytest.warns(UserWarning, match="QuickGELU"):
        loaded = load_clip(TINY, checkpoint=path)
    assert _acts(loaded.model) == {nn.GELU}  # warned, not silently changed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_clip(TINY, checkpoint=path, quick_gelu=True)  # explicit choice: no warning


def _nested_holder(sd: dict) -> nn.Module:
    """A module tree whose state_dict keys are exactly ``sd``'s (buffers at dotted paths)."""
    root = nn.Module()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_buffer(leaf, value.clone())
    root.forward = lambda x: x  # noqa: E731 - trace needs a forward; the archive just carries the tensors
    return root


def test_torchscript_archive_checkpoint(tmp_path):
    """OpenAI's original .pt files are TorchScript archives (with int buffers input_resolution, context_length,
    vocab_size), which open_clip's torch.load(weights_only=True) refuses."""
    src = _random_model()
    sd = dict(src.state_dict())
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(16), vocab_size=torch.tensor(49408))
    path = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(_nested_holder(sd), torch.zeros(1), check_trace=False).save(str(path))
        with pytest.raises(RuntimeError, match="weights_only"):  # why the special path exists
            open_clip.load_checkpoint(open_clip.create_model(TINY), str(path))
        assert loading._is_torchscript(path)
        loaded = load_clip(TINY, checkpoint=path)
    _assert_same_state(src, loaded.model)
    assert not loading._is_torchscript(tmp_path / "nope.safetensors")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_clip(TINY, checkpoint=str(tmp_path / "nope.pt"))


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError) as ei:
        load_clip(TINY, checkpoint=path)
    assert TINY in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_wrong_architecture_checkpoint(tmp_path, suffix):
    sd = _random_model(TINY_WIDE).state_dict()
    path = tmp_path / f"wide{suffix}"
    if suffix == ".pt":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(ModelLoadError, match=f"does not match model {TINY}") as ei:
        load_clip(TINY, checkpoint=path)
    assert "\n" not in str(ei.value)


def test_checkpoint_with_missing_keys(tmp_path):
    sd = _random_model().state_dict()
    sd.pop("text_projection")
    path = tmp_path / "partial.pt"
    torch.save(sd, path)
    with pytest.raises(ModelLoadError, match="text_projection"):
        load_clip(TINY, checkpoint=path)


# ---------------------------------------------------------------- QuickGELU decision
def test_needs_quick_gelu():
    assert needs_quick_gelu("ViT-B-32", "openai") is True
    assert needs_quick_gelu("ViT-B-32", "OpenAI") is True  # open_clip normalises tags
    assert needs_quick_gelu("ViT-B-32-quickgelu", "openai") is False  # config already uses QuickGELU
    assert needs_quick_gelu("ViT-B-32", "laion2b_s34b_b79k") is False
    assert needs_quick_gelu("ViT-B-32", "laion400m_e31") is True  # open_clip marks these QuickGELU-trained too
    assert needs_quick_gelu("ViT-B-16", "openai") is True
    assert needs_quick_gelu("ViT-B-32", None) is False


@pytest.fixture
def fake_tags(tmp_path, monkeypatch):
    """Pretrained tags for TINY whose 'download' is a local file (open_clip returns cfg['file'] as the path), so
    the whole tag path runs without network."""
    qg_src, gelu_src = _random_model(quick_gelu=True, seed=1), _random_model(seed=2)
    torch.save(qg_src.state_dict(), tmp_path / "qg.pt")
    torch.save(gelu_src.state_dict(), tmp_path / "gelu.pt")
    tags = {
        "openai": {"file": str(tmp_path / "qg.pt"), "quick_gelu": True},
        "laion_fake": {"file": str(tmp_path / "gelu.pt")},
        "offline": {"hf_hub": "nobody/nothing/", "url": ""},
    }
    monkeypatch.setitem(oc_pretrained._PRETRAINED, TINY, tags)
    return qg_src, gelu_src


def test_pretrained_openai_forces_quick_gelu(fake_tags):
    qg_src, _ = fake_tags
    assert needs_quick_gelu(TINY, "openai") is True
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        loaded = load_clip(TINY, pretrained="openai")
    msgs = [str(w.message) for w in rec]
    assert any("forcing QuickGELU" in m for m in msgs)
    assert not any("QuickGELU mismatch" in m for m in msgs)  # open_clip's own check is satisfied
    assert _acts(loaded.model) == {QuickGELU} and loaded.quick_gelu is True and loaded.pretrained == "openai"
    _assert_same_state(qg_src, loaded.model)


def test_pretrained_gelu_tag_keeps_gelu(fake_tags):
    _, gelu_src = fake_tags
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_clip(TINY, pretrained="laion_fake")
    assert _acts(loaded.model) == {nn.GELU} and loaded.quick_gelu is False
    _assert_same_state(gelu_src, loaded.model)


def test_pretrained_explicit_false_is_honoured_with_warning(fake_tags):
    with pytest.warns(UserWarning, match="degraded"):
        loaded = load_clip(TINY, pretrained="openai", quick_gelu=False)
    assert _acts(loaded.model) == {nn.GELU}


def test_pretrained_download_failure_is_model_load_error(fake_tags, monkeypatch):
    def boom(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(factory, "download_pretrained", boom)
    with pytest.raises(ModelLoadError, match="offline") as ei:
        load_clip(TINY, pretrained="offline")
    assert "\n" not in str(ei.value)


# ---------------------------------------------------------------- bad options
def test_unknown_model():
    with pytest.raises(ConfigError, match="unknown model") as ei:
        load_clip("ViT-B-33")
    assert "ViT-B-32" in str(ei.value)


def test_unknown_pretrained_tag_no_download(monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("download attempted")

    monkeypatch.setattr(factory, "download_pretrained", no_download)
    monkeypatch.setattr(factory, "create_model", no_download)
    with pytest.raises(ConfigError, match="laion2b_s34b_b79k") as ei:
        load_clip("ViT-B-32", pretrained="not_a_tag")
    assert "openai" in str(ei.value)
    with pytest.raises(ConfigError, match="no open_clip pretrained weights"):
        load_clip(TINY, pretrained="openai")


def test_non_vit_towers_rejected_before_building(monkeypatch):
    monkeypatch.setattr(factory, "create_model", lambda *a, **k: pytest.fail("built a model"))
    with pytest.raises(ConfigError, match="only ViT towers are supported"):
        load_clip(TINY_RESNET)
    with pytest.raises(ConfigError, match="only ViT towers are supported"):
        load_clip("RN50", pretrained="openai")
    with pytest.raises(ConfigError, match="only ViT towers are supported"):
        load_clip("coca_ViT-B-32")


def test_post_build_tower_check():
    model = open_clip.create_model(TINY_RESNET)
    with pytest.raises(ConfigError, match="only ViT towers are supported"):
        loading.check_supported_model(model, TINY_RESNET)
    loading.check_supported_model(_random_model(), TINY)  # passes


def test_bad_option_combinations(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        load_clip(TINY, pretrained="openai", checkpoint=str(tmp_path / "x.pt"))
    with pytest.raises(ConfigError, match="precision"):
        load_clip(TINY, precision="int3")


def test_random_init_when_no_weights():
    loaded = load_clip(TINY)
    assert loaded.pretrained is None and loaded.checkpoint is None and not loaded.model.training


def test_reference_model_delegates():
    pytest.importorskip("p4q_engine.reference.model")
    from p4q_engine.reference.model import DEFAULT_CHECKPOINT, REFERENCE_MODEL_NAME

    assert loading.REFERENCE_MODEL_NAME == REFERENCE_MODEL_NAME
    with pytest.raises(ConfigError, match="no pretrained tags"):
        load_clip(REFERENCE_MODEL_NAME, pretrained="openai")
    if not DEFAULT_CHECKPOINT.is_file():
        pytest.skip("reference weights not committed yet")
    loaded = load_clip(REFERENCE_MODEL_NAME)
    assert loaded.model_name == REFERENCE_MODEL_NAME and not loaded.model.training
    tokens = loaded.tokenizer(["a photo of a red circle."])
    assert tokens.dtype == torch.long and tokens.shape[0] == 1


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("pure_bf16", torch.bfloat16)])
def test_precision(tmp_path, precision, dtype):
    path = tmp_path / "tiny.pt"
    torch.save(_random_model().state_dict(), path)
    loaded = load_clip(TINY, checkpoint=path, precision=precision)
    assert loaded.model.visual.transformer.resblocks[0].mlp.c_fc.weight.dtype == dtype
    sd = dict(_random_model().state_dict())
    sd["input_resolution"] = torch.tensor(32)
    jit = tmp_path / "jit.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(_nested_holder(sd), torch.zeros(1), check_trace=False).save(str(jit))
        loaded_jit = load_clip(TINY, checkpoint=jit, precision=precision)
    for (k, a), b in zip(loaded.model.state_dict().items(), loaded_jit.model.state_dict().values()):
        assert a.dtype == b.dtype, k
