"""Which sites of CLIP are quantized, at which bits: the quantization scopes, by name.

A :class:`QuantRecipe` (bit config + scope + observer) expands to a :class:`ScopePlan` through the :data:`SCOPES`
registry. The plan is the single place that says, for example, that the patch embedding stays at 8 bits in the
``full`` scope; :class:`~p4q_engine.clip.qmodel.QuantCLIP` only follows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from p4q_engine.errors import ConfigError
from p4q_engine.quant.observers import OBSERVERS, make_observer
from p4q_engine.quant.spec import BitConfig, QuantSpec, act_spec, check_bits, parse_bit_config, weight_spec


@dataclass(frozen=True)
class SiteBits:
    """Weight and input-activation bits of one kind of layer (``None`` = float)."""

    w: Optional[int]
    a: Optional[int]


@dataclass(frozen=True)
class ScopePlan:
    """Bits for every kind of site in both towers."""

    patch_embed: SiteBits  # conv1 weights and the image entering it
    block_linear: SiteBits  # attention in/out projections and MLP c_fc/c_proj of every residual block
    attn: Optional[int]  # q, k, v and softmax probabilities
    token_embed: Optional[int]  # token embedding table (weights, per row)
    text_input: Optional[int]  # the text tower's input embeddings incl. a learned prompt (Eq. 8-9)
    proj: SiteBits  # final image and text projections


def _full(bits: BitConfig, edge: int) -> ScopePlan:
    """Everything the integer engine executes: every block Linear at W/A bits, attention matmuls at Attention bits;
    patch embedding, token embedding, text input and the final projections at ``edge`` bits."""
    return ScopePlan(
        patch_embed=SiteBits(edge, edge),
        block_linear=SiteBits(bits.w_bits, bits.a_bits),
        attn=bits.attn_bits,
        token_embed=edge,
        text_input=edge,
        proj=SiteBits(edge, edge),
    )


def _release(bits: BitConfig, edge: int) -> ScopePlan:
    """What the authors' released code quantizes: only the patch embedding and its input at W/A bits; every block
    Linear at 8 bits; attention matmuls left in float. Use it to compare with the paper's numbers."""
    return ScopePlan(
        patch_embed=SiteBits(bits.w_bits, bits.a_bits),
        block_linear=SiteBits(8, 8),
        attn=None,
        token_embed=edge,
        text_input=edge,
        proj=SiteBits(edge, edge),
    )


_FLOAT = ScopePlan(SiteBits(None, None), SiteBits(None, None), None, None, None, SiteBits(None, None))

#: Quantization scopes by name.
SCOPES: dict[str, Callable[[BitConfig, int], ScopePlan]] = {"full": _full, "release": _release}


@dataclass(frozen=True)
class QuantRecipe:
    """How to quantize a CLIP model: ``QuantRecipe("4-4-8", scope="full", observer="omse")``.

    ``observer_kwargs`` are passed to the observer of every *activation* quantization site (e.g.
    ``QuantRecipe("4-4-8", observer="percentile", observer_kwargs={"percentile": 99.0})``); weights are calibrated
    with the same observer at its defaults. The recipe keeps its own copy of the dict, and the dict takes no part in
    ``hash()`` (dicts are unhashable), only in ``==``.
    """

    bits: BitConfig | str = "8-8-8"
    scope: str = "full"
    observer: str = "omse"
    edge_bits: int = 8
    per_channel_act: bool = False
    observer_kwargs: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", parse_bit_config(self.bits))
        if self.scope not in SCOPES:
            raise ConfigError(f"unknown scope {self.scope!r}; choose from {', '.join(SCOPES)}")
        if self.observer.lower() not in OBSERVERS:
            raise ConfigError(f"unknown observer {self.observer!r}; choose from {', '.join(OBSERVERS)}")
        object.__setattr__(self, "observer", self.observer.lower())
        check_bits(self.edge_bits)
        kwargs = dict(self.observer_kwargs or {})
        try:  # fail here, not at the first calibration batch, on a keyword the observer does not take
            make_observer(self.observer, act_spec(8), **kwargs)
        except TypeError as e:
            raise ConfigError(f"bad observer_kwargs for the {self.observer} observer: {e}") from None
        object.__setattr__(self, "observer_kwargs", kwargs)

    @property
    def name(self) -> str:
        """``bits/scope/observer`` plus any setting off its default, so two different recipes never share a name
        (reports, caches)."""
        obs = self.observer
        if self.observer_kwargs:
            obs += "(" + ",".join(f"{k}={v}" for k, v in sorted(self.observer_kwargs.items())) + ")"
        extra = ([f"edge{self.edge_bits}"] if self.edge_bits != 8 else []) + (
            ["act-per-channel"] if self.per_channel_act else []
        )
        return "/".join([self.bits.name, self.scope, obs, *extra])

    def plan(self) -> ScopePlan:
        return _FLOAT if self.bits.is_float else SCOPES[self.scope](self.bits, self.edge_bits)

    def w(self, bits: Optional[int]) -> Optional[QuantSpec]:
        return weight_spec(bits)

    def a(self, bits: Optional[int]) -> Optional[QuantSpec]:
        return act_spec(bits, self.per_channel_act)

    def attn(self, bits: Optional[int]) -> Optional[QuantSpec]:
        """q/k/v/probabilities are always per tensor: a per-channel scale would not factor out of the matmul."""
        return act_spec(bits, per_channel=False)
