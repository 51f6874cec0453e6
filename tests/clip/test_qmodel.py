"""QuantCLIP on a tiny randomly initialised open_clip ViT CLIP: float equivalence, scopes, calibration, gradients."""

import copy
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from p4q_engine.clip.attention import QuantMultiheadAttention
from p4q_engine.clip.calibrate import calibrate
from p4q_engine.clip.qmodel import QuantCLIP
from p4q_engine.clip.recipe import QuantRecipe
from p4q_engine.errors import CalibrationError, ConfigError
from p4q_engine.quant.modules import ActQuantizer, QuantConv2d, QuantEmbedding, QuantLinear, QuantMode


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: on a shared 2-core box, OpenMP threads waiting for each other cost ~16 ms per op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MODEL_NAME = "P4QTest-TinyCLIP"
CONTEXT, VOCAB, EOT = 16, 100, 99
TINY_CFG = {
    "embed_dim": 32,
    # open_clip derives the vision heads from head_width: 64 / 32 = 2 heads
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    cfg_dir = tmp_path_factory.mktemp("model_configs")
    (cfg_dir / f"{MODEL_NAME}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(1234)
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    with torch.no_grad():  # non-trivial biases / layer norms, so a dropped term shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln"):
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    assert model.visual.transformer.resblocks[0].attn.num_heads == 2
    return model


def _images(seed: int, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _tokens(seed: int, n: int = 8) -> torch.Tensor:
    """Random token ids with exactly one EOT (the max id) per row, zero padding after it."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.zeros(n, CONTEXT, dtype=torch.long)
    lengths = torch.randint(2, CONTEXT - 1, (n,), generator=g)
    for i, length in enumerate(lengths.tolist()):
        toks[i, :length] = torch.randint(1, EOT, (length,), generator=g)
        toks[i, length] = EOT
    return toks


_CACHE: dict = {}


def _calibrated(model, bits: str, scope: str = "full", observer: str = "omse") -> QuantCLIP:
    key = (id(model), bits, scope, observer)
    if key not in _CACHE:
        q = QuantCLIP(model, QuantRecipe(bits, scope=scope, observer=observer))
        calibrate(q, [_images(100, 4), _images(101, 4)], _tokens(200, 8), progress=False)
        _CACHE[key] = q
    return _CACHE[key]


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=-1).mean())


# ----------------------------------------------------------------------------------------------- float
def test_fp32_equals_open_clip(tiny_model):
    q = QuantCLIP(tiny_model, "fp32")
    assert q.is_float and list(q.act_quantizers()) == []
    images, tokens = _images(1), _tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(q.encode_image(images), tiny_model.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(q.encode_text(tokens), tiny_model.encode_text(tokens), rtol=0, atol=1e-5)
        torch.testing.assert_close(
            q.encode_image(images, normalize=True), tiny_model.encode_image(images, normalize=True), rtol=0, atol=1e-5
        )
        img = tiny_model.encode_image(images, normalize=True)
        txt = tiny_model.encode_text(tokens, normalize=True)
        torch.testing.assert_close(q(images, tokens), tiny_model.logit_scale.exp() * img @ txt.T, rtol=1e-5, atol=1e-4)
    # calibrate is a no-op for the float model
    assert calibrate(q, [images], progress=False) is q


def test_fp32_encode_text_embeddings_equals_encode_text(tiny_model):
    q = QuantCLIP(tiny_model, "fp32")
    tokens = _tokens(3)
    with torch.no_grad():
        direct = q.encode_text(tokens)
        via_emb = q.encode_text_embeddings(q.embed_tokens(tokens), q.pool_index(tokens))
    assert torch.equal(q.pool_index(tokens), (tokens == EOT).int().argmax(dim=-1))
    torch.testing.assert_close(via_emb, direct, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", ["fp32", "4-4-8"])
def test_original_model_not_modified(tiny_model, bits):
    images, tokens = _images(4), _tokens(5)
    with torch.no_grad():
        before_img, before_txt = tiny_model.encode_image(images), tiny_model.encode_text(tokens)
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    q = QuantCLIP(tiny_model, bits)
    assert q.visual is not tiny_model.visual
    assert isinstance(tiny_model.visual.proj, nn.Parameter)
    assert type(tiny_model.visual.conv1) is nn.Conv2d
    assert type(tiny_model.token_embedding) is nn.Embedding
    for blk in list(tiny_model.visual.transformer.resblocks) + list(tiny_model.transformer.resblocks):
        assert type(blk.attn) is nn.MultiheadAttention
        assert type(blk.mlp.c_fc) is nn.Linear
    assert state.keys() == tiny_model.state_dict().keys()
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        assert torch.equal(tiny_model.encode_image(images), before_img)
        assert torch.equal(tiny_model.encode_text(tokens), before_txt)


# ----------------------------------------------------------------------------------------------- quantized accuracy
def test_8bit_close_to_float_and_2bit_clearly_worse(tiny_model):
    images, tokens = _images(6, 16), _tokens(7, 16)
    with torch.no_grad():
        fi, ft = tiny_model.encode_image(images), tiny_model.encode_text(tokens)
        cos = {}
        for bits in ("8-8-8", "2-2-8"):
            q = _calibrated(tiny_model, bits)
            qi, qt = q.encode_image(images), q.encode_text(tokens)
            assert torch.isfinite(qi).all() and torch.isfinite(qt).all()
            cos[bits] = (_mean_cos(qi, fi), _mean_cos(qt, ft))
    assert cos["8-8-8"][0] > 0.99 and cos["8-8-8"][1] > 0.99, cos
    # 2 bits: cosine distance to float at least 20x that of 8 bits, and a clear absolute drop.
    for tower, margin in ((0, 0.005), (1, 0.05)):
        assert 1 - cos["2-2-8"][tower] > 20 * (1 - cos["8-8-8"][tower]), cos
        assert cos["2-2-8"][tower] < cos["8-8-8"][tower] - margin, cos
    # 8-bit is not simply the float model: quantization did something.
    q8 = _calibrated(tiny_model, "8-8-8")
    with torch.no_grad():
        assert not torch.allclose(q8.encode_image(images), fi, atol=1e-6)


def test_quantized_forward_logits_consistent(tiny_model):
    q = _calibrated(tiny_model, "8-8-8")
    images, tokens = _images(8, 4), _tokens(9, 5)
    with torch.no_grad():
        logits = q(images, tokens)
        expected = (
            q.logit_scale.exp()
            * F.normalize(q.encode_image(images), dim=-1)
            @ F.normalize(q.encode_text(tokens), dim=-1).T
        )
    assert logits.shape == (4, 5)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- scopes
def _block_linears(blk):
    return [blk.attn.in_proj, blk.attn.out_proj, blk.mlp.c_fc, blk.mlp.c_proj]


def _all_blocks(q: QuantCLIP):
    return list(q.visual.transformer.resblocks) + list(q.transformer.resblocks)


def _attn_quantizers(attn: QuantMultiheadAttention):
    return [attn.q_quant, attn.k_quant, attn.v_quant, attn.p_quant]


@pytest.mark.parametrize("bits", ["4-4-8", "2-2-8", "3-3-8"])
def test_release_scope_sites(tiny_model, bits):
    w = int(bits[0])
    q = QuantCLIP(tiny_model, QuantRecipe(bits, scope="release"))
    assert isinstance(q.visual.conv1, QuantConv2d)
    assert q.visual.conv1.w_spec.bits == w and q.visual.conv1.w_spec.signed
    assert q.visual.conv1.input_quant.spec.bits == w and not q.visual.conv1.input_quant.spec.signed
    blocks = _all_blocks(q)
    assert len(blocks) == 4
    for blk in blocks:
        assert isinstance(blk.attn, QuantMultiheadAttention)
        for lin in _block_linears(blk):
            assert isinstance(lin, QuantLinear)
            assert lin.w_spec.bits == 8 and lin.w_spec.per_channel
            assert lin.input_quant.spec.bits == 8
        for aq in _attn_quantizers(blk.attn):
            assert not aq.enabled
    assert q.token_embedding.w_spec.bits == 8 and q.text_input_quant.spec.bits == 8
    assert q.image_proj.w_spec.bits == 8 and q.text_proj.w_spec.bits == 8


@pytest.mark.parametrize("bits", ["4-4-8", "2-2-8", "3-3-8", "4-8-8", "8-8-4"])
def test_full_scope_sites(tiny_model, bits):
    w, a, t = (int(b) for b in bits.split("-"))
    q = QuantCLIP(tiny_model, QuantRecipe(bits, scope="full"))
    assert q.visual.conv1.w_spec.bits == 8 and q.visual.conv1.input_quant.spec.bits == 8
    for blk in _all_blocks(q):
        for lin in _block_linears(blk):
            assert lin.w_spec.bits == w and lin.w_spec.signed and lin.w_spec.per_channel
            assert lin.input_quant.spec.bits == a and not lin.input_quant.spec.signed
        for aq in _attn_quantizers(blk.attn):
            assert aq.enabled and aq.spec.bits == t and not aq.spec.per_channel
    assert isinstance(q.token_embedding, QuantEmbedding) and q.token_embedding.w_spec.bits == 8
    assert isinstance(q.image_proj, QuantLinear) and q.image_proj.w_spec.bits == 8
    assert isinstance(q.text_proj, QuantLinear) and q.text_proj.w_spec.bits == 8
    # per block: 4 Linear inputs + q, k, v, probabilities
    n_blocks = len(_all_blocks(q))
    assert len(list(q.act_quantizers())) == n_blocks * 8 + 1 + 1 + 2  # + conv1 input, text input, two projections


def test_fp32_has_no_quantized_sites(tiny_model):
    q = QuantCLIP(tiny_model, "fp32")
    for mod in q.modules():
        if isinstance(mod, (QuantLinear, QuantConv2d, QuantEmbedding)):
            assert mod.w_spec is None
        if isinstance(mod, ActQuantizer):
            assert not mod.enabled


@pytest.mark.parametrize("scope", ["full", "release"])
def test_every_act_quantizer_calibrated(tiny_model, scope):
    q = _calibrated(tiny_model, "4-4-8", scope=scope, observer="minmax")
    sites = list(q.act_quantizers())
    assert len(sites) > 10
    for name, aq in sites:
        assert aq.calibrated, name
        assert aq.mode is QuantMode.QUANT, name
        assert torch.isfinite(aq.scale).all() and (aq.scale > 0).all(), name
    # Frozen parameters do not change when more data is fed.
    scales = {n: aq.scale.clone() for n, aq in sites}
    with torch.no_grad():
        q.encode_image(_images(10) * 5)
        q.encode_text(_tokens(11))
    for name, aq in q.act_quantizers():
        assert torch.equal(aq.scale, scales[name]), name


def test_set_quant_mode_off_recovers_weight_only_model(tiny_model):
    q = copy.deepcopy(_calibrated(tiny_model, "8-8-8", observer="minmax"))
    images = _images(12, 4)
    with torch.no_grad():
        on = q.encode_image(images)
        q.set_quant_mode("off")
        off = q.encode_image(images)
        q.set_quant_mode(QuantMode.QUANT)
        on2 = q.encode_image(images)
    assert torch.equal(on, on2)
    assert not torch.equal(on, off)


@pytest.mark.parametrize("scope", ["full", "release"])
def test_calibrate_without_text_tokens_raises(tiny_model, scope):
    q = QuantCLIP(tiny_model, QuantRecipe("4-4-8", scope=scope, observer="minmax"))
    with pytest.raises(CalibrationError):
        calibrate(q, [_images(13, 2)], None, progress=False)


def test_calibrate_without_images_raises(tiny_model):
    q = QuantCLIP(tiny_model, QuantRecipe("8-8-8", observer="minmax"))
    with pytest.raises(CalibrationError):
        calibrate(q, [], _tokens(14), progress=False)


def test_calibrate_accepts_image_label_batches_and_num_batches(tiny_model):
    q = QuantCLIP(tiny_model, QuantRecipe("8-8-8", observer="minmax"))
    batches = [(_images(15, 2), torch.zeros(2)), (_images(16, 2), torch.zeros(2)), (_images(17, 2) * 100, None)]
    calibrate(q, batches, _tokens(18, 4), num_batches=2, progress=False, text_batch_size=3)
    # the third (x100) batch was not seen: the conv input range reflects only the first two
    conv_q = q.visual.conv1.input_quant
    span = float(conv_q.scale) * 255
    lo = float(torch.cat([_images(15, 2), _images(16, 2)]).min())
    hi = float(torch.cat([_images(15, 2), _images(16, 2)]).max())
    assert span == pytest.approx(hi - lo, rel=1e-4)


# ----------------------------------------------------------------------------------------------- gradients
def test_prompt_gradient_through_quantized_text_tower(tiny_model):
    q = _calibrated(tiny_model, "4-4-8", observer="minmax")
    tokens = _tokens(19, 4)
    x = q.embed_tokens(tokens).detach().requires_grad_()
    feats = q.encode_text_embeddings(x, q.pool_index(tokens), normalize=True)
    target = F.normalize(torch.randn(4, feats.shape[-1], generator=torch.Generator().manual_seed(20)), dim=-1)
    (feats * target).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert float(x.grad.abs().sum()) > 0
    # Positions before the EOT (causal mask) receive gradient; the model weights stay frozen.
    assert all(not p.requires_grad or p.grad is None for p in q.parameters())
    assert float(x.grad[:, 0].abs().sum()) > 0


# ----------------------------------------------------------------------------------------------- unsupported models
class _StubVisual(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Identity()

    def forward(self, x):
        return self.body(x)


def test_non_vit_visual_raises(tiny_model):
    model = copy.deepcopy(tiny_model)
    model.visual = _StubVisual()
    with pytest.raises(ConfigError):
        QuantCLIP(model, "8-8-8")
    with pytest.raises(ConfigError):
        QuantCLIP(model, "fp32")


def test_model_without_visual_raises():
    with pytest.raises(ConfigError):
        QuantCLIP(nn.Linear(2, 2), "8-8-8")


@pytest.mark.parametrize("kwargs", [{"scope": "everything"}, {"observer": "mse"}, {"bits": "5-5-8"}, {"edge_bits": 6}])
def test_bad_recipe_raises(kwargs):
    with pytest.raises(ConfigError):
        QuantRecipe(**kwargs)


# ----------------------------------------------------------------------------------------------- observer_kwargs
def test_observer_kwargs_reach_every_activation_quantizer(tiny_model):
    recipe = QuantRecipe("4-4-8", observer="percentile", observer_kwargs={"percentile": 99.0})
    q = QuantCLIP(tiny_model, recipe)
    sites = list(q.act_quantizers())
    assert len(sites) > 10
    for name, aq in sites:
        assert aq.observer_kwargs == {"percentile": 99.0}, name
        assert aq.observer.percentile == 99.0, name
    calibrate(q, [_images(100, 4), _images(101, 4)], _tokens(200, 8), progress=False)
    default = _calibrated(tiny_model, "4-4-8", observer="percentile")  # percentile 99.99
    scales = dict(default.act_quantizers())
    changed = [name for name, aq in q.act_quantizers() if not torch.equal(aq.scale, scales[name].scale)]
    # Clipping at the 99th instead of the 99.99th percentile narrows the range of (nearly) every site; the input
    # image (patch embedding), the text input and the final projections are among them.
    assert len(changed) >= 0.9 * len(sites)
    for name in ("visual.conv1.input_quant", "text_input_quant", "image_proj.input_quant", "text_proj.input_quant"):
        assert name in changed
        assert float(dict(q.act_quantizers())[name].scale) < float(scales[name].scale)
    # The artifact's manifest records the keywords the activation ranges were calibrated with.
    from p4q_engine.artifact.fold import fold

    with torch.no_grad():
        feats = q.encode_text(_tokens(300, 3))
    art = fold(q, feats, ["a", "b", "c"], {"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3})
    assert art.manifest["model"]["recipe"]["observer_kwargs"] == {"percentile": 99.0}
    pre = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
    assert "observer_kwargs" not in fold(default, feats, ["a", "b", "c"], pre).manifest["model"]["recipe"]


def test_observer_kwargs_recipe_is_hashable_and_owns_its_dict():
    kw = {"percentile": 99.0}
    r = QuantRecipe("4-4-8", observer="percentile", observer_kwargs=kw)
    kw["percentile"] = 60.0  # the caller's dict is not the recipe's
    assert r.observer_kwargs == {"percentile": 99.0}
    r2 = QuantRecipe("4-4-8", observer="percentile", observer_kwargs={"percentile": 99.0})
    assert r == r2 and hash(r) == hash(r2) and len({r, r2}) == 1
    assert r != QuantRecipe("4-4-8", observer="percentile")
    assert hash(QuantRecipe()) == hash(QuantRecipe())


def test_recipe_name_tells_different_recipes_apart():
    """Defaults keep the short name; every non-default setting shows, so different recipes never share a name."""
    assert QuantRecipe("4-4-8", observer="omse").name == "4-4-8/full/omse"
    names = {
        QuantRecipe("4-4-8", observer="percentile").name,
        QuantRecipe("4-4-8", observer="percentile", observer_kwargs={"percentile": 99.0}).name,
        QuantRecipe("4-4-8", observer="percentile", edge_bits=4).name,
        QuantRecipe("4-4-8", observer="percentile", per_channel_act=True).name,
    }
    assert len(names) == 4
    assert "percentile=99.0" in QuantRecipe("4-4-8", observer="percentile", observer_kwargs={"percentile": 99.0}).name


@pytest.mark.parametrize("kwargs", [{"percentile": 10.0}, {"no_such_option": 1}])
def test_bad_observer_kwargs_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        QuantRecipe("4-4-8", observer="percentile", observer_kwargs=kwargs)
