"""Quantization core: specs, the affine quantizer, observers and fake-quant modules."""

from p4q_engine.quant.modules import ActQuantizer, QuantConv2d, QuantEmbedding, QuantLinear, QuantMode
from p4q_engine.quant.observers import OBSERVERS, Observer, make_observer
from p4q_engine.quant.quantizer import QParams, dequantize, fake_quantize, qparams_from_range, quantize, round_half_up
from p4q_engine.quant.spec import (
    BIT_CONFIGS,
    SUPPORTED_BITS,
    BitConfig,
    QuantSpec,
    act_spec,
    parse_bit_config,
    weight_spec,
)

__all__ = [
    "ActQuantizer",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantLinear",
    "QuantMode",
    "OBSERVERS",
    "Observer",
    "make_observer",
    "QParams",
    "dequantize",
    "fake_quantize",
    "qparams_from_range",
    "quantize",
    "round_half_up",
    "BIT_CONFIGS",
    "SUPPORTED_BITS",
    "BitConfig",
    "QuantSpec",
    "act_spec",
    "parse_bit_config",
    "weight_spec",
]
