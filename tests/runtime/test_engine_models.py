"""Random open_clip models of odd shapes and options, built through ``load_clip``, folded and run by the CPU engine.

The main engine tests use one tiny ViT (width 64, heads of 32, MLP ratio 4, token pooling, ``ln_pre``, GELU), so a
shape or an option the engine gets wrong elsewhere would pass them. Each config here switches on open_clip
``VisionTransformer`` features the engine claims to execute: a width that is not a multiple of 64 with 5 heads, MLP
ratios 2.5 and 3, patch 6 on a 30 px image (a 5x5 grid), average pooling (open_clip averages the patch tokens only,
``x[:, 1:].mean(1)``), layer scale, QuickGELU, no ``ln_pre``, LayerNorm after pooling, tanh GELU and a non-default
LayerNorm eps - alone and combined. Every model is built by the project's entry point (``load_clip``, so its
supported-model checks run), quantized (8-8-8 and 4-4-8, full scope), calibrated, folded, saved, loaded by
:class:`Engine` and compared with the fake-quant model under the repo's parity rule: every image whose top-1 or
logits (beyond ``NOISE``) differ must trace to a float tie (:mod:`p4q_engine.runtime.divergence`).

Random open_clip init leaves every LayerNorm at weight 1 / bias 0 and every layer scale constant, which would hide
an engine that applies the wrong LayerNorm or drops a per-channel scale; :func:`_perturb` makes them random, as in
trained weights. The mutation tests at the end break the engine's handling of each option and check the parity
assertion catches it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import LayerScale
from torch import nn

from p4q_engine.artifact.export import preprocess_config
from p4q_engine.artifact.fold import fold
from p4q_engine.artifact.format import save
from p4q_engine.clip.calibrate import calibrate
from p4q_engine.clip.loading import load_clip
from p4q_engine.clip.qmodel import QuantCLIP, quantize_clip
from p4q_engine.clip.recipe import QuantRecipe
from p4q_engine.runtime.divergence import trace_disagreements
from p4q_engine.runtime.engine import Engine

#: Logit difference of two evaluations with identical codes everywhere: float32 noise of a scaled cosine (~1e-5).
NOISE = 1e-3
OBSERVER = "minmax"  # calibrates in milliseconds; the engine executes whatever qparams were frozen
BITS = ("8-8-8", "4-4-8")
NUM_CLASSES = 10
CLASSNAMES = [f"class {i}" for i in range(NUM_CLASSES)]
TEXT_CFG = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
EOT_ID = 99  # the largest id, so argmax pooling finds it

#: open_clip configs: ``vision_cfg`` (``CLIPVisionCfg`` keys; heads = width // head_width) and top-level ``quick_gelu``.
MODELS: dict[str, dict[str, Any]] = {
    # width 40 (not a multiple of 64), 5 heads of 8, MLP 100 (ratio 2.5), patch 6 on 30 px: a 5x5 grid
    "odd-width": {
        "vision_cfg": {"image_size": 30, "patch_size": 6, "width": 40, "head_width": 8, "layers": 2, "mlp_ratio": 2.5}
    },
    # average pooling alone (LayerNorm before the pool, as open_clip does by default)
    "avg-pool": {
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 40, "head_width": 8, "layers": 2, "pool_type": "avg"}
    },
    # average pooling + LayerNorm after the pool (only then does the order matter) + no ln_pre + layer scale
    "avg-final-ln-no-ln-pre-ls": {
        "vision_cfg": {
            "image_size": 30,
            "patch_size": 6,
            "width": 40,
            "head_width": 8,
            "layers": 2,
            "mlp_ratio": 3,
            "pool_type": "avg",
            "final_ln_after_pool": True,
            "no_ln_pre": True,
            "ls_init_value": 0.1,
        }
    },
    # QuickGELU (both towers) + layer scale + width 80 in 5 heads of 16 + MLP ratio 3 + no ln_pre
    "quickgelu-ls-w80": {
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": 30,
            "patch_size": 6,
            "width": 80,
            "head_width": 16,
            "layers": 1,
            "mlp_ratio": 3,
            "ls_init_value": 0.1,
            "no_ln_pre": True,
        },
    },
    # token pooling with LayerNorm after the pool (a no-op reorder for tok, but its own engine branch), tanh GELU
    # and LayerNorm eps 1e-6
    "tok-final-ln-tanh-eps": {
        "vision_cfg": {
            "image_size": 32,
            "patch_size": 8,
            "width": 40,
            "head_width": 8,
            "layers": 2,
            "mlp_ratio": 2.5,
            "final_ln_after_pool": True,
            "act_kwargs": {"approximate": "tanh"},
            "norm_kwargs": {"eps": 1e-6},
        }
    },
}
#: What the folded manifest must say for each config (the engine branches on these).
EXPECTED_VISION = {
    "odd-width": {"width": 40, "heads": 5, "mlp_width": 100, "grid_size": [5, 5], "pool_type": "tok", "ln_pre": True},
    "avg-pool": {"width": 40, "heads": 5, "mlp_width": 160, "pool_type": "avg", "final_ln_after_pool": False},
    "avg-final-ln-no-ln-pre-ls": {
        "heads": 5,
        "mlp_width": 120,
        "grid_size": [5, 5],
        "pool_type": "avg",
        "final_ln_after_pool": True,
        "ln_pre": False,
        "layer_scale": True,
    },
    "quickgelu-ls-w80": {
        "width": 80,
        "heads": 5,
        "mlp_width": 240,
        "act": "quick_gelu",
        "layer_scale": True,
        "ln_pre": False,
    },
    "tok-final-ln-tanh-eps": {"pool_type": "tok", "final_ln_after_pool": True, "act": "gelu_tanh", "ln_eps": 1e-6},
}
PREFIX = "P4Q-Test-Engine-Models-"
#: Seed of the random weights: chosen so that every config's fake-quant top-1 varies across the test images.
MODEL_SEED = 2


@pytest.fixture(scope="module", autouse=True)
def single_torch_thread():
    """Tiny models run far faster single-threaded, and CI boxes are shared: avoid oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_names(tmp_path_factory) -> dict[str, str]:
    """Register every config with open_clip (so ``load_clip`` finds it by name) and return the names."""
    d = tmp_path_factory.mktemp("engine_model_cfgs")
    names = {}
    for key, extra in MODELS.items():
        name = PREFIX + key
        (d / f"{name}.json").write_text(json.dumps({"embed_dim": 24, "text_cfg": TEXT_CFG, **extra}))
        names[key] = name
    open_clip.add_model_config(d)
    return names


def _perturb(model: nn.Module, seed: int) -> None:
    """Make the random tower look more like a trained one: random LayerNorm affines and per-channel layer scales
    (open_clip's init makes them constant, which would hide a wrong or dropped one) and q/k weights x3, so attention
    is peaked and the class token depends on the image (near-uniform attention averages the image away)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.visual.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, LayerScale):
                m.gamma.mul_(1.5 + 4.5 * torch.rand(m.gamma.shape, generator=g))  # 0.1 -> 0.15 .. 0.6 per channel
        for blk in model.visual.transformer.resblocks:
            blk.attn.in_proj_weight[: 2 * blk.attn.embed_dim].mul_(3)


def _model(name: str) -> nn.Module:
    """The model through the project's entry point (its supported-model checks run), then :func:`_perturb`."""
    torch.manual_seed(MODEL_SEED)
    m = load_clip(name).model
    _perturb(m, seed=3)
    return m


def _tokens() -> torch.Tensor:
    """Random ids 1..97, the EOT id at a per-row position, zeros after."""
    g = torch.Generator().manual_seed(1)
    tok = torch.zeros(NUM_CLASSES, TEXT_CFG["context_length"], dtype=torch.long)
    for i in range(NUM_CLASSES):
        n = 3 + i
        tok[i, :n] = torch.randint(1, 98, (n,), generator=g)
        tok[i, n] = EOT_ID
    return tok


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@dataclass
class Built:
    """A calibrated fake-quant model and the engine running its folded, saved artifact."""

    key: str
    qmodel: QuantCLIP
    engine: Engine
    path: Path
    image_size: int

    def reference_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quant logits against the (8-bit) class features the engine holds."""
        with torch.no_grad():
            z = self.qmodel.encode_image(x)
        return F.normalize(z, dim=-1) @ self.engine.text.T * self.engine.logit_scale


@pytest.fixture(scope="module")
def build(model_names, tmp_path_factory) -> Callable[[str, str], Built]:
    """Factory ``build(key, bits)``: load_clip, perturb, quantize, calibrate, fold, save, Engine.load (cached)."""
    root = tmp_path_factory.mktemp("engine_model_artifacts")
    models: dict[str, nn.Module] = {}
    cache: dict[tuple[str, str], Built] = {}
    tok = _tokens()

    def get(key: str, bits: str) -> Built:
        if key not in models:
            models[key] = _model(model_names[key])
        if (key, bits) not in cache:
            model = models[key]
            size = model.visual.image_size[0]
            q = quantize_clip(model, QuantRecipe(bits, scope="full", observer=OBSERVER))
            calibrate(q, [_images(32, size, seed=2)], tok, progress=False)
            with torch.no_grad():
                tf = F.normalize(q.encode_text(tok), dim=-1)
            path = root / f"{key}_{bits}.p4q"
            save(fold(q, tf, CLASSNAMES, preprocess_config(model), meta={"name": model_names[key]}), path)
            cache[(key, bits)] = Built(key, q, Engine.load(path), path, size)
        return cache[(key, bits)]

    return get


def untied(b: Built, x: torch.Tensor, engine: Engine | None = None) -> tuple[list[dict], torch.Tensor]:
    """Engine vs fake-quant on ``x``: the differences that are not traced float ties, and the reference logits."""
    eng = engine or b.engine
    ref = b.reference_logits(x)
    out = eng.logits(x)
    assert out.shape == ref.shape == (len(x), NUM_CLASSES) and torch.isfinite(out).all()
    traces = trace_disagreements(eng, b.qmodel.encode_image, x, out, ref, noise=NOISE)
    return [t for t in traces if not t["tie"]], ref


def assert_not_degenerate(ref: torch.Tensor) -> None:
    """The logits vary across classes and across images, so agreeing on them means something."""
    assert float(ref.std()) > 0.1
    assert float((ref - ref.mean(dim=0)).std()) > 0.1  # the image-dependent part
    assert len(set(ref.argmax(dim=1).tolist())) >= 2


# ------------------------------------------------------------------ parity
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("key", list(MODELS))
def test_engine_matches_fake_quant(build, key, bits):
    """Each odd config, folded and run by the CPU engine, computes what the fake-quant model computes."""
    b = build(key, bits)
    for k, v in EXPECTED_VISION[key].items():  # the options reached the artifact (else the test checks nothing new)
        assert b.engine.cfg[k] == v, (k, b.engine.cfg[k], v)
    bad, ref = untied(b, _images(64, b.image_size, seed=1000))  # fresh: not the calibration images
    assert_not_degenerate(ref)
    assert not bad, f"{len(bad)} of 64 images differ without a float tie; first: {bad[0]!r}"


def test_float_models_match_open_clip(model_names):
    """The perturbed open_clip model and its fp32 QuantCLIP agree: the reference itself follows open_clip."""
    for key, name in model_names.items():
        m = _model(name)
        q = quantize_clip(m, QuantRecipe("fp32"))
        x = _images(4, m.visual.image_size[0], seed=5)
        with torch.no_grad():
            assert torch.allclose(q.encode_image(x), m.encode_image(x), atol=1e-5), key


# ------------------------------------------------------------------ the parity check catches a wrong engine
def _mutate_avg_with_class_token(eng: Engine) -> None:
    eng._pool = lambda x: x.mean(dim=1) if eng.cfg["pool_type"] == "avg" else x[:, 0]


def _mutate_ln_order(eng: Engine) -> None:
    eng.cfg = {**eng.cfg, "final_ln_after_pool": not eng.cfg["final_ln_after_pool"]}


def _mutate_drop_layer_scale(eng: Engine) -> None:
    eng.blocks[-1].ls_2 = None


def _mutate_layer_scale_to_scalar(eng: Engine) -> None:
    for blk in eng.blocks:
        blk.ls_1, blk.ls_2 = blk.ls_1.mean(), blk.ls_2.mean()


def _mutate_gelu_for_quick_gelu(eng: Engine) -> None:
    for blk in eng.blocks:
        blk.act = F.gelu


MUTATIONS = {
    "avg-includes-class-token": ("avg-pool", _mutate_avg_with_class_token),
    "avg-includes-class-token-final-ln": ("avg-final-ln-no-ln-pre-ls", _mutate_avg_with_class_token),
    "ln-before-pool": ("avg-final-ln-no-ln-pre-ls", _mutate_ln_order),
    "layer-scale-dropped": ("quickgelu-ls-w80", _mutate_drop_layer_scale),
    "layer-scale-scalar": ("avg-final-ln-no-ln-pre-ls", _mutate_layer_scale_to_scalar),
    "gelu-instead-of-quick-gelu": ("quickgelu-ls-w80", _mutate_gelu_for_quick_gelu),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_parity_check_catches_engine_mutation(build, name):
    """An engine that mishandles one of these options (class token in the average, LayerNorm on the wrong side of
    the pool, layer scale missing or not per channel, GELU for QuickGELU) fails the parity check above."""
    key, mutate = MUTATIONS[name]
    b = build(key, "8-8-8")
    eng = Engine.load(b.path)  # a fresh engine: the cached one stays correct
    mutate(eng)
    bad, _ = untied(b, _images(16, b.image_size, seed=1001), eng)
    assert len(bad) >= 8, f"mutation {name}: only {len(bad)} of 16 images flagged"
