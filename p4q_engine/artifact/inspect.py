"""Human-readable summary of a ``.p4q`` artifact: layers, bits, sizes.

It reads the typed manifest (:func:`~p4q_engine.artifact.schema.validate_manifest`), so it prints every artifact the
engine accepts - optional fields (``model``, ``classes.text_bits``) absent included - and refuses the others with the
same :class:`~p4q_engine.artifact.format.ArtifactError`.
"""

from __future__ import annotations

import json
from typing import Any

from p4q_engine.artifact.format import Artifact
from p4q_engine.artifact.schema import ManifestSpec, validate_manifest


def _nbytes(art: Artifact, name: str) -> int:
    t = art.tensors[name]
    return t.numel() * t.element_size()


def _model_line(model: dict[str, Any]) -> str:
    if not model:
        return "model: (not recorded)"
    text = json.dumps(model, sort_keys=True, default=str)  # ASCII: prints on any terminal
    return f"model: {text if len(text) <= 300 else text[:297] + '...'}"


def summarize(art: Artifact, spec: ManifestSpec | None = None) -> str:
    """A table of every Linear (weight bits, input-site bits, shape, stored bytes) plus totals by category."""
    spec = spec if spec is not None else validate_manifest(art.manifest, art.tensors)
    cls = spec.classes
    text_bits = spec.tensors["text.features.p0"].layout.bits
    lines = [
        _model_line(spec.model),
        f"classes: {len(cls.names)} (text features at {text_bits} bits), logit scale {cls.logit_scale:.2f}",
        "",
        f"{'layer':<34} {'weight':>7} {'input':>6} {'shape':>12} {'bytes':>11}",
    ]
    for prefix, d in spec.linears.items():
        site = spec.sites.get(d.in_site) if d.in_site else None
        size = sum(_nbytes(art, n) for n in art.tensors if n.startswith(prefix + "."))
        shape = f"{d.out_features}x{d.in_features}"
        lines.append(
            f"{prefix:<34} {str(d.weight_bits or 'fp32'):>7} {str(site.bits if site else 'fp32'):>6} "
            f"{shape:>12} {size:>11,}"
        )
    total = sum(_nbytes(art, n) for n in art.tensors)
    packed = sum(
        _nbytes(art, n) for n, desc in spec.tensors.items() if desc.layout.kind == "packed" and n in art.tensors
    )
    lines += [
        "",
        f"tensors: {len(art.tensors)}, total {total:,} bytes ({total / 2**20:.2f} MiB), "
        f"packed integer codes {packed:,} bytes, float tensors {total - packed:,} bytes",
    ]
    return "\n".join(lines)
