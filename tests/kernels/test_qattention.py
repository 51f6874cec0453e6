"""Fused quantized attention (``p4q_engine.kernels.qattention``) against ``qattention_reference``.

What can differ, and the tolerance: everything up to the softmax is integer or the same fp32 operations in the
same order, and everything after the probability codes is integer again plus one fp32 multiply and the output
scale (the kernel multiplies by ``1 / s_o`` where the reference divides). The inexact steps are the fp32 softmax
(``exp`` and the row sum: numpy's or the GPU's vs torch's, a few ulps; one reciprocal where the reference divides
twice) and that output reciprocal. The softmax matters only where a probability lies within those ulps of a rounding
boundary of the probability grid (``p / s_p`` within ``TIE_EPS`` of ``n + 0.5``); then one probability code may
differ by one, which moves that query row's outputs by at most ``ceil(s_p * s_v * max|v - z_v| / s_o)`` codes per
flipped probability. The reciprocal matters only for an output whose own ``o / s_o`` lies on a tie (one step).

So the check is: every query row (per head) with no near-tie probability is **bit-exact** (interpreter and GPU)
except for outputs on a tie of their own value; a row with near ties differs by at most that bound. ``TIE_EPS`` is
the project's (1e-3 grid steps). Near-tie rows are a small fraction (asserted < 10% where rows are short), so the
exact check covers almost everything.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from p4q_engine.kernels import qattention as qatt_mod
from p4q_engine.kernels.qattention import AttnSites, qattention, qattention_reference

HAS_CUDA = torch.cuda.is_available()
from p4q_engine.quant.ties import TIE_EPS, assert_codes_equal_or_ties, boundary_distance  # noqa: E402  (one tie definition for every kernel test)

#: (L, causal): the image tower's 50 tokens, an odd short sequence, the text tower's 77 with the causal mask.
LENGTHS = ((50, False), (17, False), (77, True))
HEADS = ((2, 32), (1, 64), (4, 16))
#: (q, k, v, out) zero points: both extremes and the middle, in different roles. The output is an average of
#: ``v - z_v``, so its zero point follows ``z_v`` (0 -> outputs >= 0 -> z_o = 0, ...) or every code would clamp;
#: a 4-bit output site scales it to [0, 15].
ZPS = ((0, 255, 128, 128), (255, 0, 0, 0), (128, 128, 255, 255))
#: (p_bits, p zero point, out_bits)
P_SITES = ((8, 0, 8), (4, 0, 4), (8, 3, 4))


def gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_case(b: int, length: int, heads: int, hd: int, zps, p_site, g: torch.Generator, device: str):
    """Random q|k|v codes over the whole int8 range (with an all-min and an all-max token) and sites whose scales
    make the softmax neither uniform nor one-hot and the output codes use the whole output grid."""
    d = heads * hd
    qkv = torch.randint(-128, 128, (b, length, 3 * d), generator=g, dtype=torch.int16).to(torch.int8)
    qkv[0, 0] = -128
    qkv[-1, -1] = 127
    zq, zk, zv, zo = zps
    p_bits, zp_p, out_bits = p_site
    zo = round(zo * ((1 << out_bits) - 1) / 255)
    # |q - zq| |k - zk| ~ 128^2 / 3 per term: logits of std ~ 2 to 4
    sq = float(torch.empty(1).uniform_(0.5, 1.0, generator=g)) * 3.0 / (128 * 128 / 3) ** 0.5
    sk = float(torch.empty(1).uniform_(0.5, 1.0, generator=g)) * 3.0 / (128 * 128 / 3) ** 0.5
    sv = 0.01
    sp = 1.0 / ((1 << p_bits) - 1 - zp_p)
    so = sv * 160.0 / ((1 << out_bits) - 1)  # outputs (averages of v - zv) cover ~ +-80 codes of v: some clamp
    sites = AttnSites((sq, zq), (sk, zk), (sv, zv), (sp, zp_p), (so, zo), p_bits, out_bits)
    return qkv.to(device), sites


def near_tie_rows(qkv: torch.Tensor, heads: int, sites: AttnSites, causal: bool, eps: float) -> torch.Tensor:
    """Number of probabilities within ``eps`` grid steps of a rounding boundary, per ``[B, L, heads]`` query row
    (the reference's softmax, recomputed)."""
    x = qkv.cpu().to(torch.float64) + 128
    b, length, d3 = x.shape
    d = d3 // 3
    hd = d // heads

    def split(t, zp):
        return (t - zp).view(b, length, heads, hd).transpose(1, 2)

    q, k = split(x[..., :d], sites.q[1]), split(x[..., d : 2 * d], sites.k[1])
    sq, sk, sp = (torch.tensor(s[0], dtype=torch.float32) for s in (sites.q, sites.k, sites.p))
    logits = (q @ k.transpose(-2, -1)).float() * (sq * sk) * (1.0 / math.sqrt(hd))
    if causal:
        logits = logits.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    r = torch.softmax(logits, dim=-1).double() / sp.double()
    near = ((r - r.floor()) - 0.5).abs() < eps
    return near.sum(-1).transpose(1, 2)  # [B, L, heads]


def check_attention(
    out: torch.Tensor,
    ref: torch.Tensor,
    qkv: torch.Tensor,
    heads: int,
    sites: AttnSites,
    causal: bool,
    max_tie_rows: float = 0.1,
) -> None:
    """``max_tie_rows``: the largest fraction of query rows allowed a near tie (else the exact check would be
    vacuous); with hundreds of keys per row most rows hold one somewhere, and the per-row bound carries the check."""
    b, length, d = ref.shape
    hd = d // heads
    ties = near_tie_rows(qkv, heads, sites, causal, TIE_EPS)  # [B, L, H]
    assert float((ties > 0).float().mean()) < max_tie_rows, "too many near ties: the exact check would be vacuous"
    step = (out.cpu().to(torch.int32) - ref.to(torch.int32)).abs()
    # an output code one step off on a tie of its own o / s_o (the kernel multiplies by 1 / s_o) is not a difference
    pre = qattention_reference(qkv, heads, sites, causal, values=True)[1]
    own_tie = (step == 1) & (boundary_distance(pre) <= TIE_EPS)
    untied = torch.where(own_tie, 0, step).view(b, length, heads, hd).amax(-1)  # [B, L, H]
    diff = step.view(b, length, heads, hd).amax(-1)
    exact_rows = ties == 0
    assert int((untied[exact_rows] > 0).sum()) == 0, (
        f"{int((untied[exact_rows] > 0).sum())} query rows without near ties differ"
    )
    v_span = max(sites.v[1], 255 - sites.v[1])
    per_flip = math.ceil(sites.p[0] * sites.v[0] * v_span / sites.out[0])
    bound = ties * per_flip + 1
    assert bool((diff <= bound).all()), "a near-tie row moved by more than its flipped probability codes allow"


def run_poisoned(poison, sentinels, *args, **kwargs) -> list[torch.Tensor]:
    outs = []
    for s in sentinels:
        with poison(qatt_mod, s, pad=2) as alloc:
            out = qattention(*args, **kwargs)
        alloc.assert_padding_untouched()
        outs.append(out.cpu())
    return outs


@pytest.mark.parametrize("length,causal", LENGTHS, ids=[f"L{n}{'-causal' if c else ''}" for n, c in LENGTHS])
@pytest.mark.parametrize("heads,hd", HEADS, ids=[f"{h}x{d}" for h, d in HEADS])
@pytest.mark.parametrize("site", range(len(P_SITES)), ids=[f"p{p}zp{z}-out{o}" for p, z, o in P_SITES])
def test_qattention_matches_reference(poison, device, length, causal, heads, hd, site):
    zps = ZPS[(site + heads) % len(ZPS)]
    g = gen("attn", length, causal, heads, hd, site)
    qkv, sites = make_case(2, length, heads, hd, zps, P_SITES[site], g, device)
    ref = qattention_reference(qkv, heads, sites, causal)
    u = ref.to(torch.int32) + 128
    assert int(u.min()) == 0 and int(u.max()) == (1 << sites.out_bits) - 1  # the output grid is used end to end
    sentinels = (77,) if sites.out_bits < 8 else (77, -5)  # 4-bit outputs are u in [0, 15]: 77 is impossible
    for out in run_poisoned(poison, sentinels, qkv, heads, sites, causal):
        assert out.dtype == torch.int8 and out.shape == ref.shape
        check_attention(out, ref, qkv, heads, sites, causal)


#: Tiled kernel cases (L, causal, heads, head dim): lengths past one tile and not a multiple of it (ViT-B/16's 197),
#: the causal text length, head dims 80 and 104 (ViT-H/14, ViT-bigG/14) padded to a 128-wide tile, an odd head count;
#: lengths that are whole key blocks (no masked tail; causal: unmasked blocks below the diagonal), and a head dim past
#: 128 (the accumulator no longer fits the fp32 magic: the converting branch).
TILED = (
    (197, False, 1, 80),
    (150, False, 3, 16),
    (77, True, 2, 32),
    (130, True, 1, 104),
    (65, False, 5, 64),
    (96, True, 2, 32),
    (64, False, 1, 160),
)


@pytest.mark.parametrize(
    "length,causal,heads,hd", TILED, ids=[f"L{n}{'-causal' if c else ''}-{h}x{d}" for n, c, h, d in TILED]
)
@pytest.mark.parametrize("site", range(len(P_SITES)), ids=[f"p{p}zp{z}-out{o}" for p, z, o in P_SITES])
def test_tiled_qattention_matches_reference(poison, device, length, causal, heads, hd, site):
    """The two-pass tiled kernel (small 32 x 32 tiles so every case spans several query and key blocks) gives the
    reference's codes up to probability ties, like the short kernel."""
    zps = ZPS[(site + heads) % len(ZPS)]
    g = gen("attn-tiled", length, causal, heads, hd, site)
    qkv, sites = make_case(2, length, heads, hd, zps, P_SITES[site], g, device)
    ref = qattention_reference(qkv, heads, sites, causal)
    sentinels = (77,) if sites.out_bits < 8 else (77, -5)
    for out in run_poisoned(poison, sentinels, qkv, heads, sites, causal, kernel="tiled", block_m=32, block_n=32):
        assert out.dtype == torch.int8 and out.shape == ref.shape
        check_attention(out, ref, qkv, heads, sites, causal)


@pytest.mark.parametrize(
    "cfg", qatt_mod.ATTN_CANDIDATES, ids=lambda c: f"{c.block_m}x{c.block_n}-w{c.num_warps}-s{c.num_stages}"
)
def test_every_tiled_tuning_candidate(poison, device, cfg):
    """Each tile the GPU tuner may pick for the tiled kernel (it picks by speed alone) gives the reference's codes up
    to probability ties: 150 tokens span two to five query blocks and two to five key blocks of every candidate."""
    g = gen("attn-candidates", cfg.block_m, cfg.block_n)
    qkv, sites = make_case(1, 150, 3, 16, ZPS[1], P_SITES[0], g, device)
    ref = qattention_reference(qkv, 3, sites)
    for out in run_poisoned(poison, (77,), qkv, 3, sites, kernel="tiled", config=cfg):
        check_attention(out, ref, qkv, 3, sites, False)


ONE_PASS = qatt_mod.ONE_PASS_TILES


@pytest.mark.parametrize("cfg", ONE_PASS, ids=lambda c: f"{c.block_m}x{c.block_n}-w{c.num_warps}")
def test_one_pass_tiles_causal_odd_head_dim(poison, device, cfg):
    """The one-pass branch (every key in one block) with the causal mask, a head dim that is not a power of two and
    every zero-point role: the same codes as the reference up to probability ties."""
    for zps in ZPS:
        g = gen("one-pass", cfg.block_m, cfg.block_n, zps)
        qkv, sites = make_case(2, 150, 2, 20, zps, P_SITES[2], g, device)
        ref = qattention_reference(qkv, 2, sites, causal=True)
        for out in run_poisoned(poison, (-77,), qkv, 2, sites, causal=True, kernel="tiled", config=cfg):
            check_attention(out, ref, qkv, 2, sites, True)


@pytest.mark.parametrize("hd", (80, 128, 160))
@pytest.mark.parametrize("kernel", ("short", "tiled"))
def test_extreme_codes_keep_exact_logits(poison, device, hd, kernel):
    """The largest logit integers the zero points allow: ``u_q = 255`` with ``z_q = 0`` against keys at ``u_k = 0``
    (``|sum (u_q - z_q)(u_k - z_k)|`` near ``255 * 128 * head dim``: past 2^22 at head dim 160, the converting
    branch) mixed with random keys, so a wrong logit integer changes the softmax."""
    heads, length = 1, 70
    g = gen("extreme", hd, kernel)
    qkv, sites = make_case(2, length, heads, hd, (0, 128, 128, 128), P_SITES[0], g, device)
    qkv[:, ::7, :hd] = 127  # every seventh query row at u_q = 255 (identical rows: at most 1/7 tie together)
    qkv[:, ::3, hd : 2 * hd] = -128  # every third key at u_k = 0
    scale = 3.0 / (255 * 128 * hd / math.sqrt(hd))  # the extreme logits are ~ -3, the random ones ~ 0
    sites = AttnSites((1.0, 0), (scale, 128), sites.v, sites.p, sites.out, sites.p_bits, sites.out_bits)
    ref = qattention_reference(qkv, heads, sites)
    cfg = {"kernel": kernel} if kernel == "short" else {"kernel": "tiled", "block_m": 32, "block_n": 32}
    for out in run_poisoned(poison, (77,), qkv, heads, sites, **cfg):
        check_attention(out, ref, qkv, heads, sites, False, max_tie_rows=0.2)


@pytest.mark.parametrize("kernel,length", (("tiled", 200), ("short", 70)))
def test_large_logits_keep_the_codes(poison, device, kernel, length):
    """Logits near 1000 with a spread of a few units: every exponent is taken against ``fl(max log2e)``, whose
    rounding (~6e-5 here) must cancel in the normalisation. It does only if the online sum is rescaled by the same
    rounded values its terms used (a rescale by ``exp(max_old - max_new)`` leaves earlier terms ~4e-5 off: codes move
    by up to 1e-2 of a step, far past TIE_EPS). That variant fails it on a GPU only: the interpreter's ``tl.fma``
    rounds twice (numpy), an error of the same size, so under it this is a check of the codes, not of the rescale;
    ``test_gpu_large_logits_keep_the_codes`` runs it where ``fma`` is fused."""
    heads, hd = 2, 32  # 32: a GPU int8 dot needs K >= 32
    g = gen("large-logits", kernel)
    qkv, sites = make_case(2, length, heads, hd, (128, 128, 128, 128), P_SITES[0], g, device)
    d = heads * hd
    q = torch.randint(-1, 2, (2, length, d), generator=g, dtype=torch.int16)
    k = torch.randint(-20, 21, (2, length, d), generator=g, dtype=torch.int16)
    q[..., ::hd], k[..., ::hd] = 127, 127  # one dimension per head: 127^2 in every logit integer
    qkv[..., :d], qkv[..., d : 2 * d] = q.to(torch.int8).to(device), k.to(torch.int8).to(device)
    c = 1000.0 / (127 * 127)  # logit = c * integer: ~1000 + spread ~2
    sites = AttnSites((c**0.5 * 2, 128), (c**0.5 * 2, 128), sites.v, sites.p, sites.out, sites.p_bits, sites.out_bits)
    ref = qattention_reference(qkv, heads, sites)
    cfg = {"kernel": kernel} if kernel == "short" else {"kernel": "tiled", "block_m": 32, "block_n": 32}
    for out in run_poisoned(poison, (77,), qkv, heads, sites, **cfg):
        check_attention(out, ref, qkv, heads, sites, False, max_tie_rows=0.3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel,length", (("tiled", 200), ("short", 70)))
def test_gpu_large_logits_keep_the_codes(poison, kernel, length):
    """:func:`test_large_logits_keep_the_codes` on the GPU, whose fused ``fma`` makes it discriminate the rescale."""
    test_large_logits_keep_the_codes(poison, "cuda", kernel, length)


def test_one_pass_and_two_pass_tiles_agree(device):
    """Both branches compute the same codes (up to the row sum's summation order: ties only)."""
    g = gen("one-vs-two")
    qkv, sites = make_case(1, 150, 3, 16, ZPS[0], P_SITES[0], g, device)
    ref = qattention_reference(qkv, 3, sites)
    two = qattention(qkv, 3, sites, kernel="tiled", config=qatt_mod.ATTN_CANDIDATES[0])
    one = qattention(qkv, 3, sites, kernel="tiled", config=ONE_PASS[0])
    check_attention(two, ref, qkv, 3, sites, False)
    check_attention(one, ref, qkv, 3, sites, False)
    ties = near_tie_rows(qkv, 3, sites, False, TIE_EPS)
    diff = (one.cpu().to(torch.int32) - two.cpu().to(torch.int32)).abs().view(1, 150, 3, 16).amax(-1)
    assert int(diff[ties == 0].max()) == 0


@pytest.mark.parametrize("cfg", qatt_mod.SHORT_CANDIDATES, ids=lambda c: f"w{c.num_warps}")
def test_every_short_tuning_candidate(poison, device, cfg):
    """Each warp count the tuner may pick for the short kernel: reference codes up to probability ties."""
    g = gen("short-candidates", cfg.num_warps)
    qkv, sites = make_case(3, 50, 2, 32, ZPS[2], P_SITES[1], g, device)
    ref = qattention_reference(qkv, 2, sites)
    for out in run_poisoned(poison, (55,), qkv, 2, sites, kernel="short", config=cfg):
        check_attention(out, ref, qkv, 2, sites, False)


def test_auto_picks_the_tiled_kernel_past_one_tile(device):
    """L > 128 runs (the tiled kernel) and equals an explicitly tiled call; L <= 128 equals the short kernel."""
    g = gen("auto")
    qkv, sites = make_case(1, 129, 2, 16, ZPS[0], P_SITES[0], g, device)
    assert torch.equal(qattention(qkv, 2, sites).cpu(), qattention(qkv, 2, sites, kernel="tiled").cpu())
    short, _ = make_case(1, 50, 2, 16, ZPS[0], P_SITES[0], g, device)
    assert torch.equal(qattention(short, 2, sites).cpu(), qattention(short, 2, sites, kernel="short").cpu())


def test_output_rounding_tie_is_a_traced_tie(device):
    """An output value on a rounding tie: attention is one-hot (p = 1 exactly), so ``acc = 252 * 80 = 20160`` and
    ``y / s_o`` is 127.50001 with ``fp32(s_p) * fp32(s_v)`` (the reference's product; the interpreter once formed a
    float64 one: 127.49999). The kernel multiplies by ``1 / s_o`` and rounds half to even, so code 128 or 127 are
    both correct here (every query row attends to key 0 alone and every value of key 0 is 80: every output is this
    tie), and a code two steps away, or off a tie, is not."""
    heads, hd, length = 1, 16, 4
    u = torch.zeros(1, length, 3 * hd, dtype=torch.int32)
    u[..., :hd] = 255  # q - 128 = 127 everywhere
    u[0, 0, hd : 2 * hd] = 255  # key 0: logit 127 * 127 * 16 / 4; every other key: 127 * -128 * 16 / 4
    u[0, 0, 2 * hd :] = 80  # v of key 0 (z_v = 0): the output is exactly 252 * 80 * s_p * s_v
    u[0, 1:, 2 * hd :] = torch.arange(3 * hd).view(3, hd)
    qkv = (u - 128).to(torch.int8).to(device)
    sites = AttnSites((1.0, 128), (1.0, 128), (0.01, 0), (1.0 / 252, 3), (0.006274509803921569, 0))
    ref, pre = qattention_reference(qkv, heads, sites, values=True)
    assert int(ref[0, 0, 0]) + 128 == 128 and abs(float(pre[0, 0, 0]) - 127.5) < 1e-4  # the case is a tie
    out = qattention(qkv, heads, sites).cpu()
    assert bool((pre - 127.5).abs().max() < 1e-4)
    assert_codes_equal_or_ties(out, ref, pre, what="one-hot attention output")


def test_causal_rows_ignore_later_tokens(device):
    """With the causal mask, changing token j's keys/values leaves rows i < j unchanged."""
    g = gen("causal")
    qkv, sites = make_case(1, 20, 2, 16, ZPS[0], P_SITES[0], g, device)
    out = qattention(qkv, 2, sites, causal=True).cpu()
    qkv2 = qkv.clone()
    qkv2[:, 12:, 32:] = torch.randint(-128, 128, (1, 8, 64), generator=g, dtype=torch.int16).to(torch.int8).to(device)
    out2 = qattention(qkv2, 2, sites, causal=True).cpu()
    assert torch.equal(out[:, :12], out2[:, :12])
    assert not torch.equal(out[:, 12:], out2[:, 12:])


def test_bad_inputs_raise(device):
    sites = AttnSites((0.01, 0), (0.01, 0), (0.01, 0), (1 / 255, 0), (0.01, 0))
    ok = torch.zeros(1, 8, 96, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="short qattention kernel takes L <= 128"):
        qattention(torch.zeros(1, 129, 96, dtype=torch.int8, device=device), 2, sites, kernel="short")
    with pytest.raises(ValueError, match="unknown qattention kernel"):
        qattention(ok, 2, sites, kernel="flash")
    with pytest.raises(ValueError):
        qattention(ok.to(torch.uint8), 2, sites)  # dtype
    with pytest.raises(ValueError):
        qattention(ok.float(), 2, sites)
    with pytest.raises(ValueError):
        qattention(ok[0], 2, sites)  # not [B, L, 3D]
    with pytest.raises(ValueError):
        qattention(ok, 5, sites)  # 3D not divisible by 3 * heads


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("site", range(len(P_SITES)), ids=[f"p{p}zp{z}-out{o}" for p, z, o in P_SITES])
def test_gpu_vit_b32_shape(site):
    """ViT-B/32 image tower: B = 256 images, L = 50 tokens, 12 heads x 64."""
    g = gen("gpu-attn", site)
    qkv, sites = make_case(256, 50, 12, 64, ZPS[site], P_SITES[site], g, "cuda")
    out = qattention(qkv, 12, sites)
    torch.cuda.synchronize()
    check_attention(out, qattention_reference(qkv, 12, sites), qkv, 12, sites, False)


#: Full-shape tiled cases (batch, L, heads, head dim): ViT-B/16, ViT-L/14, ViT-L/14-336, ViT-H/14, one 1025-token row.
GPU_TILED = ((64, 197, 12, 64), (32, 257, 16, 64), (8, 577, 16, 64), (32, 257, 16, 80), (2, 1025, 4, 104))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("b,length,heads,hd", GPU_TILED, ids=[f"B{b}-L{n}-{h}x{d}" for b, n, h, d in GPU_TILED])
def test_gpu_tiled_full_shapes(b, length, heads, hd):
    g = gen("gpu-tiled", length, heads, hd)
    qkv, sites = make_case(b, length, heads, hd, ZPS[length % 3], P_SITES[hd % 3], g, "cuda")
    out = qattention(qkv, heads, sites)
    torch.cuda.synchronize()
    rows = slice(0, min(b, 8))  # the float64 reference on the CPU: a sample of images
    check_attention(
        out[rows], qattention_reference(qkv[rows], heads, sites), qkv[rows], heads, sites, False, max_tie_rows=1.01
    )


def test_fold_sm_only_where_exact():
    """The softmax scale folds into ``qk_scale`` only for power-of-two ``1/sqrt(hd)`` and an fp32-normal product."""
    from p4q_engine.kernels.qattention import fold_sm

    assert fold_sm(1e-3, 64) and fold_sm(1e-3, 16) and fold_sm(1e-3, 256) and fold_sm(0.0, 64)
    assert not fold_sm(1e-3, 80) and not fold_sm(1e-3, 128) and not fold_sm(1e-3, 104)
    assert not fold_sm(2.0**-125, 64)  # / 8 would be subnormal in fp32: not exact
