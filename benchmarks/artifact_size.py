"""Artifact size of ViT-B/32 at every paper bit config, both scopes, against fp32 and the paper's Size column.

Sizes do not depend on weight values, so open_clip's ViT-B-32 with random weights stands in for real weights.
Two numbers per row: the ``.p4q`` file (image tower + 100 precomputed class features - what serving needs) and the
whole CLIP (both towers) at the same bits, which is what the paper's Size column counts (the paper's "MB" are MiB:
ViT-B/32's 151,277,313 fp32 parameters are 577.08 MiB).

    python benchmarks/artifact_size.py --out benchmarks/results/size
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from p4q_engine.artifact.export import preprocess_config
from p4q_engine.artifact.fold import fold
from p4q_engine.artifact.format import save
from p4q_engine.clip.calibrate import calibrate
from p4q_engine.clip.qmodel import QuantCLIP
from p4q_engine.clip.recipe import QuantRecipe
from p4q_engine.quant.modules import QuantConv2d, QuantEmbedding, QuantLinear

PAPER_MIB = {"fp32": 577.08, "8-8-8": 146.95, "4-4-8": 94.76, "3-3-8": 81.96, "2-2-8": 68.67}
MIB = 2**20


def whole_model_bytes(q: QuantCLIP) -> int:
    """Both towers as stored at their bits: packed codes + fp32 per-channel scales; other parameters fp32."""
    total, counted = 0, set()
    for mod in q.modules():
        if isinstance(mod, (QuantLinear, QuantConv2d, QuantEmbedding)) and mod.w_spec is not None:
            w = mod.weight
            total += (w.numel() * mod.w_spec.bits + 7) // 8 + 4 * w.shape[0]
            counted.add(id(w))
    for p in q.parameters():
        if id(p) not in counted:
            total += 4 * p.numel()
            counted.add(id(p))
    return total


def measure(model, recipe: QuantRecipe, n_classes: int, tmp: Path) -> dict:
    q = QuantCLIP(model, recipe)
    tokens = torch.randint(1, 49000, (n_classes, 77))
    tokens[:, 10] = 49407
    if not q.is_float:
        calibrate(q, [torch.randn(2, 3, 224, 224)], tokens, progress=False)
    with torch.no_grad():
        feats = q.encode_text(tokens)
    art = fold(
        q,
        feats,
        [f"class {i}" for i in range(n_classes)],
        preprocess_config(model),
        meta={"name": "ViT-B-32", "pretrained": None},
    )
    size = save(art, tmp / "m.p4q")
    return {
        "bits": recipe.bits.name,
        "scope": recipe.scope,
        "artifact_bytes": size,
        "artifact_mib": round(size / MIB, 2),
        "whole_model_mib": round(whole_model_bytes(q) / MIB, 2),
        "paper_mib": PAPER_MIB.get(recipe.bits.name),
    }


def markdown(res: dict) -> str:
    fp = res["fp32"]
    lines = [
        "# Artifact size: ViT-B/32",
        "",
        f"Produced by `{res['command']}` on {res['date']} (CPU: {res['env']['machine']}, torch {res['env']['torch']}, "
        f"open_clip {res['env']['open_clip']}). Random weights (size does not depend on values); "
        f"{res['classes']} classes of precomputed 8-bit text features.",
        "",
        "* **artifact**: the `.p4q` file: image tower (packed) + class features + manifest — what serving loads.",
        "* **whole CLIP**: both towers at the same bits (codes + fp32 per-channel scales), as the paper's Size "
        "column counts it (the paper's MB are MiB).",
        "* Other ViTs (B/16, L/14, L/14-336, H/14) beside bf16: [size_models.md](size_models.md) "
        "(`benchmarks/model_sizes.py`).",
        "",
        "| bits | scope | artifact MiB | vs fp32 artifact | whole CLIP MiB | paper MiB | whole/paper |",
        "|---|---|---|---|---|---|---|",
        f"| fp32 | - | {fp['artifact_mib']:.2f} | 1.00x | {fp['whole_model_mib']:.2f} | {PAPER_MIB['fp32']:.2f} | "
        f"{fp['whole_model_mib'] / PAPER_MIB['fp32']:.3f} |",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['bits']} | {r['scope']} | {r['artifact_mib']:.2f} | "
            f"{fp['artifact_mib'] / r['artifact_mib']:.2f}x smaller | {r['whole_model_mib']:.2f} | "
            f"{r['paper_mib']:.2f} | {r['whole_model_mib'] / r['paper_mib']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/size")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--bits", default="8-8-8,4-4-8,3-3-8,2-2-8")
    ap.add_argument("--scopes", default="full,release")
    args = ap.parse_args(argv)
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        fp = measure(model, QuantRecipe("fp32"), args.classes, tmp)
        rows = []
        for bits in args.bits.split(","):
            for scope in args.scopes.split(","):
                rows.append(measure(model, QuantRecipe(bits, scope=scope, observer="minmax"), args.classes, tmp))
                print(rows[-1], flush=True)
    res = {
        "command": "python " + " ".join(["benchmarks/artifact_size.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "classes": args.classes,
        "fp32": fp,
        "rows": rows,
        "env": {
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
