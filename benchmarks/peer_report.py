"""Tables and a plot of engine rows against the best peer, from ``benchmarks/vit_bench.py`` logs or JSON.

    python benchmarks/peer_report.py RESULTS/log_*.txt --out RESULTS

Reads every ``<model> {row}`` line of the logs (or ``rows`` of ``models*.json``), and writes ``peers.md`` (per model
and batch: each path's p50 ms and images/s, the best peer, each engine row divided by the best peer's time as a
speed ratio) and ``peers.png``. The best peer at a batch is the faster of the compile and fp8 peers measured in the
same process; the eager and drift rows are shown but never chosen.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

PEERS = ("compile peer (", "fp8 peer (", "torchao ")
LINE = re.compile(r"^(ViT-[\w/-]+) (\{'batch'.*\})\s*$")


def read_rows(paths: list[Path]) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = defaultdict(list)
    for p in paths:
        if p.suffix == ".json":
            data = json.loads(p.read_text())["result"]
            for model, entry in data.items():
                rows[model].extend(r for r in entry["rows"] if "p50_ms" in r)
            continue
        for line in p.read_text().splitlines():
            m = LINE.match(line)
            if m:
                rows[m.group(1)].append(ast.literal_eval(m.group(2)))
    return rows


def table(rows: dict[str, list[dict]]) -> str:
    out = []
    for model, rs in rows.items():
        by_batch: dict[int, list[dict]] = defaultdict(list)
        for r in rs:
            by_batch[r["batch"]].append(r)
        out += [
            f"### {model}",
            "",
            "| batch | path | p50 ms | images/s | peak MiB | speed vs best peer |",
            "|---|---|---|---|---|---|",
        ]
        for b in sorted(by_batch):
            peers = [r for r in by_batch[b] if r["path"].startswith(PEERS)]
            best = min((r["p50_ms"] for r in peers), default=None)
            for r in sorted(by_batch[b], key=lambda r: r["p50_ms"]):
                ratio = f"{best / r['p50_ms']:.2f}x" if best and r["path"].startswith("p4q engine") else ""
                out.append(
                    f"| {b} | {r['path']} | {r['p50_ms']:.3f} | {r['images_per_s']:.0f} | {r.get('peak_mib', 0):.0f} "
                    f"| {ratio} |"
                )
        out.append("")
    return "\n".join(out)


def plot(rows: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 4.2), squeeze=False)
    for ax, (model, rs) in zip(axes[0], rows.items()):
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in rs:
            if "drift" in r["path"]:
                continue
            series[r["path"].split(" (")[0]].append((r["batch"], r["images_per_s"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            style = "-o" if name.startswith("p4q") else "--s"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("images / s")
        ax.set_title(f"{model} image tower (H200, random weights)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    rows = read_rows(args.inputs)
    (args.out / "peers.md").write_text(table(rows))
    plot(rows, args.out / "peers.png")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
