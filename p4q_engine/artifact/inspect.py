"""Human-readable summary of a ``.p4q`` artifact: layers, bits, sizes."""
from __future__ import annotations

from collections import defaultdict

from p4q_engine.artifact.format import Artifact


def _nbytes(art: Artifact, name: str) -> int:
    t = art.tensors[name]
    return t.numel() * t.element_size()


def summarize(art: Artifact) -> str:
    """A table of every Linear (weight bits, input-site bits, shape, stored bytes) plus totals by category."""
    man = art.manifest
    lines = [f"model: {man['model']}", f"classes: {len(man['classes']['names'])} "
             f"(text features at {man['classes']['text_bits']} bits), logit scale {man['classes']['logit_scale']:.2f}",
             "", f"{'layer':<34} {'weight':>7} {'input':>6} {'shape':>12} {'bytes':>11}"]
    owned: dict[str, int] = defaultdict(int)
    for name in art.tensors:
        owned[name.rsplit(".", 2)[0] if ".w.p" in name else name] += _nbytes(art, name)
    for prefix, d in man["linears"].items():
        site = man["sites"].get(d["in_site"]) if d["in_site"] else None
        size = sum(_nbytes(art, n) for n in art.tensors if n.startswith(prefix + "."))
        lines.append(f"{prefix:<34} {str(d['weight_bits'] or 'fp32'):>7} {str(site['bits'] if site else 'fp32'):>6} "
                     f"{str(d['out_features']) + 'x' + str(d['in_features']):>12} {size:>11,}")
    total = sum(_nbytes(art, n) for n in art.tensors)
    packed = sum(_nbytes(art, n) for n in art.tensors if art.layout(n).get("kind") == "packed")
    lines += ["", f"tensors: {len(art.tensors)}, total {total:,} bytes ({total / 2**20:.2f} MiB), "
              f"packed integer codes {packed:,} bytes, float tensors {total - packed:,} bytes"]
    return "\n".join(lines)
