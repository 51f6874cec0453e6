"""CPU engine: runs a ``.p4q`` artifact with the integer arithmetic the GPU kernels execute.

Every quantized Linear takes uint8 activation codes (``quantize`` of the shared quantizer, zero point subtracted)
and int8 weight codes unpacked from the artifact, accumulates their products exactly - in float64, whose 53-bit
mantissa holds any int32 accumulator of these shapes, so the sum equals int32 accumulation bit for bit - and then
dequantizes with ``acc * (s_act * s_weight[n]) + bias``. Attention does the same for q.k^T and p.v. LayerNorm,
softmax, GELU and residual adds run in float32. The result matches the fake-quant reference up to float rounding of
the dequantization (tested: top-1 agreement on the reference task).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from p4q_engine.artifact.bitpack import from_unsigned, unpack
from p4q_engine.artifact.format import Artifact, ArtifactError, load
from p4q_engine.artifact.schema import ManifestSpec, parse_site, validate_manifest
from p4q_engine.errors import ConfigError, P4QError
from p4q_engine.quant.quantizer import QParams, dequantize, quantize
from p4q_engine.quant.spec import SIGNED_GRIDS, QuantSpec
from p4q_engine.runtime.images import ImageInput, build_transform


@dataclass
class Site:
    """Per-tensor unsigned activation quantization of one site."""

    qp: QParams

    @classmethod
    def from_manifest(cls, d: Optional[dict[str, Any]], name: str = "?") -> Optional["Site"]:
        """The site a manifest entry describes (``None``: float), checked by the schema - strict types, a finite
        positive scale, a zero point inside the grid - so no ``int()``/``bool()`` coercion can invent one."""
        site = parse_site(name, d)
        if site is None:
            return None
        return cls(
            QParams(
                torch.tensor(site.scale),
                torch.tensor(site.zero_point, dtype=torch.int32),
                QuantSpec(site.bits, signed=False),
            )
        )

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-point-corrected integer codes as float64 (exact)."""
        return quantize(x, self.qp).to(torch.float64) - float(self.qp.zero_point)

    @property
    def scale(self) -> torch.Tensor:
        return self.qp.scale


def _packed_spec(name: str, layout: dict[str, Any]) -> QuantSpec:
    """The weight grid a packed tensor's layout declares. Artifacts written before layouts named their grid hold the
    ``full`` two's-complement grid (what the quantizer has always produced), so a missing ``grid`` means that."""
    if layout.get("signed") is not True:
        raise ArtifactError(f"tensor {name}.p0: packed weights must be signed (layout says {layout.get('signed')!r})")
    grid = layout.get("grid", "full")
    if grid not in SIGNED_GRIDS:
        raise ArtifactError(
            f"tensor {name}.p0: unknown weight grid {grid!r}; this engine reads {', '.join(SIGNED_GRIDS)}"
        )
    spec = QuantSpec(int(layout["bits"]), signed=True, per_channel=True, narrow_range=SIGNED_GRIDS[grid])
    if layout.get("offset", spec.storage_offset) != spec.storage_offset:
        raise ArtifactError(
            f"tensor {name}.p0: stored-code offset {layout.get('offset')!r} is not {spec.storage_offset} (2^(bits-1))"
        )
    return spec


def unpack_weight(art: Artifact, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes ``[N, K]`` (int8) and per-row scales of a packed tensor."""
    layout = art.layout(f"{name}.p0")
    if layout.get("kind") != "packed":
        raise ArtifactError(f"tensor {name}.p0 is not packed")
    spec = _packed_spec(name, layout)
    rows, k = layout["logical_shape"]
    planes = [art.tensors[f"{name}.p{i}"] for i in range(len(layout["planes"]))]
    codes = from_unsigned(unpack(planes, spec.bits, k), spec)
    if codes.numel() and (int(codes.min()) < spec.qmin or int(codes.max()) > spec.qmax):
        raise ArtifactError(
            f"tensor {name}: codes [{int(codes.min())}, {int(codes.max())}] lie outside its "
            f"{spec.grid} {spec.bits}-bit grid [{spec.qmin}, {spec.qmax}]"
        )
    scale = art.tensors[f"{name}_scale"]
    if codes.shape != (rows, k) or scale.shape != (rows,):
        raise ArtifactError(f"tensor {name}: packed shape does not match its logical shape")
    return codes, scale


class IntLinear:
    """``y = x W^T + b`` with integer codes (see module docstring); float where the artifact stores floats."""

    def __init__(self, art: Artifact, prefix: str) -> None:
        d = art.manifest["linears"][prefix]
        self.site = Site.from_manifest(art.manifest["sites"][d["in_site"]]) if d["in_site"] else None
        if d["weight_bits"] is None:
            self.w_codes, self.w_scale = None, None
            self.w_float = art.tensors[f"{prefix}.weight"].t().contiguous()  # [K, N]
        else:
            codes, self.w_scale = unpack_weight(art, f"{prefix}.w")
            if int(art.layout(f"{prefix}.w.p0")["bits"]) != d["weight_bits"]:
                raise ArtifactError(f"{prefix}: weight bits disagree between layout and layer table")
            self.w_codes = codes.to(torch.float64).t().contiguous()  # [K, N]
            self.w_float = (codes.float() * self.w_scale[:, None]).t().contiguous()
        self.bias = art.tensors.get(f"{prefix}.bias") if d["bias"] else None
        self.in_features, self.out_features = d["in_features"], d["out_features"]
        if tuple(self.w_float.shape) != (self.in_features, self.out_features):
            raise ArtifactError(
                f"{prefix}: weight shape {tuple(self.w_float.shape[::-1])} does not match the layer "
                f"table ({self.out_features}, {self.in_features})"
            )
        if self.bias is not None and tuple(self.bias.shape) != (self.out_features,):
            raise ArtifactError(f"{prefix}: bias shape does not match out_features")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ConfigError(f"expected {self.in_features} input features, got {x.shape[-1]}")
        if self.site is not None and self.w_codes is not None:
            acc = self.site.codes(x) @ self.w_codes  # exact integer accumulation
            y = acc.float() * (self.site.scale * self.w_scale)
        else:
            xin = x if self.site is None else dequantize(quantize(x, self.site.qp), self.site.qp)
            y = xin @ self.w_float
        return y if self.bias is None else y + self.bias


def patchify(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Non-overlapping patches ``[B, L, C*ph*pw]`` in ``(c, kh, kw)`` order - the patch-embedding GEMM's input.

    Equal to ``F.unfold(x, patch, stride=patch).transpose(1, 2)`` but one reshape and one copy (on an H100,
    ``F.unfold``'s im2col took 80% of the whole engine at batch 1024).
    """
    b, c, h, w = x.shape
    ph, pw = patch
    x = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // ph) * (w // pw), c * ph * pw)


def _act(name: str):
    acts = {
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    }
    if name not in acts:
        raise ArtifactError(f"unknown activation {name!r}")
    return acts[name]


class _Block:
    """One residual attention block of the image tower."""

    def __init__(self, art: Artifact, p: str, cfg: dict[str, Any]) -> None:
        t, sites = art.tensors, art.manifest["sites"]
        self.ln_1 = (t[f"{p}.ln_1.weight"], t[f"{p}.ln_1.bias"])
        self.ln_2 = (t[f"{p}.ln_2.weight"], t[f"{p}.ln_2.bias"])
        self.ls_1, self.ls_2 = t.get(f"{p}.ls_1"), t.get(f"{p}.ls_2")
        self.in_proj = IntLinear(art, f"{p}.attn.in_proj")
        self.out_proj = IntLinear(art, f"{p}.attn.out_proj")
        self.c_fc, self.c_proj = IntLinear(art, f"{p}.mlp.c_fc"), IntLinear(art, f"{p}.mlp.c_proj")
        self.q, self.k, self.v, self.p = (Site.from_manifest(sites[f"{p}.attn.{s}"]) for s in "qkvp")
        self.heads, self.eps, self.act = cfg["heads"], cfg["ln_eps"], _act(cfg["act"])

    def _ln(self, x, wb):
        return F.layer_norm(x, x.shape[-1:], wb[0], wb[1], self.eps)

    @staticmethod
    def _int_matmul(a: torch.Tensor, sa: Optional[Site], b: torch.Tensor, sb: Optional[Site]) -> torch.Tensor:
        """``a @ b`` with both operands quantized at their sites (exact integer products) or in float."""
        if sa is None or sb is None:
            a = a if sa is None else dequantize(quantize(a, sa.qp), sa.qp)
            b = b if sb is None else dequantize(quantize(b, sb.qp), sb.qp)
            return a.float() @ b.float()
        return (sa.codes(a) @ sb.codes(b)).float() * (sa.scale * sb.scale)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        hd = d // self.heads
        q, k, v = (t.view(b, n, self.heads, hd).transpose(1, 2) for t in self.in_proj(x).chunk(3, dim=-1))
        logits = self._int_matmul(q, self.q, k.transpose(-2, -1), self.k) * (1.0 / math.sqrt(hd))
        probs = torch.softmax(logits, dim=-1)
        out = self._int_matmul(probs, self.p, v, self.v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention(self._ln(x, self.ln_1))
        x = x + (a if self.ls_1 is None else a * self.ls_1)
        m = self.c_proj(self.act(self.c_fc(self._ln(x, self.ln_2))))
        return x + (m if self.ls_2 is None else m * self.ls_2)


_VISION_KEYS = (
    "image_size",
    "patch_size",
    "grid_size",
    "width",
    "layers",
    "heads",
    "pool_type",
    "final_ln_after_pool",
    "ln_pre",
    "act",
    "ln_eps",
)
_POOL_TYPES = ("tok", "avg")


def _cfg_int(cfg: dict[str, Any], key: str, lo: int = 1) -> int:
    v = cfg[key]
    if type(v) is not int or v < lo:  # type(): a bool is not a count
        raise ArtifactError(f"vision config: {key} must be an integer >= {lo}, got {v!r}")
    return v


def _cfg_pair(cfg: dict[str, Any], key: str) -> tuple[int, int]:
    v = cfg[key]
    if not isinstance(v, list) or len(v) != 2 or not all(type(e) is int and e >= 1 for e in v):
        raise ArtifactError(f"vision config: {key} must be two positive integers, got {v!r}")
    return v[0], v[1]


def _block_indices(names) -> set[int]:
    """Indices ``i`` of every ``visual.blocks.<i>.*`` name (a non-numeric index counts as -1: never expected)."""
    out = set()
    for n in names:
        if n.startswith("visual.blocks."):
            i = n.split(".")[2]
            out.add(int(i) if i.isdecimal() else -1)
    return out


def validate_vision_config(art: Artifact) -> dict[str, Any]:
    """Check the manifest's ``vision`` config against itself and against the tensors and layer table present.

    Every engine calls this before building anything, so an artifact whose config cannot describe its own weights
    (``heads`` not dividing ``width``, a ``layers`` count that disagrees with the blocks stored, a patch grid that
    does not tile the image, ...) is refused at load with an :class:`ArtifactError` naming the problem instead of
    failing - or silently running a different network - at the first request. Returns the config.
    """
    man, t = art.manifest, art.tensors
    cfg = man.get("vision")
    if not isinstance(cfg, dict):
        raise ArtifactError("manifest has no vision config")
    missing = [k for k in _VISION_KEYS if k not in cfg]
    if missing:
        raise ArtifactError(f"vision config is missing {', '.join(missing)}")
    linears = man.get("linears")
    if not isinstance(linears, dict):
        raise ArtifactError("manifest has no layer table")
    width, layers, heads = _cfg_int(cfg, "width"), _cfg_int(cfg, "layers"), _cfg_int(cfg, "heads")
    if width % heads:
        raise ArtifactError(f"vision config: heads ({heads}) does not divide width ({width})")
    image, patch, grid = _cfg_pair(cfg, "image_size"), _cfg_pair(cfg, "patch_size"), _cfg_pair(cfg, "grid_size")
    if any(i % p for i, p in zip(image, patch)):
        raise ArtifactError(f"vision config: patch_size {list(patch)} does not tile image_size {list(image)}")
    if tuple(i // p for i, p in zip(image, patch)) != grid:
        raise ArtifactError(
            f"vision config: grid_size {list(grid)} is not image_size {list(image)} / patch_size {list(patch)}"
        )
    if cfg["pool_type"] not in _POOL_TYPES:
        raise ArtifactError(
            f"vision config: unsupported pool_type {cfg['pool_type']!r} (the engine pools {' or '.join(_POOL_TYPES)})"
        )
    _act(cfg["act"])
    eps = cfg["ln_eps"]
    if type(eps) not in (int, float) or not 0.0 < eps < 1.0:
        raise ArtifactError(f"vision config: ln_eps must be a small positive number, got {eps!r}")
    for key in ("final_ln_after_pool", "ln_pre"):
        if not isinstance(cfg[key], bool):
            raise ArtifactError(f"vision config: {key} must be true or false, got {cfg[key]!r}")

    # The blocks stored, in the tensors and in the layer table, are exactly blocks 0 .. layers-1 (the count is
    # compared first, so a huge ``layers`` never sizes anything).
    for what, names in (("tensors", t), ("layer table", linears)):
        found = _block_indices(names)
        if len(found) != layers or found != set(range(layers)):
            have = sorted(found)
            raise ArtifactError(
                f"vision config says {layers} layers but the {what} hold blocks "
                f"{have if len(have) <= 8 else have[:4] + ['...'] + have[-2:]}"
            )

    def lin(prefix: str, fin: int, fout: Optional[int]) -> dict[str, Any]:
        d = linears.get(prefix)
        if not isinstance(d, dict):
            raise ArtifactError(f"layer table has no {prefix}")
        got = (d.get("in_features"), d.get("out_features"))
        if got[0] != fin or (fout is not None and got[1] != fout):
            want = f"({fin} -> {fout if fout is not None else 'any'})"
            raise ArtifactError(
                f"{prefix} is {got[0]} -> {got[1]} features, the vision config (width {width}) implies {want}"
            )
        return d

    lin("visual.conv", 3 * patch[0] * patch[1], width)
    mlp = cfg.get("mlp_width", linears.get("visual.blocks.0.mlp.c_fc", {}).get("out_features"))
    if type(mlp) is not int or mlp < 1:
        raise ArtifactError(f"vision config: mlp_width must be a positive integer, got {mlp!r}")
    for i in range(layers):
        p = f"visual.blocks.{i}"
        lin(f"{p}.attn.in_proj", width, 3 * width)
        lin(f"{p}.attn.out_proj", width, width)
        lin(f"{p}.mlp.c_fc", width, mlp)
        lin(f"{p}.mlp.c_proj", mlp, width)
        for j in (1, 2):
            ls = t.get(f"{p}.ls_{j}")
            if cfg.get("layer_scale") is False and ls is not None:
                raise ArtifactError(f"{p}.ls_{j} is stored but the vision config has no layer scale")
            if cfg.get("layer_scale") is True and ls is None:
                raise ArtifactError(f"vision config has layer scale but {p}.ls_{j} is missing")
            if ls is not None and tuple(ls.shape) != (width,):
                raise ArtifactError(f"{p}.ls_{j} has shape {list(ls.shape)}, expected [{width}]")
    out_dim = lin("visual.proj", width, cfg.get("output_dim"))["out_features"]
    norms = [
        "visual.ln_post",
        *(["visual.ln_pre"] if cfg["ln_pre"] else []),
        *(f"visual.blocks.{i}.ln_{j}" for i in range(layers) for j in (1, 2)),
    ]
    for name in ["visual.class_embedding", *(f"{n}.{wb}" for n in norms for wb in ("weight", "bias"))]:
        if name not in t:
            raise ArtifactError(f"missing tensor {name}")
        if tuple(t[name].shape) != (width,):
            raise ArtifactError(f"{name} has shape {list(t[name].shape)}, expected [width] = [{width}]")
    if man.get("adapter") is not None:
        lin("adapter.fc1", out_dim, None)
        lin("adapter.fc2", linears["adapter.fc1"].get("out_features"), out_dim)
    dim = (man.get("classes") or {}).get("dim") if isinstance(man.get("classes"), dict) else None
    if dim is not None and dim != out_dim:
        raise ArtifactError(f"class features have dimension {dim}, the image tower outputs {out_dim}")
    return cfg


@dataclass
class Prediction:
    """Top-k classes of one image."""

    labels: list[str]
    probs: list[float]
    indices: list[int]


class Engine:
    """Serve zero-shot classification from a ``.p4q`` artifact: ``Engine.load(path).classify(images)``."""

    def __init__(self, art: Artifact, device: str = "cpu") -> None:
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ConfigError(f"unknown device {device!r} ({str(e).splitlines()[0] if str(e) else e})") from None
        self._check_device()
        try:
            self._build_common(art)
            self._build_tower(art)
        except ArtifactError:
            raise
        except (
            P4QError,
            LookupError,
            TypeError,
            ValueError,
            RuntimeError,
            AttributeError,
            ArithmeticError,
            AssertionError,
        ) as e:  # P4QError: e.g. ConfigError("unsupported bit width 5") from a layout;
            # ArithmeticError: OverflowError, ZeroDivisionError; ValueError: UnicodeError too
            raise ArtifactError(f"inconsistent artifact: {e.__class__.__name__}: {e}") from None
        self.manifest = art.manifest

    def _check_device(self) -> None:
        if self.device.type != "cpu":
            raise ConfigError(f"device {self.device}: the reference engine runs on the CPU (use Engine.load)")

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Engine":
        """Load and verify an artifact. ``device="cuda"`` runs it with the Triton kernels (``KernelEngine``).

        On bad input only :class:`ArtifactError` (the file) or :class:`ConfigError` (the device) leave here."""
        return cls.from_artifact(load(path), device)

    @classmethod
    def from_artifact(cls, art: Artifact, device: str = "cpu") -> "Engine":
        """The engine of a loaded artifact after its load-time :meth:`self_test` - everything ``load`` does once
        the file is read (``p4q inspect`` uses it to refuse exactly what the engine refuses)."""
        if cls is Engine and str(device) != "cpu":
            from p4q_engine.runtime.kernel_engine import KernelEngine

            engine: Engine = KernelEngine(art, device)
        else:
            engine = cls(art, device)
        engine.self_test()
        return engine

    @torch.no_grad()
    def self_test(self) -> None:
        """Classify one synthetic image (fixed random pixels at the model's resolution, through the artifact's own
        preprocessing) and refuse the artifact if its image features or logits are not finite: parameters that pass
        every per-field check can still combine into overflow, and a server must not turn ready on them."""
        h, w = self.image_size
        rgb = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        try:
            from PIL import Image

            pixels = self.preprocess([Image.fromarray(rgb.numpy(), "RGB")])
            z = self.encode(pixels).float().cpu()
            logits = self.logit_scale * F.normalize(z, dim=-1) @ self.text.T
        except torch.cuda.OutOfMemoryError:
            raise
        except (P4QError, LookupError, TypeError, ValueError, RuntimeError, ArithmeticError, AssertionError) as e:
            raise ArtifactError(
                f"self-test: a synthetic image fails in this artifact: {e.__class__.__name__}: {e}"
            ) from None
        for what, v in (("image features", z), ("logits", logits)):
            if not bool(torch.isfinite(v).all()):
                raise ArtifactError(
                    f"self-test: a synthetic image gets non-finite {what} ({v.flatten()[:4].tolist()}"
                    f" ...); the artifact's parameters are corrupt"
                )

    def _build_common(self, art: Artifact) -> None:
        """Configuration, embeddings, LayerNorms, class features and preprocessing - shared by all engines.

        The manifest is checked against its schema and its tensors first (:func:`validate_manifest`), so what
        follows reads typed, range-checked values."""
        t, man = art.tensors, art.manifest
        spec: ManifestSpec = validate_manifest(man, t)
        self.manifest_spec = spec
        cfg = validate_vision_config(art)
        self.cfg = cfg
        self.proj_dim = spec.linears["visual.proj"].out_features
        self.eps = spec.vision.ln_eps
        self.heads = spec.vision.heads
        self.patch = spec.vision.patch_size
        self.image_size = spec.vision.image_size
        self.class_embedding = t["visual.class_embedding"]
        self.pos = t["visual.positional_embedding"]
        self.ln_pre = (t["visual.ln_pre.weight"], t["visual.ln_pre.bias"]) if cfg["ln_pre"] else None
        self.ln_post = (t["visual.ln_post.weight"], t["visual.ln_post.bias"])
        ad = man.get("adapter")
        self.adapter = ad
        self.alpha = spec.adapter.alpha if spec.adapter is not None else 0.0
        self.adapter_site = Site.from_manifest(man["sites"]["adapter.in"], "adapter.in") if ad is not None else None
        codes, scale = unpack_weight(art, "text.features")
        self.text = codes.float() * scale[:, None]
        self.classnames = list(spec.classes.names)
        self.logit_scale = spec.classes.logit_scale
        if self.text.shape[0] != len(self.classnames):
            raise ArtifactError("class feature rows do not match the class names")
        if self.text.shape[1] != self.proj_dim:
            raise ArtifactError(
                f"class features have dimension {self.text.shape[1]}, the image tower outputs {self.proj_dim}"
            )
        if tuple(self.pos.shape) != (math.prod(cfg["grid_size"]) + 1, int(cfg["width"])):
            raise ArtifactError(
                f"tensors['visual.positional_embedding'] has shape {list(self.pos.shape)}, the patch "
                f"grid {cfg['grid_size']} and width {cfg['width']} need "
                f"[{math.prod(cfg['grid_size']) + 1}, {cfg['width']}]"
            )
        pre = spec.preprocess  # validated: known modes, finite statistics, size == the tower's input
        self.transform = build_transform(
            {
                "size": list(pre.size),
                "mean": list(pre.mean),
                "std": list(pre.std),
                "interpolation": pre.interpolation,
                "resize_mode": pre.resize_mode,
            }
        )

    def _build_tower(self, art: Artifact) -> None:
        self.conv = IntLinear(art, "visual.conv")
        self.blocks = [_Block(art, f"visual.blocks.{i}", self.cfg) for i in range(int(self.cfg["layers"]))]
        self.proj = IntLinear(art, "visual.proj")
        if self.adapter is not None:
            self.fc1, self.fc2 = IntLinear(art, "adapter.fc1"), IntLinear(art, "adapter.fc2")

    # ---------------------------------------------------------------- compute
    def _ln(self, x, wb):
        return F.layer_norm(x, x.shape[-1:], wb[0], wb[1], self.eps)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image features (before normalisation) of preprocessed pixels ``[B, 3, H, W]``: float, or uint8 from
        ``Preprocess.load(raw=True)`` (normalised on the engine's device after a 4x smaller copy)."""
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, *self.image_size):
            raise ConfigError(
                f"expected images of shape [B, 3, {self.image_size[0]}, {self.image_size[1]}], got {list(pixels.shape)}"
            )
        if pixels.dtype != torch.uint8 and not pixels.is_floating_point():
            # an int64 / bool tensor of raw 0..255 values would run as if it were normalised: refuse it
            raise ConfigError(f"pixels must be float (normalised) or uint8 (raw 8-bit), got {pixels.dtype}")
        if pixels.shape[0] == 0:  # every engine answers an empty batch alike (no kernel launch, no graph bucket)
            return torch.zeros(0, self.proj_dim, device=self.device)
        if pixels.dtype == torch.uint8:  # 8-bit pixels (Preprocess.load(raw=True)): normalised where they land
            if not getattr(self.transform, "raw_ok", False):
                raise ConfigError("this artifact's preprocess has no 8-bit path: pass float pixels")
            return self._forward(self.transform.normalize(self._on_device(pixels)))
        pixels = self._on_device(pixels)
        if not torch.isfinite(pixels).all():
            raise ConfigError("images contain NaN or inf values")
        return self._forward(pixels)

    def _on_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """The pixels where the tower runs (the CPU here), so the finiteness check reads them there."""
        return pixels

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float()
        patches = patchify(x, self.patch)  # [B, L, 3*p*p]
        x = self.conv(patches)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.pos
        if self.ln_pre is not None:
            x = self._ln(x, self.ln_pre)
        for blk in self.blocks:
            x = blk(x)
        if self.cfg["final_ln_after_pool"]:
            x = self._ln(self._pool(x), self.ln_post)
        else:
            x = self._pool(self._ln(x, self.ln_post))
        z = self.proj(x)
        return self._adapt(z) if self.adapter is not None else z

    def _adapt(self, z: torch.Tensor) -> torch.Tensor:
        """QAdapter (Eq. 11): ``alpha * fc2(relu(fc1(Q(z)))) + (1 - alpha) * Q(z)``."""
        zq = dequantize(quantize(z, self.adapter_site.qp), self.adapter_site.qp) if self.adapter_site else z
        h = self.fc2(torch.relu(self.fc1(z)))
        return self.alpha * h + (1.0 - self.alpha) * zq

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:].mean(dim=1) if self.cfg["pool_type"] == "avg" else x[:, 0]

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        return torch.stack([self.transform.load(im) for im in images])  # bounded decode (runtime/images.py)

    def _pixels(self, images: torch.Tensor | Sequence[ImageInput]) -> torch.Tensor:
        return images if isinstance(images, torch.Tensor) else self.preprocess(images)

    @torch.no_grad()
    def embed(self, images: torch.Tensor | Sequence[ImageInput], batch_size: int = 64) -> torch.Tensor:
        """Unit-norm image embeddings; ``images`` are preprocessed pixels or paths/bytes/PIL images."""
        pixels = self._pixels(images)
        out = [F.normalize(self.encode(chunk).float(), dim=-1).cpu() for chunk in pixels.split(batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.text.shape[1])

    @torch.no_grad()
    def logits(self, images: torch.Tensor | Sequence[ImageInput], batch_size: int = 64) -> torch.Tensor:
        return self.logit_scale * self.embed(images, batch_size) @ self.text.T

    def classify(
        self, images: torch.Tensor | Sequence[ImageInput], top_k: int = 5, labels: Optional[Sequence[str]] = None
    ) -> list[Prediction]:
        """Top-k labels and softmax probabilities per image (optionally over a subset of the labels)."""
        logits = self.logits(images)
        idx = list(range(len(self.classnames)))
        if labels is not None:
            unknown = [l for l in labels if l not in self.classnames]
            if unknown or not labels:
                raise ConfigError(f"unknown labels: {unknown[:3]}" if unknown else "empty label subset")
            idx = [self.classnames.index(l) for l in labels]
            logits = logits[:, idx]
        probs = logits.softmax(dim=-1)
        k = max(1, min(top_k, probs.shape[1]))
        top = probs.topk(k, dim=-1)
        return [
            Prediction([self.classnames[idx[i]] for i in ii.tolist()], pp.tolist(), [idx[i] for i in ii.tolist()])
            for pp, ii in zip(top.values, top.indices)
        ]
