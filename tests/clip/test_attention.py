"""QuantMultiheadAttention: float equivalence with nn.MultiheadAttention, self-attention only, quantized accuracy."""

import pytest
import torch
from torch import nn

from p4q_engine.clip.attention import QuantMultiheadAttention
from p4q_engine.errors import ConfigError
from p4q_engine.quant.modules import ActQuantizer
from p4q_engine.quant.spec import act_spec, weight_spec


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: on a shared 2-core box, OpenMP threads waiting for each other cost ~16 ms per op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


D, H, B, L = 32, 4, 3, 7


def _mha(batch_first: bool, seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(D, H, batch_first=batch_first)
    with torch.no_grad():  # non-zero biases so a bias mix-up shows
        mha.in_proj_bias.normal_(0, 0.2)
        mha.out_proj.bias.normal_(0, 0.2)
    return mha.eval()


def _x(batch_first: bool, seed: int = 1) -> torch.Tensor:
    x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(seed))
    return x if batch_first else x.transpose(0, 1).contiguous()


def _causal_float(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)


def _masks(kind: str):
    g = torch.Generator().manual_seed(2)
    if kind == "none":
        return None, None
    if kind == "causal_float":
        return _causal_float(L), None
    if kind == "bool":
        m = torch.rand(L, L, generator=g) < 0.4
        m.fill_diagonal_(False)  # never mask a whole row
        return m, None
    if kind == "additive_float":
        return torch.randn(L, L, generator=g), None
    if kind == "key_padding_bool":
        kpm = torch.zeros(B, L, dtype=torch.bool)
        kpm[0, -2:] = True
        kpm[2, 1] = True
        return None, kpm
    if kind == "causal_and_padding":  # float key padding mask (added), same type as the causal mask
        kpm = torch.zeros(B, L)
        kpm[1, -3:] = float("-inf")
        kpm[2, 2] = -1.5
        return _causal_float(L), kpm
    if kind == "bool_and_padding":
        m = torch.ones(L, L, dtype=torch.bool).triu(1)
        kpm = torch.zeros(B, L, dtype=torch.bool)
        kpm[0, -1] = True
        return m, kpm
    raise AssertionError(kind)


MASK_KINDS = [
    "none",
    "causal_float",
    "bool",
    "additive_float",
    "key_padding_bool",
    "causal_and_padding",
    "bool_and_padding",
]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_float_equals_nn_multihead_attention(batch_first, mask_kind):
    mha = _mha(batch_first)
    q = QuantMultiheadAttention(mha, None, None, None)
    x = _x(batch_first)
    attn_mask, kpm = _masks(mask_kind)
    with torch.no_grad():
        ref, _ = mha(x, x, x, need_weights=False, attn_mask=attn_mask, key_padding_mask=kpm)
        out, w = q(x, x, x, need_weights=False, attn_mask=attn_mask, key_padding_mask=kpm)
    assert w is None
    assert out.shape == ref.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_float_equals_with_query_only_call():
    mha = _mha(True)
    q = QuantMultiheadAttention(mha, None, None, None)
    x = _x(True)
    with torch.no_grad():
        torch.testing.assert_close(q(x)[0], mha(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_mask_actually_matters():
    # Guard against a test setup where masks are silently ignored by both implementations.
    mha = _mha(True)
    q = QuantMultiheadAttention(mha, None, None, None)
    x = _x(True)
    with torch.no_grad():
        a = q(x, x, x, attn_mask=_causal_float(L))[0]
        b = q(x, x, x)[0]
    assert not torch.allclose(a, b, atol=1e-3)
    # Causality: the first token's output does not depend on later tokens.
    x2 = x.clone()
    x2[:, 3:] += 1.0
    with torch.no_grad():
        c = q(x2, x2, x2, attn_mask=_causal_float(L))[0]
    torch.testing.assert_close(c[:, :3], a[:, :3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["key", "value", "both"])
def test_cross_attention_raises(which):
    q = QuantMultiheadAttention(_mha(True), None, None, None)
    x = _x(True)
    other = x.clone()
    k = other if which in ("key", "both") else x
    v = other if which in ("value", "both") else x
    with pytest.raises(ConfigError):
        q(x, k, v)


def test_unsupported_mha_raises():
    with pytest.raises(ConfigError):
        QuantMultiheadAttention(nn.MultiheadAttention(D, H, add_bias_kv=True), None, None, None)
    with pytest.raises(ConfigError):
        QuantMultiheadAttention(nn.MultiheadAttention(D, H, kdim=16, vdim=16), None, None, None)
    with pytest.raises(ConfigError):
        QuantMultiheadAttention(nn.MultiheadAttention(D, H, add_zero_attn=True), None, None, None)


def _calibrated(mha, bits_wa: int, bits_attn: int, calib, observer="omse") -> QuantMultiheadAttention:
    q = QuantMultiheadAttention(mha, weight_spec(bits_wa), act_spec(bits_wa), act_spec(bits_attn), observer)
    sites = [m for m in q.modules() if isinstance(m, ActQuantizer) and m.enabled]
    assert len(sites) == 6  # in_proj input, out_proj input, q, k, v, probabilities
    for s in sites:
        s.start_calibration()
    with torch.no_grad():
        for x in calib:
            q(x, x, x, attn_mask=_causal_float(L))
    for s in sites:
        s.freeze()
    return q


@pytest.mark.parametrize("batch_first, observer", [(True, "omse"), (False, "minmax")])
def test_quantized_attention_close_at_8_bits_and_worse_at_2(batch_first, observer):
    mha = _mha(batch_first, seed=3)
    calib = [_x(batch_first, seed=s) for s in range(10, 18)]  # enough data that test inputs are rarely clipped
    x = _x(batch_first, seed=12)
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False, attn_mask=_causal_float(L))[0]

    def err(q):
        with torch.no_grad():
            out = q(x, x, x, attn_mask=_causal_float(L))[0]
        return float((out - ref).norm() / ref.norm())

    e8 = err(_calibrated(mha, 8, 8, calib, observer))
    e4 = err(_calibrated(mha, 4, 8, calib, observer))
    e2 = err(_calibrated(mha, 2, 8, calib, observer))
    assert e8 < 0.03, e8
    assert e2 > 5 * e8 and e2 > 0.1, (e8, e2)
    assert e8 < e4 < e2, (e8, e4, e2)


def test_attention_bits_matter_independently():
    mha = _mha(True, seed=4)
    calib = [_x(True, seed=s) for s in (20, 21)]
    x = _x(True, seed=22)
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False)[0]
        q8 = QuantMultiheadAttention(mha, None, None, act_spec(8), "minmax")
        q2 = QuantMultiheadAttention(mha, None, None, act_spec(2), "minmax")
        for q in (q8, q2):
            sites = [m for m in q.modules() if isinstance(m, ActQuantizer) and m.enabled]
            assert len(sites) == 4
            for s in sites:
                s.start_calibration()
            for c in calib:
                q(c)
            for s in sites:
                s.freeze()
        e8 = float((q8(x)[0] - ref).norm() / ref.norm())
        e2 = float((q2(x)[0] - ref).norm() / ref.norm())
    assert e8 < 0.02 and e2 > 5 * e8, (e8, e2)
