"""P4Q on the embedded reference task: the paper's Table 1 (P4Q and baseline rows), Table 3a, Table 3b and Fig. 5.

    python benchmarks/p4q_reference.py --out benchmarks/results/p4q_reference

One command, CPU, no downloads. Writes ``<out>.json``, ``<out>.md`` and ``<out>_fig5.png``. Each finished run is
also kept in ``<out>_runs/`` so an interrupted invocation resumes where it stopped (delete the folder to rerun).

Setting (see docs/p4q.md): P4Q-Ref-Tiny, OMSE PTQ calibration (10 x 128 calib images + class prompts), training on
the ``adapt`` split (2 000 images, all 100 classes), evaluation on ``adapt_test`` (2 000 new images). Table 1 uses
the default 50 epochs; Table 3b and Fig. 5 use 20 epochs at 4-4-8, as the paper does.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch

from p4q_engine.clip.recipe import QuantRecipe
from p4q_engine.errors import ConfigError
from p4q_engine.p4q import baselines
from p4q_engine.p4q.pipeline import Prepared, Source, prepare
from p4q_engine.p4q.trainer import P4QConfig, train
from p4q_engine.ptq import PTQSettings

BITS = ("8-8-8", "4-4-8", "3-3-8", "2-2-8")
FIG5_M = (0, 4, 8, 16, 32)
FIG5_ALPHA = (0.0, 0.2, 0.5, 0.8, 1.0)


class Runner:
    """Prepares each (bits, scope) once and runs/caches individual trainings."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runs_dir = Path(f"{args.out}_runs")
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.prepared: dict[tuple[str, str], Prepared] = {}
        self.loaded = None
        self.settings = PTQSettings(calib_batches=args.calib_batches, progress=False, seed=0, device=args.device)

    def prep(self, bits: str, scope: str) -> Prepared:
        key = (bits, scope)
        if key not in self.prepared:
            src = Source(train_size=self.args.train_size, eval_size=self.args.eval_size)
            p = prepare(
                src, QuantRecipe(bits, scope=scope, observer=self.args.observer), self.settings, loaded=self.loaded
            )
            self.loaded = p.loaded
            self.prepared = {k: v for k, v in self.prepared.items() if k[0] == "fp32"}  # keep memory small
            self.prepared[key] = p
        return self.prepared[key]

    def run(self, name: str, bits: str, scope: str, cfg: P4QConfig) -> dict:
        """Train one configuration (or read its cached result)."""
        path = self.runs_dir / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        p = self.prep(bits, scope)
        t0 = time.perf_counter()
        r = train(p.student, p.loaded.tokenizer, p.data, cfg, progress=False, device=self.args.device)
        row = {
            "name": name,
            "bits": bits,
            "scope": scope,
            "config": asdict(cfg),
            "test": r.metrics["test"],
            "train_top1": r.metrics["train"]["top1"],
            "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": r.history[-1],
            "device": self.args.device,
        }
        path.write_text(json.dumps(row, indent=2) + "\n")
        print(f"  {name}: top-1 {row['test']['top1']:.2f} ({row['seconds']} s)", flush=True)
        return row

    def static(self, name: str, bits: str, scope: str, fn) -> dict:
        path = self.runs_dir / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        row = {"name": name, "bits": bits, "scope": scope, "test": fn(self.prep(bits, scope).data)}
        path.write_text(json.dumps(row, indent=2) + "\n")
        print(f"  {name}: top-1 {row['test']['top1']:.2f}", flush=True)
        return row


def table1(r: Runner, base: P4QConfig, scopes: list[str]) -> dict:
    print("Table 1", flush=True)
    out = {
        "fp32": {
            "zero_shot": r.static("fp_zero_shot", "fp32", "full", lambda d: baselines.zero_shot(d, False)),
            "linear_probe": r.static("fp_linear_probe", "fp32", "full", lambda d: baselines.linear_probe(d, False)),
            "coop": r.run("fp_coop", "fp32", "full", replace(base, adapter=False, loss="ce")),
        },
        "quantized": [],
    }
    for scope in scopes:
        for bits in BITS:
            tag = f"{bits}_{scope}"
            row = {
                "bits": bits,
                "scope": scope,
                "ptq": r.static(f"ptq_{tag}", bits, scope, lambda d: baselines.zero_shot(d, True)),
                "qlp": r.static(f"qlp_{tag}", bits, scope, lambda d: baselines.linear_probe(d, True)),
                "p4q": r.run(f"p4q_{tag}", bits, scope, base),
            }
            fp = out["fp32"]["zero_shot"]["test"]["top1"]
            ptq, p4q = row["ptq"]["test"]["top1"], row["p4q"]["test"]["top1"]
            row["recovered"] = None if fp - ptq <= 0 else (p4q - ptq) / (fp - ptq)
            out["quantized"].append(row)
    return out


def table3a(r: Runner, base: P4QConfig) -> list[dict]:
    print("Table 3a", flush=True)
    return [
        {
            "method": "PTQ (no training)",
            **r.static("ptq_4-4-8_full", "4-4-8", "full", lambda d: baselines.zero_shot(d, True)),
        },
        {"method": "+ prompt", **r.run("3a_prompt", "4-4-8", "full", replace(base, adapter=False))},
        {"method": "+ QAdapter", **r.run("3a_adapter", "4-4-8", "full", replace(base, prompt=False))},
        {"method": "+ prompt + QAdapter (P4Q)", **r.run("p4q_4-4-8_full", "4-4-8", "full", base)},
    ]


def table3b(r: Runner, base: P4QConfig, epochs: int) -> list[dict]:
    print("Table 3b", flush=True)
    b = replace(base, epochs=epochs)
    rows = [
        {"loss": "L_dist only", "lambda": None, **r.run("3b_kd", "4-4-8", "full", replace(b, loss="kd"))},
        {"loss": "L_c only", "lambda": None, **r.run("3b_ce", "4-4-8", "full", replace(b, loss="ce"))},
    ]
    for lam in (0.5, 1.0, 1.5):
        rows.append(
            {
                "loss": "L_c + lambda L_dist",
                "lambda": lam,
                **r.run(f"3b_both_{lam}", "4-4-8", "full", replace(b, lam=lam)),
            }
        )
    return rows


def fig5(r: Runner, base: P4QConfig, epochs: int) -> list[dict]:
    print("Fig. 5", flush=True)
    b = replace(base, epochs=epochs)
    cells = []
    for m in FIG5_M:
        for a in FIG5_ALPHA:
            cfg = replace(b, prompt=m > 0, n_ctx=max(m, 1), alpha=a)
            try:
                row = r.run(f"fig5_M{m}_a{a}", "4-4-8", "full", cfg)
                cells.append({"M": m, "alpha": a, "top1": row["test"]["top1"]})
            except ConfigError as e:  # M too long for the text tower's context
                cells.append({"M": m, "alpha": a, "top1": None, "reason": str(e)})
    return cells


def plot_fig5(cells: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((len(FIG5_M), len(FIG5_ALPHA)), np.nan)
    for c in cells:
        if c["top1"] is not None:
            grid[FIG5_M.index(c["M"]), FIG5_ALPHA.index(c["alpha"])] = c["top1"]
    fig, ax = plt.subplots(figsize=(6.2, 4.6))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(FIG5_ALPHA)), [str(a) for a in FIG5_ALPHA])
    ax.set_yticks(range(len(FIG5_M)), [str(m) for m in FIG5_M])
    ax.set_xlabel("adapt ratio alpha")
    ax.set_ylabel("prompt length M")
    for i in range(len(FIG5_M)):
        for j in range(len(FIG5_ALPHA)):
            ax.text(
                j,
                i,
                "n/a" if np.isnan(grid[i, j]) else f"{grid[i, j]:.1f}",
                ha="center",
                va="center",
                color="white" if np.isnan(grid[i, j]) or grid[i, j] < np.nanmean(grid) else "black",
                fontsize=9,
            )
    fig.colorbar(im, ax=ax, label="top-1 (%)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fp_error_breakdown(eval_size: Optional[int] = None) -> dict:
    """Where full-precision zero-shot goes wrong on ``adapt_test``: errors with the right colour but the wrong shape,
    the right shape but the wrong colour, or both wrong (class names are "<colour> <shape>")."""
    import torch.nn.functional as F

    from p4q_engine.clip.loading import load_clip
    from p4q_engine.data.datasets import load_dataset
    from p4q_engine.eval.zeroshot import text_classifier

    loaded = load_clip("P4Q-Ref-Tiny")
    ds = load_dataset("reference", "adapt_test", transform=loaded.preprocess, size=eval_size)
    names = ds.classnames
    with torch.no_grad():
        w = text_classifier(loaded.model.encode_text, loaded.tokenizer, names, ds.templates)
        pix = torch.stack([ds.dataset[i][0] for i in range(len(ds.dataset))])
        labels = torch.tensor([ds.dataset[i][1] for i in range(len(ds.dataset))])
        pred = (F.normalize(loaded.model.encode_image(pix), dim=-1) @ w.T).argmax(1)
    wrong = [(names[p].split(" ", 1), names[t].split(" ", 1)) for p, t in zip(pred.tolist(), labels.tolist()) if p != t]
    return {
        "images": len(labels),
        "errors": len(wrong),
        "right_colour_wrong_shape": sum(p[0] == t[0] and p[1] != t[1] for p, t in wrong),
        "right_shape_wrong_colour": sum(p[1] == t[1] and p[0] != t[0] for p, t in wrong),
        "both_wrong": sum(p[0] != t[0] and p[1] != t[1] for p, t in wrong),
    }


def analysis(res: dict) -> list[str]:
    """Does P4Q at 4-4-8 reach full-precision zero-shot (the paper's claim)? The numbers that answer it."""
    fp = res["table1"]["fp32"]
    zs, lp, coop = (fp[k]["test"]["top1"] for k in ("zero_shot", "linear_probe", "coop"))
    rows = {(r["bits"], r["scope"]): r for r in res["table1"]["quantized"]}
    L = ["", "## Does P4Q at 4-4-8 reach full-precision zero-shot?", ""]
    for scope in ("full", "release"):
        r = rows.get(("4-4-8", scope))
        if r:
            p4q = r["p4q"]["test"]["top1"]
            L.append(
                f"* {scope} scope: P4Q {p4q:.2f} vs FP zero-shot {zs:.2f} ({p4q - zs:+.2f}): "
                + (
                    "reaches it."
                    if p4q >= zs
                    else f"does not; it recovers "
                    f"{100 * r['recovered']:.0f}% of the PTQ drop ({r['ptq']['test']['top1']:.2f})."
                )
            )
    L += [
        "",
        f"Why not more: on this task the full-precision *features* are the ceiling, not the text side. With the "
        f"same 2 000 training images, a linear probe on FP image features reaches {lp:.2f} and CoOp (a learned "
        f"prompt, FP model) {coop:.2f} - both **below** FP zero-shot with the hand-written templates ({zs:.2f}). "
        "A prompt and an adapter can win back what quantization took, toward that ceiling, but the FP model "
        "leaves them little above it. (On ImageNet, linear probes beat CLIP zero-shot by over 10 points; that "
        "headroom is what the paper's P4Q uses to pass FP.)",
    ]
    b = res.get("fp_error_breakdown")
    if b:
        L += [
            "",
            f"The ceiling is the tiny vision tower: of FP zero-shot's {b['errors']} errors on {b['images']} "
            f"`adapt_test` images, {b['right_colour_wrong_shape']} have the right colour and the wrong shape, "
            f"{b['right_shape_wrong_colour']} the right shape and the wrong colour, {b['both_wrong']} both wrong. "
            "Shape is what the 4-layer, width-128 ViT at 32x32 pixels cannot separate well, and no text-side "
            "change fixes that.",
        ]
    g = res.get("gpu_crosscheck")
    if g:
        cpu = {"CoOp FP": coop, **{f"P4Q {b} {sc}": r["p4q"]["test"]["top1"] for (b, sc), r in rows.items()}}
        gaps = [abs(v - cpu[k]) for k, v in g["top1"].items() if k in cpu]
        L += [
            "",
            f"Cross-check on a GPU ({g['device']}, {g['date']}, same code with `--device cuda`): "
            + ", ".join(f"{k} {v:.2f}" for k, v in g["top1"].items())
            + f". CUDA kernels round differently, and training follows: the runs differ from the CPU ones by "
            f"{min(gaps):.2f}-{max(gaps):.2f} points (most at 3 and 2 bits, where a flipped code weighs most).",
        ]
    return L


def _f(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown(res: dict) -> str:
    t1, fp = res["table1"], res["table1"]["fp32"]
    L = [
        f"# P4Q on the reference task ({res['model']})",
        "",
        f"Produced by `{res['command']}` on {res['date']} ({res['env'].get('device', 'cpu')}, "
        f"{res['env']['machine']}, torch {res['env']['torch']}, {res['env']['threads']} threads, "
        f"{res['wall_seconds'] / 60:.1f} min).",
        "",
        f"Train: `adapt` ({res['train_size']} images, 100 classes); test: `adapt_test` ({res['eval_size']} "
        f"images). PTQ observer {res['observer']}; P4Q: M = 16, alpha = 0.2, 8-bit QAdapter, L_c + 1.0 L_dist, "
        f"{res['epochs']} epochs, batch 128, prompt SGD lr {res['base']['prompt_lr']}, adapter AdamW lr "
        f"{res['base']['adapter_lr']}, seed 0.",
        "",
        "## Table 1",
        "",
        "| Method | #Bits | Scope | Top-1 | Top-5 |",
        "|---|---|---|---|---|",
    ]
    for label, key in (("Zero-shot CLIP", "zero_shot"), ("Linear probe", "linear_probe"), ("CoOp (prompt)", "coop")):
        t = fp[key]["test"]
        L.append(f"| {label} | 32-32-32 | - | {t['top1']:.2f} | {t['top5']:.2f} |")
    for row in t1["quantized"]:
        for label, key in (("PTQ zero-shot (OMSE)", "ptq"), ("Quantized linear probe", "qlp"), ("**P4Q**", "p4q")):
            t = row[key]["test"]
            L.append(f"| {label} | {row['bits']} | {row['scope']} | {t['top1']:.2f} | {t['top5']:.2f} |")
    L += [
        "",
        "Fraction of the PTQ drop (FP zero-shot minus PTQ zero-shot, top-1) that P4Q recovers:",
        "",
        "| #Bits | Scope | FP | PTQ | P4Q | drop | recovered |",
        "|---|---|---|---|---|---|---|",
    ]
    fp1 = fp["zero_shot"]["test"]["top1"]
    for row in t1["quantized"]:
        ptq, p4q = row["ptq"]["test"]["top1"], row["p4q"]["test"]["top1"]
        rec = "-" if row["recovered"] is None else f"{100 * row['recovered']:.0f}%"
        L.append(f"| {row['bits']} | {row['scope']} | {fp1:.2f} | {ptq:.2f} | {p4q:.2f} | {fp1 - ptq:.2f} | {rec} |")
    L += [
        "",
        "## Table 3a: components (4-4-8, full scope, 50 epochs)",
        "",
        "| Method | Top-1 | Top-5 |",
        "|---|---|---|",
    ]
    for row in res["table3a"]:
        L.append(f"| {row['method']} | {row['test']['top1']:.2f} | {row['test']['top5']:.2f} |")
    L += [
        "",
        f"## Table 3b: losses (4-4-8, full scope, {res['ablation_epochs']} epochs)",
        "",
        "| Loss | lambda | Top-1 | Top-5 |",
        "|---|---|---|---|",
    ]
    for row in res["table3b"]:
        L.append(f"| {row['loss']} | {_f(row['lambda'])} | {row['test']['top1']:.2f} | {row['test']['top5']:.2f} |")
    L += [
        "",
        f"## Fig. 5: prompt length M x adapt ratio alpha (4-4-8, full, {res['ablation_epochs']} epochs)",
        "",
        f"![fig5]({Path(res['fig5_png']).name})",
        "",
        "| M \\ alpha | " + " | ".join(map(str, FIG5_ALPHA)) + " |",
        "|---|" + "---|" * len(FIG5_ALPHA),
    ]
    for m in FIG5_M:
        vals = [next(c["top1"] for c in res["fig5"] if c["M"] == m and c["alpha"] == a) for a in FIG5_ALPHA]
        L.append(f"| {m} | " + " | ".join("n/a" if v is None else f"{v:.2f}" for v in vals) + " |")
    na = [c for c in res["fig5"] if c["top1"] is None]
    if na:
        L += ["", f"n/a: {na[0]['reason']}"]
    L += analysis(res)
    return "\n".join(L) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/p4q_reference")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--ablation-epochs", type=int, default=20)
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--calib-batches", type=int, default=10)
    ap.add_argument("--observer", default="omse")
    ap.add_argument("--scopes", default="full,release")
    ap.add_argument("--parts", default="table1,table3a,table3b,fig5")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (training and calibration)")
    ap.add_argument("--plot-only", action="store_true", help="redraw <out>_fig5.png and <out>.md from <out>.json")
    args = ap.parse_args(argv)
    if args.plot_only:
        res = json.loads(Path(f"{args.out}.json").read_text())
        if "fp_error_breakdown" not in res:  # results from before the breakdown existed: add it (one FP eval)
            res["fp_error_breakdown"] = fp_error_breakdown(res.get("eval_size_arg"))
            Path(f"{args.out}.json").write_text(json.dumps(res, indent=2) + "\n")
        res["fig5_png"] = f"{args.out}_fig5.png"
        plot_fig5(
            res["fig5"],
            Path(res["fig5_png"]),
            f"P4Q 4-4-8 on the reference task, {res['ablation_epochs']} epochs: top-1 (%)",
        )
        Path(f"{args.out}.md").write_text(markdown(res))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    r = Runner(args)
    base = P4QConfig(epochs=args.epochs)
    parts = args.parts.split(",")
    res: dict = {
        "command": "python benchmarks/p4q_reference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "model": "P4Q-Ref-Tiny",
        "observer": args.observer,
        "epochs": args.epochs,
        "ablation_epochs": args.ablation_epochs,
        "base": asdict(base),
        "env": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        },
    }
    if "table1" in parts:
        res["table1"] = table1(r, base, args.scopes.split(","))
    if "table3a" in parts:
        res["table3a"] = table3a(r, base)
    if "table3b" in parts:
        res["table3b"] = table3b(r, base, args.ablation_epochs)
    if "fig5" in parts:
        res["fig5"] = fig5(r, base, args.ablation_epochs)
        res["fig5_png"] = f"{args.out}_fig5.png"
        try:
            plot_fig5(
                res["fig5"],
                Path(res["fig5_png"]),
                f"P4Q 4-4-8 on the reference task, {args.ablation_epochs} epochs: top-1 (%)",
            )
        except ImportError:  # no matplotlib where it ran: `--plot-only` redraws it from the JSON
            print("matplotlib missing: plot skipped")
    from p4q_engine.data.reference import DEFAULT_SPLIT_SIZES

    res["train_size"] = args.train_size or DEFAULT_SPLIT_SIZES["adapt"]
    res["eval_size"] = args.eval_size or DEFAULT_SPLIT_SIZES["adapt_test"]
    res["eval_size_arg"] = args.eval_size
    res["fp_error_breakdown"] = fp_error_breakdown(args.eval_size)
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    Path(f"{args.out}.json").write_text(json.dumps(res, indent=2) + "\n")
    if all(k in res for k in ("table1", "table3a", "table3b", "fig5")):
        Path(f"{args.out}.md").write_text(markdown(res))
        print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
