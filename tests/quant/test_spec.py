"""QuantSpec integer grids and W-A-Attention bit-config parsing."""

import pytest

from p4q_engine.errors import ConfigError
from p4q_engine.quant.spec import (
    BIT_CONFIGS,
    SUPPORTED_BITS,
    BitConfig,
    QuantSpec,
    act_spec,
    parse_bit_config,
    weight_spec,
)

# Hand-written grids (not derived from the code's formula).
SIGNED_RANGES = {2: (-2, 1), 3: (-4, 3), 4: (-8, 7), 8: (-128, 127)}
UNSIGNED_RANGES = {2: (0, 3), 3: (0, 7), 4: (0, 15), 8: (0, 255)}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_signed_grid(bits):
    spec = QuantSpec(bits, signed=True)
    assert (spec.qmin, spec.qmax) == SIGNED_RANGES[bits]
    assert spec.qmax - spec.qmin + 1 == spec.levels == 2**bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unsigned_grid(bits):
    spec = QuantSpec(bits, signed=False)
    assert (spec.qmin, spec.qmax) == UNSIGNED_RANGES[bits]
    assert spec.qmax - spec.qmin + 1 == spec.levels == 2**bits


def test_supported_bits_are_exactly_2_3_4_8():
    assert tuple(sorted(SUPPORTED_BITS)) == (2, 3, 4, 8)


@pytest.mark.parametrize("bits", [1, 5, 16, 0, -4, True, False, "4", 4.0, None])
@pytest.mark.parametrize("signed", [True, False])
def test_unsupported_bits_raise_config_error(bits, signed):
    with pytest.raises(ConfigError):
        QuantSpec(bits, signed=signed)


@pytest.mark.parametrize("bits", [1, 5, 16, True, "4"])
def test_spec_helpers_reject_unsupported_bits(bits):
    with pytest.raises(ConfigError):
        weight_spec(bits)
    with pytest.raises(ConfigError):
        act_spec(bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_and_act_spec_helpers(bits):
    w = weight_spec(bits)
    assert w.signed and w.per_channel and w.ch_axis == 0 and w.bits == bits
    a = act_spec(bits)
    assert not a.signed and not a.per_channel and a.bits == bits
    assert act_spec(bits, per_channel=True).per_channel
    assert weight_spec(None) is None and act_spec(None) is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8-8-8", (8, 8, 8)),
        ("4-4-8", (4, 4, 8)),
        ("3-3-8", (3, 3, 8)),
        ("2-2-8", (2, 2, 8)),
        ("4-8-8", (4, 8, 8)),
        ("2-3-4", (2, 3, 4)),
        (" 4-4-8 ", (4, 4, 8)),
        ("fp32", (None, None, None)),
        ("FP32", (None, None, None)),
    ],
)
def test_parse_bit_config_accepts(text, expected):
    cfg = parse_bit_config(text)
    assert isinstance(cfg, BitConfig)
    assert (cfg.w_bits, cfg.a_bits, cfg.attn_bits) == expected
    assert cfg.is_float == (expected == (None, None, None))


@pytest.mark.parametrize(
    "text",
    ["5-5-8", "4-4-16", "1-4-8", "8-8-5", "4-4", "4-4-8-8", "a-b-c", "", "   ", "4_4_8", "-4-4-8", "fp16", "int8"],
)
def test_parse_bit_config_rejects(text):
    with pytest.raises(ConfigError):
        parse_bit_config(text)


def test_config_error_is_a_value_error():
    # The CLI catches P4QError; library users catching ValueError must also see it.
    with pytest.raises(ValueError):
        parse_bit_config("5-5-8")


def test_parse_bit_config_passes_bitconfig_through_and_registry_is_consistent():
    cfg = BitConfig("custom", 3, 4, 8)
    assert parse_bit_config(cfg) is cfg
    for name, cfg in BIT_CONFIGS.items():
        assert parse_bit_config(name) == cfg
        if not cfg.is_float:
            assert name == f"{cfg.w_bits}-{cfg.a_bits}-{cfg.attn_bits}"
