"""Artifact size of every open_clip ViT the GPU engine runs, per bit config, beside fp32 and bf16.

    python benchmarks/model_sizes.py --out benchmarks/results/size_models

Random weights through the project's ``load_clip`` (size does not depend on values), full scope, minmax calibration
on one random image, 100 classes of 8-bit text features - what ``p4q export`` writes. fp32 is the folded float
artifact; bf16 is that image tower at 2 bytes a parameter (computed: the format stores float tensors as fp32).
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
import torch.nn.functional as F

from p4q_engine.artifact.export import preprocess_config
from p4q_engine.artifact.fold import fold
from p4q_engine.artifact.format import save
from p4q_engine.clip.calibrate import calibrate
from p4q_engine.clip.loading import load_clip
from p4q_engine.clip.qmodel import QuantCLIP
from p4q_engine.clip.recipe import QuantRecipe

MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14")
BITS = ("fp32", "8-8-8", "4-4-8", "2-2-8")
MIB = 2**20


def artifact_bytes(loaded, bits: str, classes: int, tmp: Path) -> int:
    q = QuantCLIP(loaded.model, QuantRecipe(bits, observer="minmax"))
    tok = loaded.tokenizer([f"a photo of class {i}" for i in range(classes)])
    if not q.is_float:
        calibrate(q, [torch.randn(1, 3, *loaded.model.visual.image_size)], tok, progress=False)
    with torch.no_grad():
        feats = F.normalize(q.encode_text(tok).float(), dim=-1)
    return save(fold(q, feats, [f"class {i}" for i in range(classes)], preprocess_config(loaded.model)), tmp / "m.p4q")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/size_models")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--classes", type=int, default=100)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            torch.manual_seed(0)
            loaded = load_clip(name)
            params = sum(p.numel() for p in loaded.model.visual.parameters())
            row = {"model": name, "image_tower_params": params, "bf16_mib": round(2 * params / MIB, 2)}
            for bits in BITS:
                row[f"{bits}_mib"] = round(artifact_bytes(loaded, bits, args.classes, Path(d)) / MIB, 2)
            rows.append(row)
            print(row, flush=True)
            del loaded
    res = {
        "command": "python benchmarks/model_sizes.py " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "classes": args.classes,
        "rows": rows,
    }
    lines = [
        "# Artifact size per model (full scope, 100 classes)",
        "",
        f"Produced by `{res['command']}` on {res['date']} (CPU {res['machine']}, torch {res['torch']}). "
        "Random weights via `load_clip`; bf16 = the image tower's parameters at 2 bytes (computed).",
        "",
        "| model | image-tower params | bf16 MiB | fp32 artifact MiB | 8-8-8 MiB | 4-4-8 MiB | 2-2-8 MiB | "
        "4-4-8 vs bf16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['image_tower_params'] / 1e6:.1f} M | {r['bf16_mib']:.1f} | "
            f"{r['fp32_mib']:.1f} | {r['8-8-8_mib']:.1f} | {r['4-4-8_mib']:.1f} | {r['2-2-8_mib']:.1f} | "
            f"{r['bf16_mib'] / r['4-4-8_mib']:.2f}x smaller |"
        )
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=2) + "\n")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
