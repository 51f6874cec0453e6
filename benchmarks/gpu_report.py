"""Turn the JSON parts of ``gpu_bench.py`` into ``benchmarks/results/gpu_bench.md`` and a PNG plot.

python benchmarks/gpu_report.py --parts-dir benchmarks/results/gpu --out benchmarks/results/gpu_bench
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(d: Path, part: str) -> dict:
    p = d / f"{part}.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _row(rows: list, batch: int) -> dict:
    for r in rows:
        if r.get("batch") == batch:
            return r
    return {}


def models_table(models: dict, compiled: dict) -> tuple[list[str], dict]:
    series = {k: v for k, v in models.items() if isinstance(v, list)}
    series.update({k: v for k, v in compiled.items() if isinstance(v, list)})
    batches = sorted({r["batch"] for rows in series.values() for r in rows if "batch" in r})
    lines = [
        "| path | " + " | ".join(f"b={b} img/s (p50 ms, peak MiB)" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for name, rows in series.items():
        cells = []
        for b in batches:
            r = _row(rows, b)
            if "images_per_s" in r:
                cells.append(f"{r['images_per_s']:,.0f} ({r['p50_ms']:.3f}, {r['peak_mib']:,.0f})")
            else:
                cells.append(r.get("error", "-")[:40] if r else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines, series


def ratios(series: dict) -> list[str]:
    def ips(name, b):
        return _row(series.get(name, []), b).get("images_per_s")

    out = []
    e8, bf, fp8 = ips("engine 8-8-8", 1024), ips("open_clip bf16 eager", 1024), ips("fp8 _scaled_mm", 1024)
    comp = ips("torch.compile bf16 max-autotune", 1024)
    if e8 and bf:
        out.append(f"* engine 8-8-8 / bf16 eager at batch 1024: **{e8 / bf:.2f}x** (target >= 3x)")
    if e8 and comp:
        out.append(f"* engine 8-8-8 / torch.compile bf16 at batch 1024: **{e8 / comp:.2f}x** (target >= 1.5x)")
    if e8 and fp8:
        out.append(f"* engine 8-8-8 / fp8 path at batch 1024: **{e8 / fp8:.2f}x** (target >= 1x)")
    lat = _row(series.get("engine 4-4-8", []), 1).get("p50_ms")
    if lat:
        out.append(f"* engine 4-4-8 latency at batch 1: **{lat:.3f} ms** (target <= 0.3 ms)")
    for bits in ("8-8-8", "4-4-8"):
        after, before = ips(f"engine {bits}", 1024), ips(f"engine {bits} (pointer qgemm only)", 1024)
        if after and before:
            out.append(
                f"* engine {bits} with the TMA qgemm candidates / pointer kernel only, batch 1024, same run: "
                f"**{after / before:.2f}x**"
            )
    return out


def plot(series: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, rows in series.items():
        pts = [(r["batch"], r["images_per_s"]) for r in rows if "images_per_s" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title("ViT-B/32 image encoder throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts-dir", default="benchmarks/results/gpu")
    ap.add_argument("--out", default="benchmarks/results/gpu_bench")
    ap.add_argument("--notes", default=None, help="markdown appended at the end (machines, caveats, analysis)")
    args = ap.parse_args()
    d = Path(args.parts_dir)
    parity, kernels, models, compiled = (_load(d, p) for p in ("parity", "kernels", "models", "compile"))
    ref = _load(d, "reference_parity")
    if ref.get("engine"):
        parity = {**parity, "engine": parity.get("engine", []) + ref["engine"]}
    env = next((x["env"] for x in (models, kernels, parity, compiled) if "env" in x), {})
    lines = [
        f"# GPU benchmark: {env.get('gpu', '?')}",
        "",
        f"Date {env.get('date')}, torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}. "
        "ViT-B/32 with random weights (kernel time does not depend on values). Commands:",
        "",
    ]
    for x in (parity, ref, kernels, models, compiled):
        if "command" in x:
            lines.append(f"* `{x['command']}` ({x.get('seconds', 0):.0f} s)")
    lines.append("")
    if models or compiled:
        lines += ["## Image encoder", ""]
        table, series = models_table(models, compiled)
        png = Path(args.out).with_suffix(".png")
        lines += table + [""] + ratios(series) + ["", f"![throughput]({png.name})", ""]
        plot(series, Path(args.out).with_suffix(".png"))
    if kernels.get("gemm"):
        split = any("qgemm_tma_w8_tops" in r for r in kernels["gemm"])
        lines += ["## GEMM TOP/s (ViT-B/32 shapes)", ""]
        if split:
            lines += [
                "qgemm Wb = the faster of the pointer and the persistent TMA kernel, each with its own best tile "
                "configuration (the autotuner chooses among both per shape, bits and epilogue); both are in "
                "the second table. bf16 output, bias epilogue.",
                "",
            ]
        lines += [
            "| M | layer | N x K | bf16 cuBLAS | torch._int_mm | fp8 _scaled_mm | qgemm W8 | W4 | W3 | W2 | "
            "W8 / _int_mm | W8 % of int8 peak |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in kernels["gemm"]:

            def t(k):
                if split and k.startswith("qgemm_w"):
                    b = k[len("qgemm_w") :]
                    v = max(r.get(f"qgemm_ptr_w{b}_tops") or 0, r.get(f"qgemm_tma_w{b}_tops") or 0) or None
                else:
                    v = r.get(f"{k}_tops")
                return v

            def f(v):
                return f"{v:.0f}" if v else "-"

            w8 = t("qgemm_w8")
            ratio = (w8 / r["int_mm_tops"]) if r.get("int_mm_tops") and w8 else None
            lines.append(
                f"| {r['m']} | {r['layer']} | {r['n']}x{r['k']} | {f(t('bf16_cublas'))} | {f(t('int_mm'))} | "
                f"{f(t('fp8_scaled_mm'))} | {f(w8)} | {f(t('qgemm_w4'))} | {f(t('qgemm_w3'))} | "
                f"{f(t('qgemm_w2'))} | {ratio:.2f}x | {100 * w8 / 1979:.0f}% |"
                if ratio
                else f"| {r['m']} | {r['layer']} | ... | {f(w8)} |"
            )
        lines.append("")
        if split:
            lines += [
                "### Pointer kernel vs persistent TMA kernel (TOP/s, same run)",
                "",
                "| M | layer | " + " | ".join(f"W{b} ptr | W{b} TMA | TMA/ptr" for b in (8, 4, 3, 2)) + " |",
                "|---|---|" + "---|---|---|" * 4,
            ]
            for r in kernels["gemm"]:
                cells = []
                for b in (8, 4, 3, 2):
                    pt, tm = r.get(f"qgemm_ptr_w{b}_tops"), r.get(f"qgemm_tma_w{b}_tops")
                    cells += [f"{pt:.0f}", f"{tm:.0f}", f"{tm / pt:.2f}x"]
                lines.append(f"| {r['m']} | {r['layer']} | " + " | ".join(cells) + " |")
            lines.append("")
    if kernels.get("attention"):
        lines += [
            "## Attention (50 tokens, 12 heads x 64)",
            "",
            "| batch | qattention ms | SDPA bf16 ms | speedup |",
            "|---|---|---|---|",
        ]
        for r in kernels["attention"]:
            lines.append(
                f"| {r['batch']} | {r['qattention_ms']:.4f} | {r['sdpa_bf16_ms']:.4f} | {r['speedup_vs_sdpa']:.2f}x |"
            )
        lines.append("")
    if parity:
        lines += ["## Parity on the GPU", ""]
        q = parity.get("qgemm", [])
        if q:
            lines.append(
                f"* qgemm: {sum(r['acc_bit_exact'] for r in q)}/{len(q)} (shape, bits) cases with a "
                f"bit-exact int32 accumulator; max float relative error "
                f"{max(r['float_rel_err'] for r in q):.2e}; requantized codes differ by at most "
                f"{max(r['requant_max_code_diff'] for r in q)} on at most "
                f"{100 * max(r['requant_frac_diff'] for r in q):.4f}% of elements"
            )
        for r in parity.get("qattention", []):
            lines.append(
                f"* qattention batch {r['batch']}: max code diff {r['max_code_diff']}, "
                f"{100 * r['frac_diff']:.4f}% of codes differ"
            )
        for r in parity.get("layernorm", []):
            lines.append(
                f"* LN+quant M={r['m']}: max code diff {r['max_code_diff']}, {100 * r['frac_diff']:.4f}% differ"
            )
        for r in parity.get("engine", []):
            extra = ""
            if r.get("disagreement_margins"):
                extra = (
                    " (CPU engine top-1/top-2 margin of each disagreement: "
                    + ", ".join(f"{m:.3f}" for m in r["disagreement_margins"])
                    + ")"
                )
            lines.append(
                f"* engine GPU vs CPU, {r['artifact']}: top-1 agreement {100 * r['top1_agree']:.2f}% on "
                f"{r['images']} images, max logit diff {r['max_logit_diff']:.4f}{extra}"
            )
        lines.append("")
    if args.notes:
        lines += [Path(args.notes).read_text().rstrip()]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
