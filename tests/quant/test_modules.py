"""Fake-quant modules: ActQuantizer modes, QuantLinear / QuantConv2d / QuantEmbedding."""

import pytest
import torch
from torch import nn

from p4q_engine.errors import CalibrationError
from p4q_engine.quant.modules import ActQuantizer, QuantConv2d, QuantEmbedding, QuantLinear, QuantMode
from p4q_engine.quant.quantizer import dequantize
from p4q_engine.quant.spec import act_spec, weight_spec


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: on a shared 2-core box, OpenMP threads waiting for each other cost ~16 ms per op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(seed: int, fin: int = 48, fout: int = 24, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(fin, fout, bias=bias)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def _calibrated_act(bits: int, observer: str, batches) -> ActQuantizer:
    q = ActQuantizer(act_spec(bits), observer)
    q.start_calibration()
    for b in batches:
        q(b)
    q.freeze()
    return q


# ----------------------------------------------------------------------------------------------- ActQuantizer
@pytest.mark.parametrize("observer", ["minmax", "omse", "percentile", "ema"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_act_quantizer_modes(observer, bits):
    q = ActQuantizer(act_spec(bits), observer)
    x = torch.randn(4, 10, 16, generator=_gen(bits))
    assert q.enabled and not q.calibrated and q.mode is QuantMode.OFF
    assert q(x) is x  # off: pass-through
    with pytest.raises(CalibrationError):
        q.qparams()
    q.start_calibration()
    assert q.mode is QuantMode.CALIBRATE
    y = q(x)
    assert torch.equal(y, x)  # calibrate: observed, unchanged
    q(x * 1.5)
    assert q.observer.batches == 2
    q.freeze()
    assert q.mode is QuantMode.QUANT and q.calibrated and q.observer is None
    out = q(x)
    assert out.shape == x.shape
    n_distinct = out.unique().numel()
    assert 2 <= n_distinct <= 2**bits
    assert not torch.equal(out, x)
    if bits == 8:
        assert _rel_err(out, x) < 0.05
    # Setting the mode back to off restores the pass-through.
    q.mode = QuantMode.OFF
    assert q(x) is x


def test_act_quantizer_without_spec_is_pass_through():
    q = ActQuantizer(None)
    x = torch.randn(3, 5)
    assert not q.enabled
    q.start_calibration()
    q.freeze()
    q.mode = QuantMode.QUANT
    assert q(x) is x
    with pytest.raises(CalibrationError):
        q.qparams()


def test_act_quantizer_freeze_without_data_raises():
    q = ActQuantizer(act_spec(8), "minmax")
    q.start_calibration()
    with pytest.raises(CalibrationError):
        q.freeze()


def test_act_quantizer_lower_bits_worse():
    x = torch.randn(2000, generator=_gen(1))
    errs = [_rel_err(_calibrated_act(b, "minmax", [x])(x), x) for b in (8, 4, 3, 2)]
    assert errs == sorted(errs) and errs[0] < 0.02 and errs[-1] > 0.1


@pytest.mark.parametrize("observer", ["minmax", "omse"])
def test_act_quantizer_state_dict_round_trip(observer):
    src = _calibrated_act(4, observer, [torch.randn(256, generator=_gen(2)) * 3 + 1])
    sd = src.state_dict()
    assert sd["scale"].numel() == 1 and sd["zero_point"].dtype == torch.int32
    dst = ActQuantizer(act_spec(4), observer)
    assert not dst.calibrated
    dst.load_state_dict(sd)
    assert dst.calibrated and dst.mode is QuantMode.QUANT
    assert torch.equal(dst.scale, src.scale) and torch.equal(dst.zero_point, src.zero_point)
    x = torch.randn(100, generator=_gen(3)) * 3
    assert torch.equal(dst(x), src(x))


def test_act_quantizer_set_qparams():
    src = _calibrated_act(8, "minmax", [torch.randn(64, generator=_gen(4))])
    dst = ActQuantizer(act_spec(8))
    dst.set_qparams(src.qparams())
    x = torch.randn(64, generator=_gen(5))
    assert dst.mode is QuantMode.QUANT and torch.equal(dst(x), src(x))


# ----------------------------------------------------------------------------------------------- QuantLinear
@pytest.mark.parametrize("bias", [True, False])
def test_quant_linear_float_equals_linear(bias):
    lin = _linear(0, bias=bias)
    q = QuantLinear.from_linear(lin, None, None)
    x = torch.randn(5, 7, 48, generator=_gen(6))
    with torch.no_grad():
        assert torch.equal(q(x), lin(x))
    assert q.weight is not lin.weight  # a copy, not a view of the original


def _calibrated_linear(lin: nn.Linear, bits: int, x: torch.Tensor, observer: str = "omse") -> QuantLinear:
    q = QuantLinear.from_linear(lin, weight_spec(bits), act_spec(bits), observer)
    q.input_quant.start_calibration()
    q(x)
    q.input_quant.freeze()
    return q


def test_quant_linear_error_grows_as_bits_shrink():
    lin = _linear(1)
    x = torch.randn(64, 48, generator=_gen(7))
    with torch.no_grad():
        ref = lin(x)
        errs = {b: _rel_err(_calibrated_linear(lin, b, x)(x), ref) for b in (8, 4, 2)}
    assert errs[8] < 0.02, errs
    assert errs[2] > 5 * errs[8] and errs[2] > 0.1, errs
    assert errs[8] < errs[4] < errs[2], errs


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("observer", ["minmax", "omse"])
def test_weight_codes_in_range_and_dequantize_to_quantized_weight(bits, observer):
    lin = _linear(bits)
    q = QuantLinear.from_linear(lin, weight_spec(bits), None, observer)
    codes, qp = q.weight_codes()
    assert codes.dtype == torch.int8 and codes.shape == lin.weight.shape
    assert int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) <= 2 ** (bits - 1) - 1
    assert qp.scale.shape == (lin.out_features,) and (qp.zero_point == 0).all()
    assert torch.allclose(dequantize(codes, qp), q.quantized_weight(), rtol=0, atol=1e-7)
    # Per-row distinct values: at most 2^bits levels per output channel.
    wq = q.quantized_weight()
    assert max(row.unique().numel() for row in wq) <= 2**bits
    # Weight-only quantization: forward uses exactly the quantized weight.
    x = torch.randn(3, 48, generator=_gen(8))
    with torch.no_grad():
        assert torch.allclose(q(x), x @ wq.T + lin.bias, atol=1e-5)


def test_trainable_weight_gets_ste_gradient_and_cache_is_invalidated():
    lin = _linear(2)
    q = QuantLinear.from_linear(lin, weight_spec(4), None, "omse")
    q.weight.requires_grad_(True)
    opt = torch.optim.SGD([q.weight], lr=0.5)
    x = torch.randn(16, 48, generator=_gen(9))
    target = torch.randn(16, 24, generator=_gen(10))
    wq_before = q.quantized_weight().detach().clone()
    loss = (q(x) - target).pow(2).mean()
    loss.backward()
    g = q.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # Trainable weights use min/max ranges, so nothing is clipped and the STE passes d loss / d w_q through as is.
    wq_leaf = wq_before.clone().requires_grad_(True)
    ((x @ wq_leaf.T + q.bias - target).pow(2).mean()).backward()
    assert torch.allclose(g, wq_leaf.grad, atol=1e-6)
    opt.step()
    wq_after = q.quantized_weight().detach()
    assert not torch.equal(wq_after, wq_before)
    # The cache now matches a freshly built layer on the updated weight.
    fresh = QuantLinear(q.weight.detach(), q.bias, weight_spec(4), None, "minmax")
    assert torch.allclose(wq_after, fresh.quantized_weight(), atol=1e-7)
    loss2 = (q(x) - target).pow(2).mean()
    assert float(loss2.detach()) < float(loss.detach())


def test_frozen_weight_quantized_once_and_cached():
    q = QuantLinear.from_linear(_linear(3), weight_spec(4), None, "omse")
    w1 = q.quantized_weight()
    assert q.quantized_weight() is w1
    with torch.no_grad():
        q.weight.mul_(2.0)  # an in-place update bumps the version counter
    w2 = q.quantized_weight()
    assert w2 is not w1 and torch.allclose(w2, 2 * w1, rtol=1e-5, atol=1e-7)


def test_weight_cache_invalidated_by_dtype_change():
    """``.half()`` swaps in new storage whose version counter can equal the old one: the cache must not survive."""
    q = QuantLinear.from_linear(_linear(11), weight_spec(4), None, "minmax")
    w32 = q.quantized_weight()
    assert w32.dtype == torch.float32
    q.half()
    assert q.weight._version == 0  # the counter alone cannot tell the weights apart
    w16 = q.quantized_weight()
    assert w16.dtype == torch.float16 and q.weight_qparams().scale.device == q.weight.device
    fresh = QuantLinear(q.weight.detach(), None, weight_spec(4), None, "minmax")
    assert torch.equal(w16, fresh.quantized_weight())
    # Same weight, fp16-rounded: a value on a rounding boundary may move by one quantization step, never more.
    step = q.weight_qparams().scale.float().reshape(-1, 1)
    assert ((w16.float() - w32).abs() <= 1.01 * step + 1e-4).all()
    q.float()
    assert q.quantized_weight().dtype == torch.float32


def test_weight_cache_invalidated_by_load_state_dict_assign():
    """``load_state_dict(..., assign=True)`` replaces the parameter tensor (new storage, fresh version counter)."""
    q = QuantLinear.from_linear(_linear(12), weight_spec(4), None, "minmax")
    stale = q.quantized_weight().clone()
    other = QuantLinear.from_linear(_linear(13), weight_spec(4), None, "minmax")
    sd = {k: v.clone() for k, v in other.state_dict().items()}
    assert sd["weight"]._version == q.weight._version
    q.load_state_dict(sd, assign=True)
    got = q.quantized_weight()
    assert not torch.equal(got, stale)
    assert torch.equal(got, other.quantized_weight())
    codes, qp = q.weight_codes()
    assert torch.equal(qp.scale, other.weight_qparams().scale)


def test_weight_cache_key_includes_storage_device_dtype():
    q = QuantLinear.from_linear(_linear(14), weight_spec(4), None, "minmax")
    q.quantized_weight()
    key = q._wq_cache[0]
    w = q.weight
    assert w._version in key and w.data_ptr() in key and w.device in key and w.dtype in key
    with torch.no_grad():
        q.weight.data = q.weight.data.clone()  # same values, new storage
    assert q._weight_cache_key() != key


def test_weight_qparams_unquantized_raises():
    q = QuantLinear.from_linear(_linear(4), None, act_spec(8))
    assert q.quantized_weight() is q.weight
    with pytest.raises(CalibrationError):
        q.weight_qparams()


def test_uncalibrated_input_quantizer_raises_in_quant_mode():
    q = QuantLinear.from_linear(_linear(5), weight_spec(8), act_spec(8))
    q.input_quant.mode = QuantMode.QUANT
    with pytest.raises(CalibrationError):
        q(torch.randn(2, 48))


# ----------------------------------------------------------------------------------------------- Conv / Embedding
def test_quant_conv2d_float_and_8bit():
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 16, kernel_size=4, stride=4)
    x = torch.randn(2, 3, 16, 16, generator=_gen(11))
    with torch.no_grad():
        ref = conv(x)
        assert torch.allclose(QuantConv2d(conv, None, None)(x), ref, atol=1e-6)
        q = QuantConv2d(conv, weight_spec(8), act_spec(8), "minmax")
        q.input_quant.start_calibration()
        q(x)
        q.input_quant.freeze()
        e8 = _rel_err(q(x), ref)
        q2 = QuantConv2d(conv, weight_spec(2), act_spec(2), "minmax")
        q2.input_quant.start_calibration()
        q2(x)
        q2.input_quant.freeze()
        e2 = _rel_err(q2(x), ref)
    assert e8 < 0.02 and e2 > 5 * e8
    codes, qp = q.weight_codes()
    assert codes.shape == conv.weight.shape and qp.scale.shape == (16,)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_quant_embedding(bits):
    torch.manual_seed(7)
    emb = nn.Embedding(30, 12)
    q = QuantEmbedding(emb, weight_spec(bits), "omse")
    tokens = torch.randint(0, 30, (4, 9), generator=_gen(12))
    out = q(tokens)
    with torch.no_grad():
        ref = emb(tokens)
    if bits is None:
        assert torch.equal(out, ref)
    else:
        codes, qp = q.weight_codes()
        assert qp.scale.shape == (30,)  # one scale per token row
        assert torch.allclose(out, dequantize(codes, qp)[tokens], atol=1e-7)
        assert _rel_err(out, ref) < (0.02 if bits == 8 else 0.2)
