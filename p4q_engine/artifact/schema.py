"""The ``.p4q`` manifest schema (pydantic 2 models) and the semantic checks a schema cannot express.

Why pydantic rather than jsonschema: the models are typed Python objects the engine reads its configuration from
(no second, hand-parsed copy of the format), strict mode refuses every coercion JSON Schema validators differ on
(``4.9``, ``"4"`` or ``true`` as a bit width, ``"false"`` as a flag), each error carries a precise location that
names the field, and custom field types keep the engine's own wording (``vision.heads must be an integer >= 1 ...``).

:func:`validate_manifest` runs the schema, then the checks that need more than one field or the tensors themselves:
zero points inside their grid, layer tables and layouts consistent with the tensors stored, a layer count bounded by
the tensors present, preprocessing matching the tower's input, and finite (and, for scales, positive) tensor values.
Every failure is an :class:`~p4q_engine.artifact.format.ArtifactError` whose message starts with the field, e.g.
``sites['visual.blocks.0.attn.in_proj.in'].scale must be a finite number > 0 (as float32), got nan``.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Callable, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, PlainValidator, StrictBool, ValidationError
from pydantic_core import PydanticCustomError

from p4q_engine.artifact.bitpack import PLANES
from p4q_engine.artifact.format import ArtifactError
from p4q_engine.quant.spec import SUPPORTED_BITS

#: Bounds no real CLIP comes near (ViT-bigG: width 1664, 48 layers, 224 px; open_clip's largest inputs are a few
#: hundred pixels; 4096 px is the decoder's 16.7 Mpx cap). They only keep absurd values from reaching an
#: allocation; the tensors present bound most of them again.
MAX_IMAGE = 4096
MAX_WIDTH = 1 << 16
MAX_LAYERS = 4096
MAX_FEATURES = 1 << 20
MAX_NAME = 1000  # characters in a class name
MAX_KEY = 512  # characters in a tensor, layer or site name
MAX_LOGIT_SCALE = 1000.0  # CLIP clamps exp(logit_scale) at 100
_F32_TINY, _F32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38  # smallest normal, largest finite float32


def _artifact_error(msg: str) -> ArtifactError:
    return ArtifactError(msg)


# ---------------------------------------------------------------- field types
def _fail(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


def _is_number(v: Any) -> bool:
    return type(v) in (int, float)  # type(): a bool is not a number here


def _int(lo: int, hi: int) -> Any:
    def check(v: Any) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise _fail("p4q_int", f"must be an integer >= {lo} and <= {hi}")
        return v

    return Annotated[int, PlainValidator(check)]


def _float(lo: float, hi: float, lo_open: bool = False, what: str = "") -> Any:
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""

    def check(v: Any) -> float:
        ok = _is_number(v) and math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi
        if not ok:
            raise _fail("p4q_float", what or f"must be a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return float(v)

    return Annotated[float, PlainValidator(check)]


def _scale(v: Any) -> float:
    if not (_is_number(v) and math.isfinite(v) and _F32_TINY <= v <= _F32_MAX):
        raise _fail("p4q_scale", "must be a finite number > 0 (as float32)")
    return float(v)


def _bits(v: Any) -> int:
    if type(v) is not int or v not in SUPPORTED_BITS:
        raise _fail("p4q_bits", f"must be a supported bit width ({', '.join(map(str, SUPPORTED_BITS))}, an integer)")
    return v


def _text(max_len: int) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str):
            raise _fail("p4q_str", "must be a string")
        if not 1 <= len(v) <= max_len:
            raise _fail("p4q_str", f"must be a string of 1 to {max_len} characters")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise _fail("p4q_str", "must be valid Unicode (it holds a lone surrogate)") from None
        return v

    return check


def _pair(lo: int, hi: int, allow_int: bool = False) -> Callable[[Any], tuple[int, int]]:
    def check(v: Any) -> tuple[int, int]:
        if allow_int and type(v) is int and lo <= v <= hi:
            return v, v
        if isinstance(v, (list, tuple)) and len(v) == 2 and all(type(e) is int and lo <= e <= hi for e in v):
            return v[0], v[1]
        raise _fail(
            "p4q_pair", f"must be {'an integer or ' if allow_int else ''}a list of two integers in [{lo}, {hi}]"
        )

    return check


def _triple(lo: float, hi: float) -> Callable[[Any], tuple[float, float, float]]:
    def check(v: Any) -> tuple[float, float, float]:
        if (
            isinstance(v, (list, tuple))
            and len(v) == 3
            and all(_is_number(e) and math.isfinite(e) and lo <= e <= hi for e in v)
        ):
            return tuple(float(e) for e in v)  # type: ignore[return-value]
        raise _fail("p4q_triple", f"must be a list of three finite numbers in [{lo:g}, {hi:g}] (one per RGB channel)")

    return check


def _unsigned(v: Any) -> bool:
    if v is not False:
        raise _fail("p4q_unsigned", "must be false (the engines execute unsigned activation sites only)")
    return v


def _metadata(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _fail("p4q_object", "must be a JSON object")
    return v


Bits = Annotated[int, PlainValidator(_bits)]
Key = Annotated[str, PlainValidator(_text(MAX_KEY))]
Name = Annotated[str, PlainValidator(_text(MAX_NAME))]
Scale = Annotated[float, PlainValidator(_scale)]
Dim = _int(1, MAX_FEATURES)


class _Strict(BaseModel):
    """Strict types, no unknown keys (a key the engine would silently ignore is a lie about what it runs)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class SiteSpec(_Strict):
    """A per-tensor unsigned activation quantizer: ``q = clamp(floor(x / scale + 0.5) + zero_point, 0, 2^bits-1)``."""

    bits: Bits
    signed: Annotated[bool, PlainValidator(_unsigned)]
    scale: Scale
    zero_point: _int(0, 255)


class LinearSpec(_Strict):
    out_features: Dim
    in_features: Dim
    bias: StrictBool
    weight_bits: Optional[Bits]
    in_site: Optional[Key]


class LayoutSpec(_Strict):
    """How a tensor is stored: ``plain``, or one bit plane of a ``packed`` weight (see docs/format.md)."""

    kind: Literal["plain", "packed"]
    bits: Optional[Bits] = None
    signed: Optional[StrictBool] = None
    grid: Optional[Key] = None
    offset: Optional[_int(0, 255)] = None
    planes: Optional[list[_int(1, 8)]] = None
    plane: Optional[_int(0, 7)] = None
    order: Optional[Literal["lsb-first-along-k"]] = None
    logical_shape: Optional[Annotated[tuple[int, int], PlainValidator(_pair(0, MAX_FEATURES))]] = None


class TensorSpec(_Strict):
    dtype: Optional[Key] = None  # dtype, shape and sha256 are written by save() (checked against the file by load)
    shape: Optional[list[Any]] = None
    sha256: Optional[Key] = None
    layout: LayoutSpec


class VisionSpec(_Strict):
    image_size: Annotated[tuple[int, int], PlainValidator(_pair(1, MAX_IMAGE))]
    patch_size: Annotated[tuple[int, int], PlainValidator(_pair(1, MAX_IMAGE))]
    grid_size: Annotated[tuple[int, int], PlainValidator(_pair(1, MAX_IMAGE))]
    width: _int(1, MAX_WIDTH)
    layers: _int(1, MAX_LAYERS)
    heads: _int(1, MAX_WIDTH)
    mlp_width: Optional[_int(1, MAX_FEATURES)] = None
    pool_type: Key
    final_ln_after_pool: StrictBool
    ln_pre: StrictBool
    layer_scale: Optional[StrictBool] = None
    act: Key
    ln_eps: _float(0.0, 1.0, lo_open=True, what="must be a small positive number (0 < ln_eps < 1)")
    output_dim: Optional[Dim] = None


class PreprocessSpec(_Strict):
    """open_clip's eval preprocessing (``PreprocessCfg``); pixel statistics of [0, 1] images."""

    size: Annotated[tuple[int, int], PlainValidator(_pair(1, MAX_IMAGE, allow_int=True))]
    mean: Annotated[tuple[float, float, float], PlainValidator(_triple(0.0, 1.0))]
    std: Annotated[tuple[float, float, float], PlainValidator(_triple(1e-3, 1.0))]
    interpolation: Literal["bicubic", "bilinear", "random"] = "bicubic"  # open_clip evaluates "random" as bicubic
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    mode: Literal["RGB"] = "RGB"
    fill_color: _int(0, 255) = 0


class ClassesSpec(_Strict):
    names: Annotated[list[Name], PlainValidator(lambda v: _names(v))]
    logit_scale: _float(0.0, MAX_LOGIT_SCALE, lo_open=True)
    text_bits: Optional[Bits] = None
    dim: Optional[Dim] = None


def _names(v: Any) -> list[str]:
    if not isinstance(v, (list, tuple)) or not v:
        raise _fail("p4q_names", "must be a non-empty list of class names")
    check = _text(MAX_NAME)
    for i, n in enumerate(v):
        try:
            check(n)
        except PydanticCustomError as e:
            raise _fail("p4q_name", f"[{i}] {e.message()}, got {_short(n)}") from None
    return list(v)


class AdapterSpec(_Strict):
    alpha: _float(0.0, 1.0)
    hidden: Dim
    dim: Dim


class ManifestSpec(_Strict):
    """The whole manifest. ``format``/``format_version`` are checked by ``format.load`` and absent in memory."""

    format: Optional[Literal["p4q"]] = None
    format_version: Optional[_int(1, 1)] = None
    model: Annotated[dict[str, Any], PlainValidator(_metadata)] = {}
    vision: VisionSpec
    preprocess: PreprocessSpec
    classes: ClassesSpec
    adapter: Optional[AdapterSpec] = None
    linears: dict[Key, LinearSpec]
    sites: dict[Key, Optional[SiteSpec]]
    tensors: dict[Key, TensorSpec]


# ---------------------------------------------------------------- errors
_DICTS = ("linears", "sites", "tensors")
_PHRASES = {
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a JSON object",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "finite_number": "must be a finite number",
    "tuple_type": "must be a list",
}


def _short(v: Any, limit: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def where(loc: tuple) -> str:
    """``('sites', 'a.b', 'scale')`` -> ``sites['a.b'].scale``: dict keys in brackets, fields after dots."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (the key)"
        elif i == 1 and loc[0] in _DICTS:
            out += f"[{_short(part)}]"
        else:
            out += f".{_short(part, 40) if not str(part).isidentifier() else part}" if out else str(part)
    return out or "manifest"


def describe(err: dict[str, Any], base: tuple = ()) -> str:
    """One pydantic error as ``<field> <problem>, got <value>`` (``base``: where the validated object sits)."""
    kind, field = err["type"], where(base + tuple(err["loc"]))
    if kind == "missing":
        return f"{field} is missing"
    if kind == "extra_forbidden":
        return f"{field} is not a field of this format (the engine would ignore it)"
    if kind == "literal_error":
        phrase = f"must be one of {err.get('ctx', {}).get('expected', '?')}"
    else:
        phrase = _PHRASES.get(kind) or err["msg"].replace("Input should be", "must be")
    if kind == "p4q_name":  # an item of a list: the message starts with its index and names the value
        return f"{field}{phrase}"
    return f"{field} {phrase}, got {_short(err.get('input'))}"


def schema_error(e: ValidationError, base: tuple = ()) -> ArtifactError:
    """The first schema problem (and how many more there are) as an :class:`ArtifactError`."""
    errs = e.errors(include_url=False)
    more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    return _artifact_error(f"{describe(errs[0], base)}{more}")


def _check_grid(name: str, site: SiteSpec) -> None:
    if site.zero_point > (1 << site.bits) - 1:
        raise _artifact_error(
            f"sites[{name!r}].zero_point must be an integer in [0, {(1 << site.bits) - 1}] (the "
            f"{site.bits}-bit grid), got {site.zero_point}"
        )


def parse_site(name: str, d: Any) -> Optional[SiteSpec]:
    """One activation site (``None`` = float), schema and grid checked; ``name`` is only for the message."""
    if d is None:
        return None
    try:
        site = SiteSpec.model_validate(d)
    except ValidationError as e:
        raise schema_error(e, base=("sites", name)) from None
    _check_grid(name, site)
    return site


# ---------------------------------------------------------------- semantic checks
_BLOCK = re.compile(r"visual\.blocks\.(\d+)\.")
_BLOCK_LINEARS = ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
_FLOAT_DTYPES = (torch.float32,)


def expected_linears(spec: ManifestSpec) -> list[str]:
    """Every Linear the engines execute, in order: the layer table must hold exactly these."""
    names = ["visual.conv"]
    names += [f"visual.blocks.{i}.{n}" for i in range(spec.vision.layers) for n in _BLOCK_LINEARS]
    names.append("visual.proj")
    if spec.adapter is not None:
        names += ["adapter.fc1", "adapter.fc2"]
    return names


def _check_layouts(spec: ManifestSpec, tensors: dict[str, torch.Tensor]) -> None:
    for name, desc in spec.tensors.items():
        lay, field = desc.layout, f"tensors[{name!r}].layout"
        t = tensors.get(name)
        if lay.kind == "plain":
            extra = [
                k
                for k in ("bits", "signed", "grid", "offset", "planes", "plane", "order", "logical_shape")
                if getattr(lay, k) is not None
            ]
            if extra:
                raise _artifact_error(f"{field}.{extra[0]} is set, but a plain layout has no packing fields")
            if t is not None and t.dtype not in _FLOAT_DTYPES:
                raise _artifact_error(f"tensors[{name!r}] is stored as {t.dtype}; plain tensors must be float32")
            continue
        for k in ("bits", "planes", "plane", "logical_shape"):
            if getattr(lay, k) is None:
                raise _artifact_error(
                    f"{field}.{k} is missing (a packed layout needs bits, planes, plane and logical_shape)"
                )
        if tuple(lay.planes) != PLANES[lay.bits]:
            raise _artifact_error(
                f"{field}.planes must be {list(PLANES[lay.bits])} for {lay.bits}-bit codes, got {lay.planes}"
            )
        if lay.plane >= len(lay.planes) or not name.endswith(f".p{lay.plane}"):
            raise _artifact_error(f"{field}.plane {lay.plane} does not match the tensor name (planes {lay.planes})")
        if t is not None:
            rows, k = lay.logical_shape
            per = 32 // lay.planes[lay.plane]
            want = (rows, (k + per - 1) // per)
            if t.dtype != torch.int32 or tuple(t.shape) != want:
                raise _artifact_error(
                    f"tensors[{name!r}] is {t.dtype} {list(t.shape)}; its layout (logical shape "
                    f"{list(lay.logical_shape)}, {lay.planes[lay.plane]}-bit plane) needs "
                    f"torch.int32 {list(want)}"
                )


def _packed_bits(spec: ManifestSpec, prefix: str) -> Optional[int]:
    desc = spec.tensors.get(f"{prefix}.p0")
    return desc.layout.bits if desc is not None and desc.layout.kind == "packed" else None


def _check_linears(spec: ManifestSpec, tensors: dict[str, torch.Tensor]) -> None:
    expected = expected_linears(spec)
    for name in sorted(set(spec.linears) - set(expected)):
        m = _BLOCK.match(name)
        if m and int(m.group(1)) >= spec.vision.layers:
            continue  # a block beyond vision.layers: the vision-config check reports the block mismatch
        raise _artifact_error(
            f"linears[{name!r}] is not a layer of this model (the engines execute "
            f"{expected[0]} ... {expected[-1]}, {len(expected)} layers)"
        )
    for prefix, lin in spec.linears.items():
        field = f"linears[{prefix!r}]"
        if lin.in_site is not None:
            if lin.in_site not in spec.sites:
                raise _artifact_error(f"{field}.in_site names {lin.in_site!r}, which is not in sites")
            if spec.sites[lin.in_site] is None:
                raise _artifact_error(f"{field}.in_site names {lin.in_site!r}, whose site is null (float)")
        if lin.weight_bits is None:
            w = tensors.get(f"{prefix}.weight")
            if w is None:
                raise _artifact_error(f"{field}.weight_bits is null but tensor {prefix}.weight is missing")
            if tuple(w.shape) != (lin.out_features, lin.in_features):
                raise _artifact_error(
                    f"tensors['{prefix}.weight'] has shape {list(w.shape)}, {field} says "
                    f"[{lin.out_features}, {lin.in_features}]"
                )
        else:
            bits = _packed_bits(spec, f"{prefix}.w")
            if bits is None:
                raise _artifact_error(
                    f"{field}.weight_bits is {lin.weight_bits} but {prefix}.w.p0 is not a packed tensor of the manifest"
                )
            if bits != lin.weight_bits:
                raise _artifact_error(f"{field}.weight_bits is {lin.weight_bits}, its packed layout says {bits}")
            scale = tensors.get(f"{prefix}.w_scale")
            if scale is None or tuple(scale.shape) != (lin.out_features,):
                raise _artifact_error(
                    f"tensors['{prefix}.w_scale'] must be a [{lin.out_features}] per-row scale "
                    f"vector, got {None if scale is None else list(scale.shape)}"
                )
        b = tensors.get(f"{prefix}.bias")
        if lin.bias and (b is None or tuple(b.shape) != (lin.out_features,)):
            raise _artifact_error(
                f"{field}.bias is true but tensors['{prefix}.bias'] is "
                f"{'missing' if b is None else list(b.shape)}, expected [{lin.out_features}]"
            )


def _check_values(tensors: dict[str, torch.Tensor]) -> None:
    """Finite floats everywhere; scale vectors (weights, class features) strictly positive."""
    for name, t in tensors.items():
        if not t.is_floating_point() or not t.numel():
            continue
        if name.endswith("_scale"):
            bad = ~(torch.isfinite(t) & (t > 0))
            if bool(bad.any()):
                i = int(bad.flatten().nonzero()[0])
                raise _artifact_error(
                    f"tensors[{name!r}] must hold finite scales > 0, holds {float(t.flatten()[i])} at index {i}"
                )
        elif not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):  # sum: a fast first pass
            i = int((~torch.isfinite(t)).flatten().nonzero()[0])  # (finite values may overflow it: then the exact one)
            raise _artifact_error(f"tensors[{name!r}] must be finite, holds {float(t.flatten()[i])} at index {i}")


def validate_manifest(manifest: Any, tensors: dict[str, torch.Tensor]) -> ManifestSpec:
    """Schema + semantic checks of an artifact's manifest against its tensors; the typed manifest, or
    :class:`ArtifactError` naming the first field at fault."""
    if not isinstance(manifest, dict):
        raise _artifact_error("manifest must be a JSON object")
    try:
        spec = ManifestSpec.model_validate(manifest)
    except ValidationError as e:
        raise schema_error(e) from None
    v = spec.vision
    # A layer count no bigger than what is stored, before anything is sized by it (the exact block set is checked
    # by the engine's vision-config validation against both the tensors and the layer table).
    if v.layers > len(tensors):
        raise _artifact_error(f"vision.layers is {v.layers}, but the artifact stores only {len(tensors)} tensors")
    for name, site in spec.sites.items():
        if site is not None:
            _check_grid(name, site)
    present = sorted({int(m.group(1)) for n in tensors if (m := _BLOCK.match(n))})  # the vision-config check
    need = [f"visual.blocks.{i}.attn.{s}" for i in present if i < v.layers for s in "qkvp"]  # compares the sets
    for name in need + (["adapter.in"] if spec.adapter is not None else []):
        if name not in spec.sites:
            raise _artifact_error(f"sites[{name!r}] is missing (null if the site is float)")
    _check_layouts(spec, tensors)
    _check_linears(spec, tensors)
    if spec.preprocess.size != v.image_size:
        raise _artifact_error(
            f"preprocess.size {list(spec.preprocess.size)} must equal vision.image_size "
            f"{list(v.image_size)} (the input the tower is built for)"
        )
    text = spec.tensors.get("text.features.p0")
    if text is None or text.layout.kind != "packed":
        raise _artifact_error("tensors['text.features.p0'] must be the packed class features")
    rows = text.layout.logical_shape[0]
    if len(spec.classes.names) != rows:
        raise _artifact_error(
            f"classes.names lists {len(spec.classes.names)} classes, the class features hold {rows} rows"
        )
    if spec.classes.text_bits is not None and spec.classes.text_bits != text.layout.bits:
        raise _artifact_error(
            f"classes.text_bits is {spec.classes.text_bits}, the class features' layout says {text.layout.bits}"
        )
    if spec.adapter is not None:
        fc1 = spec.linears.get("adapter.fc1")
        if fc1 is not None and spec.adapter.hidden != fc1.out_features:
            raise _artifact_error(
                f"adapter.hidden is {spec.adapter.hidden}, linears['adapter.fc1'] has {fc1.out_features} outputs"
            )
        if fc1 is not None and spec.adapter.dim != fc1.in_features:
            raise _artifact_error(
                f"adapter.dim is {spec.adapter.dim}, linears['adapter.fc1'] has {fc1.in_features} inputs"
            )
    _check_values(tensors)
    return spec
