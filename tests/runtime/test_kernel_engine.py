"""``KernelEngine`` (the Triton image tower) against the CPU ``Engine`` on the same artifact.

Without a GPU the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``
before any kernel module is imported). The integer paths are exact and the float epilogues follow the CPU engine's
operation order, so the logits agree to float rounding: max abs difference <= 1e-4 and identical top-1.

The interpreter is slow, so only two artifacts are checked: ``4-4-8``/``full`` (every block fused: LN+quant, the
requantizing in_proj, qattention, GELU+requant c_fc, residual epilogues) and ``8-8-8``/``release`` (attention left in
float: the torch fallback between kernels).
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from p4q_engine.artifact.fold import fold
from p4q_engine.artifact.format import load, save
from p4q_engine.clip.calibrate import calibrate
from p4q_engine.clip.qmodel import quantize_clip
from p4q_engine.clip.recipe import QuantRecipe
from p4q_engine.errors import ConfigError
from p4q_engine.runtime import kernel_engine
from p4q_engine.runtime.engine import Engine
from p4q_engine.runtime.kernel_engine import KernelEngine

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
MODEL_NAME = "P4Q-Test-Kernel-Tiny"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2},
}
PREPROCESS = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
CLASSES = [f"class {i}" for i in range(10)]
CONFIGS = (("4-4-8", "full"), ("8-8-8", "release"))
#: The engines execute whatever qparams calibration froze; minmax calibrates in milliseconds (OMSE's search takes
#: tens of seconds even on this tiny model) and exercises the same code paths.
OBSERVER = "minmax"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernel_model_cfg")
    (d / f"{MODEL_NAME}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    return open_clip.create_model(MODEL_NAME).eval()


def _tokens() -> torch.Tensor:
    """Random ids 1..97, EOT (99, the largest id) at index 8, zeros after."""
    tok = torch.zeros(len(CLASSES), 16, dtype=torch.long)
    tok[:, :8] = torch.randint(1, 98, (len(CLASSES), 8), generator=torch.Generator().manual_seed(1))
    tok[:, 8] = 99
    return tok


@pytest.fixture(scope="module")
def artifacts(tiny_model, tmp_path_factory) -> dict[tuple[str, str], object]:
    root = tmp_path_factory.mktemp("kernel_artifacts")
    tok = _tokens()
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    paths = {}
    for bits, scope in CONFIGS:
        q = quantize_clip(tiny_model, QuantRecipe(bits, scope=scope, observer=OBSERVER))
        calibrate(q, [calib], tok, progress=False)
        with torch.no_grad():
            tf = F.normalize(q.encode_text(tok), dim=-1)
        path = root / f"tiny_{bits}_{scope}.p4q"
        save(fold(q, tf, CLASSES, PREPROCESS), path)
        paths[(bits, scope)] = path
    return paths


@pytest.fixture
def kernel_calls(monkeypatch) -> dict[str, int]:
    """Count the kernel launches the engine makes (wrapping the names kernel_engine imported)."""
    counts = {"qgemm": 0, "qattention": 0, "layernorm_quant": 0, "quantize_rows": 0}
    for name in counts:
        fn = getattr(kernel_engine, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(kernel_engine, name, counted)
    return counts


def assert_engines_agree(engine: KernelEngine, cpu: Engine, images: torch.Tensor, fused: bool) -> None:
    """Fused towers: every image's codes equal the CPU engine's at every site, or first differ at a float tie
    (``p4q_engine.runtime.kernel_divergence``); where no code differs the logits agree to float noise. Towers with
    float attention (release scope) compare logits only (the integer paths are exact, the float ones in the CPU
    engine's operation order)."""
    from p4q_engine.runtime.kernel_divergence import kernel_first_divergence

    got, expected = engine.logits(images), cpu.logits(images)
    assert (
        got.shape == expected.shape and float(expected.std()) > 1e-3
    )  # not degenerate: the comparison means something
    for i in range(images.shape[0]):
        t = kernel_first_divergence(engine, cpu, images[i]) if fused else {"aligned": True, "site": None}
        assert t["aligned"] and (t["site"] is None or t["tie"]), t
        if t["site"] is None:
            assert float((got[i] - expected[i]).abs().max()) <= 1e-4


@pytest.mark.parametrize("bits,scope", CONFIGS, ids=[f"{b}-{s}" for b, s in CONFIGS])
def test_kernel_engine_matches_cpu_engine(artifacts, kernel_calls, bits, scope):
    path = artifacts[(bits, scope)]
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    engine = KernelEngine(load(path), DEVICE)
    engine.use_graphs = False  # one tower pass per call (CUDA-graph capture would run it three times)
    kernel_calls.update(dict.fromkeys(kernel_calls, 0))  # count one forward pass
    assert engine.logits(images).shape == (4, len(CLASSES))
    layers = TINY_CFG["vision_cfg"]["layers"]
    if scope == "full":  # every block fully fused: in_proj, out_proj, c_fc, c_proj GEMMs + qattention + 2 LN+quant
        assert kernel_calls["qattention"] == layers
        assert kernel_calls["layernorm_quant"] == 2 * layers
        assert kernel_calls["qgemm"] >= 4 * layers + 1  # + the patch embedding (and the 8-bit projection)
    else:  # release: attention in float (torch fallback), the quantized Linears still on the GEMM kernel
        assert kernel_calls["qattention"] == 0
        assert kernel_calls["layernorm_quant"] == 2 * layers
        assert kernel_calls["qgemm"] >= 4 * layers + 1
    assert kernel_calls["quantize_rows"] >= 1  # the patches entering the patch-embedding GEMM
    assert_engines_agree(engine, Engine(load(path)), images, fused=scope == "full")


@pytest.mark.parametrize("bits,scope", CONFIGS, ids=[f"{b}-{s}" for b, s in CONFIGS])
def test_layernorm_tails_match_cpu_engine(artifacts, kernel_calls, monkeypatch, bits, scope):
    """``P4Q_FUSE_LN=1``: every LayerNorm after a residual GEMM runs as that GEMM's tail (only the first block's
    ln_1 stays a kernel of its own), and the codes still equal the CPU engine's at every site or first differ at a
    traced tie. The float-attention (release) tower fuses ln_2 nowhere (its out_proj adds the residual in torch)
    but still every c_proj -> ln_1."""
    monkeypatch.setenv("P4Q_FUSE_LN", "1")
    path = artifacts[(bits, scope)]
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    engine = KernelEngine(load(path), DEVICE)
    engine.use_graphs = False
    kernel_calls.update(dict.fromkeys(kernel_calls, 0))
    assert engine.logits(images).shape == (4, len(CLASSES))
    layers = TINY_CFG["vision_cfg"]["layers"]
    assert kernel_calls["layernorm_quant"] == (1 if scope == "full" else 1 + layers)
    assert_engines_agree(engine, Engine(load(path)), images, fused=scope == "full")


def test_layernorm_tail_switch_is_checked(artifacts, monkeypatch):
    """A ``P4Q_FUSE_LN`` other than 0 / 1 is a clear error at load, not a silent default."""
    monkeypatch.setenv("P4Q_FUSE_LN", "yes")
    with pytest.raises(ConfigError, match="P4Q_FUSE_LN"):
        KernelEngine(load(artifacts[("8-8-8", "release")]), DEVICE)


def test_kernel_engine_on_cpu_needs_the_interpreter(artifacts, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        KernelEngine(load(artifacts[("8-8-8", "release")]), "cpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised without a CUDA GPU")
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_kernel_engine_rejects_non_finite_pixels(artifacts, bad):
    """The finiteness check runs where the pixels are copied to (the GPU); a bad image is still a clear error."""
    engine = KernelEngine(load(artifacts[("8-8-8", "release")]), DEVICE)
    x = torch.zeros(2, 3, *engine.image_size)
    x[1, 0, 3, 4] = bad
    with pytest.raises(ConfigError, match="NaN or inf"):
        engine.encode(x)


def test_large_batches_run_in_chunks(artifacts, monkeypatch):
    """A batch past ``max_chunk`` (int32 kernel offsets, CUDA-graph buckets) runs chunk by chunk with the same
    features as one forward; the limit keeps the widest activation under 2^31 elements."""
    engine = KernelEngine(load(artifacts[("8-8-8", "release")]), DEVICE)
    tokens, width = engine.pos.shape
    assert 1 <= engine.max_chunk <= kernel_engine.MAX_CHUNK
    mlp = kernel_engine._out_features(engine.k_blocks[0]["c_fc"])
    assert engine.max_chunk * tokens * max(3 * width, mlp) < 2**31
    x = torch.randn(5, 3, *engine.image_size, generator=torch.Generator().manual_seed(3))
    whole = engine.encode(x)
    sizes = []
    real = engine._tower
    monkeypatch.setattr(engine, "_tower", lambda p: sizes.append(p.shape[0]) or real(p))
    engine.max_chunk = 2
    chunked = engine.encode(x)
    assert sizes == [2, 2, 1]
    if DEVICE == "cpu":  # the interpreter's tiles do not depend on the batch
        assert torch.equal(chunked, whole)
    else:  # on a GPU LN/attention tiles follow the batch bucket: codes may differ on float ties
        assert bool((F.cosine_similarity(chunked.float(), whole.float(), dim=-1) > 0.999).all())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_batch_invariant_features_on_the_gpu(artifacts, monkeypatch):
    """``P4Q_BATCH_INVARIANT=1``: an image's features are the same alone, in a batch of 5 and in one of 37 (three
    batch buckets; LN and attention keep one tile, the integer GEMMs are exact under any)."""
    monkeypatch.setenv("P4Q_BATCH_INVARIANT", "1")
    engine = KernelEngine(load(artifacts[("4-4-8", "full")]), DEVICE)  # every block Linear and attention fused
    x = torch.randn(37, 3, *engine.image_size, generator=torch.Generator().manual_seed(4))
    alone = torch.cat([engine.encode(x[i : i + 1]) for i in range(5)])
    assert torch.equal(engine.encode(x[:5]), alone)
    assert torch.equal(engine.encode(x)[:5], alone)


def test_precompile_is_a_no_op_without_graphs(artifacts):
    """On the interpreter (no CUDA graphs, nothing compiled) ``precompile`` does nothing and says so."""
    if HAS_CUDA:
        pytest.skip("the interpreter engine only")
    engine = KernelEngine(load(artifacts[("4-4-8", "full")]), DEVICE)
    assert engine.precompile([1, 8, 64], workers=2) == {"workers": 0, "buckets": [], "untuned": {}, "failed": {}}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("autotune", ["1", "0"])
def test_precompile_compiles_what_the_forward_launches(artifacts, monkeypatch, tmp_path, autotune):
    """With the tiles known (tuned by a first engine; or, autotuning off, the first candidate) but no kernel compiled
    (Triton's in-process caches cleared, an empty disk cache), ``precompile`` on 4 threads compiles the kernels the
    forwards of its buckets launch: those forwards then compile nothing and give what the first engine gave, while a
    bucket it did not compile still compiles (the hook that counts compiles works)."""
    from p4q_engine.kernels import layernorm, qattention, qgemm
    from triton import knobs

    monkeypatch.setenv("P4Q_AUTOTUNE", autotune)
    monkeypatch.setenv("P4Q_TUNE_CACHE", str(tmp_path / "tuning.json"))
    art = load(artifacts[("4-4-8", "full")])
    reference = KernelEngine(art, DEVICE)
    x = torch.randn(5, 3, *reference.image_size, generator=torch.Generator().manual_seed(5))
    expected, expected1 = reference.encode(x).cpu(), reference.encode(x[:1]).cpu()  # tunes buckets 8 and 1
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    for k in (qgemm._qgemm_kernel, qgemm._qgemm_tma_kernel, layernorm._ln_quant_kernel, qattention._qattention_kernel):
        k.device_caches.clear()
    compiled: list = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda *a, **kw: compiled.append(kw) or False)
    engine = KernelEngine(art, DEVICE)
    done = engine.precompile([1, 5], workers=4)
    assert done["buckets"] == [1, 8] and done["untuned"] == {} and done["failed"] == {}, done
    assert compiled  # the pass did compile
    compiled.clear()
    assert torch.equal(engine.encode(x).cpu(), expected)
    assert torch.equal(engine.encode(x[:1]).cpu(), expected1)
    assert compiled == []
    engine.encode(x[:2])  # bucket 2: never compiled ahead (nor tuned)
    assert compiled


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_graphs_of_every_bucket_share_one_pool_and_stay_correct(artifacts, monkeypatch):
    """The buckets' graphs share one memory pool: replayed in any order, each answer is what the same engine gives
    without graphs (an answer overwritten by another graph's intermediates would differ). Batch-invariant tiles, so
    the padded bucket and the exact batch compute the same rows."""
    monkeypatch.setenv("P4Q_BATCH_INVARIANT", "1")
    engine = KernelEngine(load(artifacts[("4-4-8", "full")]), DEVICE)
    x = torch.randn(37, 3, *engine.image_size, generator=torch.Generator().manual_seed(6))
    engine.use_graphs = False
    eager = {b: engine.encode(x[:b]).cpu() for b in (1, 5, 37)}
    engine.use_graphs = True
    order = (37, 1, 5, 1, 37, 5)
    outs = [engine.encode(x[:b]) for b in order]  # kept on the GPU: a later replay must not overwrite an answer
    for b, out in zip(order, outs):
        assert torch.equal(out.cpu(), eager[b]), b
    pools = {g.pool() for g, _, _ in engine._graphs.values()}
    assert len(engine._graphs) == 3 and len(pools) == 1


def test_kernel_engine_takes_uint8_pixels(artifacts):
    """8-bit pixels are copied first and normalised on the engine's device (a quarter of the bytes over PCIe), to
    the float path's features bit for bit (on a GPU this checks CUDA's division by tensor divisors too)."""
    engine = KernelEngine(load(artifacts[("8-8-8", "release")]), DEVICE)
    raw = torch.randint(0, 256, (3, 3, *engine.image_size), generator=torch.Generator().manual_seed(5)).to(torch.uint8)
    assert torch.equal(engine.encode(raw), engine.encode(engine.transform.normalize(raw)))


def test_kernel_engine_rejects_integer_pixels_and_answers_an_empty_batch(artifacts):
    """The same input contract as the CPU engine: int64 pixels are a typed error, an empty batch zero rows (no kernel
    launch, no graph bucket)."""
    engine = KernelEngine(load(artifacts[("8-8-8", "release")]), DEVICE)
    with pytest.raises(ConfigError, match="uint8"):
        engine.encode(torch.zeros(2, 3, *engine.image_size, dtype=torch.int64))
    out = engine.encode(torch.zeros(0, 3, *engine.image_size))
    assert out.shape == (0, engine.proj_dim)


def test_engine_load_cuda_without_gpu_raises(artifacts):
    with pytest.raises(ConfigError, match="CUDA"):
        Engine.load(artifacts[("8-8-8", "release")], device="cuda")


def test_engine_load_cpu_is_the_reference_engine(artifacts):
    assert type(Engine.load(artifacts[("8-8-8", "release")])) is Engine


@pytest.mark.parametrize("changes,message", [({"heads": 3}, "does not divide width"), ({"layers": 1}, "layers")])
def test_kernel_engine_shares_the_vision_config_validation(artifacts, changes, message):
    from p4q_engine.artifact.format import Artifact, ArtifactError

    art = load(artifacts[("4-4-8", "full")])
    man = json.loads(json.dumps(art.manifest))
    man["vision"].update(changes)
    with pytest.raises(ArtifactError, match=message):
        KernelEngine(Artifact(man, dict(art.tensors)), DEVICE)


def test_kernel_engine_with_the_tma_gemm_matches_cpu_engine(artifacts, monkeypatch):
    """The whole fused 4-4-8 tower with every eligible GEMM on the persistent TMA kernel (the Hopper path the
    autotuner may pick) still equals the CPU engine - requantizing, GELU and residual epilogues included."""
    from p4q_engine.kernels import qgemm as qgemm_mod
    from p4q_engine.kernels import tuning
    from p4q_engine.kernels.tuning import TileConfig

    if HAS_CUDA:
        monkeypatch.setenv("P4Q_QGEMM_KERNEL", "tma")
    else:  # the interpreter always takes INTERPRET_CONFIG: make it a TMA configuration
        monkeypatch.setattr(tuning, "INTERPRET_CONFIG", TileConfig(32, 32, 128, 2, 4, 1, "tma"))
    used = []
    real = qgemm_mod.tma_eligible

    def eligible(a, w, cfg):
        ok = real(a, w, cfg)
        used.append(ok)
        return ok

    monkeypatch.setattr(qgemm_mod, "tma_eligible", eligible)
    path = artifacts[("4-4-8", "full")]
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    assert_engines_agree(KernelEngine(load(path), DEVICE), Engine(load(path)), images, fused=True)
    assert sum(used) >= 4 * TINY_CFG["vision_cfg"]["layers"]  # every block GEMM ran on the TMA kernel


# ------------------------------------------------------------------ long sequences (the tiled attention kernel)
LONG_NAME = "P4Q-Test-Kernel-Long"
#: 48 px / patch 4 = 144 patches + the class token: 145 tokens (> 128: the tiled kernel), 3 heads of 32 (head dims
#: 80 and 104 are covered by tests/kernels/test_qattention.py; the interpreter makes every width expensive here).
LONG_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 48, "layers": 1, "width": 96, "patch_size": 4, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def long_artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernel_long_cfg")
    (d / f"{LONG_NAME}.json").write_text(json.dumps(LONG_CFG))
    open_clip.add_model_config(d)
    torch.manual_seed(1)
    model = open_clip.create_model(LONG_NAME).eval()
    with torch.no_grad():  # sharper attention than open_clip's init, so probabilities use their grid
        for blk in model.visual.transformer.resblocks:
            blk.attn.in_proj_weight[: 2 * 96] *= 3.0
    q = quantize_clip(model, QuantRecipe("4-4-8", scope="full", observer=OBSERVER))
    calibrate(q, [torch.randn(8, 3, 48, 48, generator=torch.Generator().manual_seed(5))], _tokens(), progress=False)
    with torch.no_grad():
        tf = F.normalize(q.encode_text(_tokens()), dim=-1)
    path = d / "long.p4q"
    save(fold(q, tf, CLASSES, {**PREPROCESS, "size": [48, 48]}), path)
    return path


def test_kernel_engine_long_sequence_is_tie_only(long_artifact, kernel_calls):
    """145 tokens, 3 heads: the GPU engine's codes equal the CPU engine's at every site up to float ties."""
    from p4q_engine.runtime.kernel_divergence import kernel_first_divergence, untied_kernel_divergences

    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(6))
    cpu, gpu = Engine(load(long_artifact)), KernelEngine(load(long_artifact), DEVICE)
    assert untied_kernel_divergences(gpu, cpu, images) == []
    assert kernel_calls["qattention"] == 2  # one block per image, fused
    t = kernel_first_divergence(gpu, cpu, images[0])
    assert t["aligned"] and t["sites"] == 2 + 7 * 1
    got, expected = gpu.logits(images), cpu.logits(images)
    assert got.shape == expected.shape and torch.isfinite(got).all() and float(expected.std()) > 1e-3


def test_kernel_tie_rule_catches_a_wrong_probability_grid(long_artifact, monkeypatch):
    """The same check fails when the kernel engine quantizes the probabilities on a grid 1% off."""
    from p4q_engine.kernels import qattention as qatt_mod

    from p4q_engine.runtime.kernel_divergence import untied_kernel_divergences

    real = kernel_engine.qattention

    def skewed(qkv, heads, sites, *a, **kw):
        p = (sites.p[0] * 1.01, sites.p[1])
        return real(
            qkv,
            heads,
            qatt_mod.AttnSites(sites.q, sites.k, sites.v, p, sites.out, sites.p_bits, sites.out_bits),
            *a,
            **kw,
        )

    monkeypatch.setattr(kernel_engine, "qattention", skewed)
    images = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(7))
    bad = untied_kernel_divergences(KernelEngine(load(long_artifact), DEVICE), Engine(load(long_artifact)), images)
    assert len(bad) == 1 and "attention output" in bad[0]["site"]
