"""One-GPU benchmark of the engine against open_clip baselines, plus full-shape kernel parity (issue: GPU kernels).

Parts (``--parts``, comma separated; each writes ``<out>/<part>.json`` and the last call merges them):

* ``parity``  : qgemm / qattention / LN+quant at full ViT-B/32 shapes vs float64 references on the GPU, and the GPU
                engine vs the CPU engine on the same artifact.
* ``kernels`` : TOP/s of the four ViT-B/32 GEMM shapes at M = 51200 and M = 50: bf16 cuBLAS, torch._int_mm,
                fp8 torch._scaled_mm, qgemm at 8/4/3/2 bits; qattention vs SDPA bf16 at 50 tokens.
* ``models``  : ViT-B/32 image encoder (random weights) at batch 1, 8, 64, 256, 1024: open_clip fp16 and bf16 eager,
                an fp8 path (torch._scaled_mm Linear layers), the fake-quant path and the engine at 8-8-8, 4-4-8 and
                2-2-8 (full scope): images/s, p50 latency, peak GPU memory.
* ``compile`` : torch.compile bf16 (mode=max-autotune, CUDA graphs), compiled separately per batch size.

    python benchmarks/gpu_bench.py --parts parity,kernels,models --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

GEMM_SHAPES = {"in_proj": (2304, 768), "out_proj": (768, 768), "c_fc": (3072, 768), "c_proj": (768, 3072)}
BATCHES = (1, 8, 64, 256, 1024)
INT8_PEAK_TOPS = 1979.0  # H100 SXM dense int8


def env() -> dict:
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


@contextlib.contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    """Temporarily set an environment variable (``P4Q_QGEMM_KERNEL``, ``P4Q_WEIGHT_LAYOUT``: the before/after
    switches of the kernels)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def kernel_env(kind: str):
    """``P4Q_QGEMM_KERNEL`` (which qgemm kernels the autotuner may pick) within a block."""
    return env_var("P4Q_QGEMM_KERNEL", kind)


def log(*a) -> None:
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------ artifacts
def vit_b32():
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32").eval()


def build_artifact(model, bits: str, path: Path, scope: str = "full") -> Path:
    """Calibrate (minmax, 2 random batches: speed does not depend on values) and fold ViT-B/32 at ``bits``."""
    from p4q_engine.artifact.export import preprocess_config
    from p4q_engine.artifact.fold import fold
    from p4q_engine.artifact.format import save
    from p4q_engine.clip.calibrate import calibrate
    from p4q_engine.clip.qmodel import QuantCLIP
    from p4q_engine.clip.recipe import QuantRecipe

    q = QuantCLIP(model, QuantRecipe(bits, scope=scope, observer="minmax")).cuda()
    tok = torch.randint(1, 49000, (100, 77))
    tok[:, 12] = 49407
    tok[:, 13:] = 0
    calibrate(q, [torch.randn(32, 3, 224, 224) for _ in range(2)], tok, device="cuda", progress=False)
    with torch.no_grad():
        feats = q.encode_text(tok.cuda()).float()
    save(fold(q, feats, [f"class {i}" for i in range(100)], preprocess_config(model)), path)
    return path


# ------------------------------------------------------------------------------------------------ parity
def part_parity(args) -> dict:
    from p4q_engine.kernels.layernorm import layernorm_quant, layernorm_quant_reference
    from p4q_engine.kernels.qattention import AttnSites, qattention, qattention_reference
    from p4q_engine.kernels.qgemm import PackedWeight, Requant, qgemm

    res: dict = {"qgemm": [], "qattention": [], "layernorm": [], "engine": []}
    g = torch.Generator(device="cuda").manual_seed(1)
    for m in (51200, 50):
        for name, (n, k) in GEMM_SHAPES.items():
            for bits in (2, 3, 4, 8):
                qmax = (1 << (bits - 1)) - 1
                codes = torch.randint(-qmax, qmax + 1, (n, k), device="cuda", generator=g, dtype=torch.int8)
                w = PackedWeight.from_codes(codes, torch.rand(n, device="cuda") * 0.01 + 1e-3, bits)
                a = torch.randint(-128, 128, (m, k), device="cuda", generator=g, dtype=torch.int8)
                zp = int(torch.randint(0, 256, (1,)).item())
                ref = (a.double() + 128 - zp) @ codes.double().t()
                out = qgemm(a, 0.01, zp, w, raw=True)
                exact = bool(torch.equal(out.double(), ref))
                bias = torch.randn(n, device="cuda")
                y = qgemm(a, 0.01, zp, w, bias=bias)
                yref = (ref.float() * (0.01 * w.scale)) + bias
                rel = float((y - yref).norm() / yref.norm())
                rq = Requant(
                    torch.full((n,), 0.05, device="cuda"), torch.full((n,), 128, device="cuda", dtype=torch.int32)
                )
                qc = qgemm(a, 0.01, zp, w, bias=bias, requant=rq)
                qref = torch.clamp(torch.floor(yref / 0.05 + 0.5) + 128, 0, 255).int() - 128
                diff = (qc.int() - qref).abs()
                row = {
                    "m": m,
                    "layer": name,
                    "n": n,
                    "k": k,
                    "bits": bits,
                    "acc_bit_exact": exact,
                    "float_rel_err": rel,
                    "requant_max_code_diff": int(diff.max()),
                    "requant_frac_diff": float((diff > 0).float().mean()),
                }
                res["qgemm"].append(row)
                log("qgemm", row)
    for b in (64, 1024):
        qkv = torch.randint(-128, 128, (b, 50, 2304), device="cuda", generator=g, dtype=torch.int8)
        sites = AttnSites((0.05, 120), (0.05, 131), (0.04, 128), (1 / 255, 0), (0.03, 127))
        out = qattention(qkv, 12, sites)
        ref = qattention_reference(qkv[:64].cpu(), 12, sites)
        diff = (out[:64].cpu().int() - ref.int()).abs()
        row = {"batch": b, "max_code_diff": int(diff.max()), "frac_diff": float((diff > 0).float().mean())}
        res["qattention"].append(row)
        log("qattention", row)
    x = torch.randn(51200, 768, device="cuda") * 2 + 0.5
    wln, bln = torch.randn(768, device="cuda"), torch.randn(768, device="cuda")
    o = layernorm_quant(x, wln, bln, 1e-5, 0.03, 120)
    r = layernorm_quant_reference(x, wln, bln, 1e-5, 0.03, 120)
    diff = (o.cpu().int() - r.int()).abs()
    res["layernorm"].append(
        {"m": 51200, "max_code_diff": int(diff.max()), "frac_diff": float((diff > 0).float().mean())}
    )
    log("layernorm", res["layernorm"][-1])
    res["engine"] = engine_parity(args)
    return res


def engine_parity(args) -> list:
    """GPU engine vs CPU engine on the same artifact: top-1 agreement and max logit difference."""
    from p4q_engine.runtime.engine import Engine

    rows = []
    model = vit_b32()
    with tempfile.TemporaryDirectory() as d:
        for bits in ("8-8-8", "4-4-8", "2-2-8"):
            if not want(f"engine {bits}"):
                continue
            path = build_artifact(model, bits, Path(d) / f"{bits}.p4q")
            cpu, gpu = Engine.load(path), Engine.load(path, device="cuda")
            x = torch.randn(64, 3, 224, 224)
            lc, lg = cpu.logits(x), gpu.logits(x)
            rows.append(
                {
                    "artifact": f"ViT-B-32 {bits} full (random weights)",
                    "images": 64,
                    "top1_agree": float((lc.argmax(1) == lg.argmax(1)).float().mean()),
                    "max_logit_diff": float((lc - lg).abs().max()),
                }
            )
            log("engine", rows[-1])
        ref = Path("p4q_engine/assets/p4q_ref_tiny.safetensors")
        if ref.exists():
            rows.extend(reference_parity(Path(d), tuple(args.parity_artifact or ())))
    return rows


def reference_parity(tmp: Path, extra: tuple = ()) -> list:
    """The reference task: GPU engine vs CPU engine on every image of the split (PTQ artifacts at every bit config
    on the held-out ``test`` split; ``extra`` artifacts, e.g. an exported P4Q model, on ``adapt_test``)."""
    from p4q_engine.artifact.export import export_ptq
    from p4q_engine.artifact.format import save
    from p4q_engine.clip.loading import load_clip
    from p4q_engine.clip.recipe import QuantRecipe
    from p4q_engine.data.datasets import load_dataset
    from p4q_engine.ptq import PTQSettings

    loaded = load_clip("P4Q-Ref-Tiny")
    calib = load_dataset("reference", "calib", transform=loaded.preprocess)
    test = load_dataset("reference", "test", transform=loaded.preprocess)
    jobs = []
    for bits in ("8-8-8", "4-4-8", "3-3-8", "2-2-8"):
        art = export_ptq(
            loaded.model, loaded.tokenizer, QuantRecipe(bits), calib, test, PTQSettings(device="cuda", progress=False)
        )
        save(art, tmp / f"ref-{bits}.p4q")
        jobs.append((f"reference task PTQ {bits} full (omse)", tmp / f"ref-{bits}.p4q", test))
    for path in extra:
        jobs.append(
            (
                f"reference task {Path(path).name}",
                Path(path),
                load_dataset("reference", "adapt_test", transform=loaded.preprocess),
            )
        )
    return [engine_pair(name, path, ds) for name, path, ds in jobs]


def engine_pair(name: str, path: Path, ds) -> dict:
    """Top-1 agreement and logit difference of the GPU and CPU engines on every image of ``ds``; for each
    disagreement, the CPU engine's top-1/top-2 margin."""
    from p4q_engine.runtime.engine import Engine

    cpu, gpu = Engine.load(path), Engine.load(path, device="cuda")
    pix = torch.stack([ds.dataset[i][0] for i in range(len(ds.dataset))])
    lc, lg = cpu.logits(pix, batch_size=256), gpu.logits(pix, batch_size=256).cpu()
    agree = lc.argmax(1) == lg.argmax(1)
    top2 = lc.topk(2, dim=1).values
    row = {
        "artifact": name,
        "images": len(pix),
        "top1_agree": float(agree.float().mean()),
        "disagreements": int((~agree).sum()),
        "disagreement_margins": [round(float(m), 5) for m in (top2[:, 0] - top2[:, 1])[~agree]],
        "max_logit_diff": float((lc - lg).abs().max()),
        "mean_logit_diff": float((lc - lg).abs().mean()),
    }
    # every disagreement traced site by site to its first differing code: tie-only parity or not
    from p4q_engine.runtime.kernel_divergence import kernel_first_divergence

    traces = [kernel_first_divergence(gpu, cpu, pix[i]) for i in torch.nonzero(~agree).flatten().tolist()[:20]]
    row["traces"] = traces
    row["untied"] = [t for t in traces if not t["aligned"] or (t["site"] and not t["tie"])]
    log("engine", row)
    return row


# ------------------------------------------------------------------------------------------------ kernels
def part_kernels(args) -> dict:
    from p4q_engine.kernels.qattention import AttnSites, qattention
    from p4q_engine.kernels.qgemm import PackedWeight, qgemm

    rows = []
    for m in (51200, 50):
        for name, (n, k) in GEMM_SHAPES.items():
            ops = 2.0 * m * n * k
            a16 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            a8 = torch.randint(-128, 128, (m, k), device="cuda", dtype=torch.int8)
            w8t = torch.randint(-127, 128, (k, n), device="cuda", dtype=torch.int8)
            r = {"m": m, "layer": name, "n": n, "k": k}
            r["bf16_cublas_ms"] = bench_ms(lambda: a16 @ w16.t())
            try:
                r["int_mm_ms"] = bench_ms(lambda: torch._int_mm(a8, w8t))
            except RuntimeError as e:
                r["int_mm_ms"] = None
                r["int_mm_error"] = str(e).splitlines()[0]
            try:
                af = a16.to(torch.float8_e4m3fn)
                wf = w16.to(torch.float8_e4m3fn).t()
                one = torch.ones((), device="cuda")
                r["fp8_scaled_mm_ms"] = bench_ms(lambda: torch._scaled_mm(af, wf, one, one, out_dtype=torch.bfloat16))
            except (RuntimeError, TypeError) as e:
                r["fp8_scaled_mm_ms"] = None
                r["fp8_error"] = str(e).splitlines()[0]
            bias = torch.randn(n, device="cuda")
            for bits in (8, 4, 3, 2):
                qmax = (1 << (bits - 1)) - 1
                w = PackedWeight.from_codes(
                    torch.randint(-qmax, qmax + 1, (n, k), device="cuda", dtype=torch.int8),
                    torch.rand(n, device="cuda") * 0.01,
                    bits,
                )
                for kind in ("ptr", "tma", "auto"):  # before (pointer kernel only) / TMA only / autotuned over both
                    with kernel_env(kind):
                        ms = bench_ms(lambda: qgemm(a8, 0.01, 128, w, bias=bias, out_dtype=torch.bfloat16))
                    r[f"qgemm_w{bits}_ms" if kind == "auto" else f"qgemm_{kind}_w{bits}_ms"] = ms
            for key in [k_ for k_ in list(r) if k_.endswith("_ms") and r[k_]]:
                r[key.replace("_ms", "_tops")] = ops / (r[key] * 1e-3) / 1e12
            rows.append(r)
            log("gemm", {k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in r.items()})
    attn = []
    for b in (1, 64, 1024):
        qkv = torch.randint(-128, 128, (b, 50, 2304), device="cuda", dtype=torch.int8)
        sites = AttnSites((0.05, 120), (0.05, 131), (0.04, 128), (1 / 255, 0), (0.03, 127))
        q, k, v = (torch.randn(b, 12, 50, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        row = {
            "batch": b,
            "qattention_ms": bench_ms(lambda: qattention(qkv, 12, sites)),
            "sdpa_bf16_ms": bench_ms(lambda: F.scaled_dot_product_attention(q, k, v)),
        }
        for nw in (1, 2, 8):  # the kernel's default is 4 warps; a loop over several heads per program was no
            # faster at any batch (benchmarks/results/gpu/experiments/2026-11-26_tma_and_heads_per_program.json)
            row[f"qattention_w{nw}_ms"] = bench_ms(lambda: qattention(qkv, 12, sites, num_warps=nw))
        row["speedup_vs_sdpa"] = row["sdpa_bf16_ms"] / row["qattention_ms"]
        attn.append(row)
        log("attention", row)
    return {"gemm": rows, "attention": attn}


# ------------------------------------------------------------------------------------------------ models
class Fp8Linear(nn.Module):
    """Linear on fp8 tensor cores: per-tensor dynamic activation scale, per-tensor weight scale, bf16 output."""

    def __init__(self, weight: torch.Tensor, bias) -> None:
        super().__init__()
        s = weight.abs().max().float() / 448.0
        self.w = (weight.float() / s).to(torch.float8_e4m3fn).t()
        self.sw = s.reshape(())
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        sx = (x2.abs().max().float() / 448.0).clamp(min=1e-12)
        xf = (x2.float() / sx).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xf, self.w, sx, self.sw, bias=self.bias, out_dtype=torch.bfloat16)
        return y.reshape(*shape[:-1], -1)


class Fp8Attention(nn.Module):
    """Self-attention with fp8 projections and bf16 SDPA (replaces nn.MultiheadAttention in the fp8 path)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.heads = mha.num_heads
        self.in_proj = Fp8Linear(mha.in_proj_weight.detach(), mha.in_proj_bias)
        self.out_proj = Fp8Linear(mha.out_proj.weight.detach(), mha.out_proj.bias)

    def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None):
        b, n, d = q_x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.in_proj(q_x).chunk(3, -1))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.out_proj(o), None


def fp8_model(model):
    import copy

    m = copy.deepcopy(model).to(torch.bfloat16).cuda()
    for blk in m.visual.transformer.resblocks:
        blk.attn = Fp8Attention(blk.attn)
        blk.mlp.c_fc = Fp8Linear(blk.mlp.c_fc.weight.detach(), blk.mlp.c_fc.bias)
        blk.mlp.c_proj = Fp8Linear(blk.mlp.c_proj.weight.detach(), blk.mlp.c_proj.bias)
    return m


def measure(fn, batch: int, dtype=torch.float32) -> dict:
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
    with torch.no_grad():
        fn(x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ms = bench_ms(lambda: fn(x), warmup=10, rep=50 if batch >= 256 else 100)
        peak = torch.cuda.max_memory_allocated() / 2**20
    return {"batch": batch, "p50_ms": ms, "images_per_s": batch / (ms * 1e-3), "peak_mib": peak}


def part_models(args) -> dict:
    from p4q_engine.clip.calibrate import calibrate
    from p4q_engine.clip.qmodel import QuantCLIP
    from p4q_engine.clip.recipe import QuantRecipe
    from p4q_engine.runtime.engine import Engine

    model = vit_b32()
    results: dict = {}

    def run(name, fn, dtype=torch.float32, batches=BATCHES):
        if args.models and not any(name.startswith(m) for m in args.models):
            return
        results[name] = []
        for b in batches:
            try:
                results[name].append(measure(fn, b, dtype))
            except Exception as e:  # an OOM or missing feature must not lose the other rows
                results[name].append({"batch": b, "error": f"{e.__class__.__name__}: {str(e).splitlines()[0]}"})
            log(name, results[name][-1])
        torch.cuda.empty_cache()

    import copy

    want = lambda name: not args.models or any(name.startswith(m) for m in args.models)
    m16 = copy.deepcopy(model).half().cuda()
    run("open_clip fp16 eager", lambda x: m16.encode_image(x), torch.float16)
    del m16
    mbf = copy.deepcopy(model).to(torch.bfloat16).cuda()
    run("open_clip bf16 eager", lambda x: mbf.encode_image(x), torch.bfloat16)
    del mbf
    try:
        if not want("fp8"):
            raise RuntimeError("not selected")
        m8 = fp8_model(model)
        run("fp8 _scaled_mm", lambda x: m8.encode_image(x), torch.bfloat16)
        del m8
    except Exception as e:
        if want("fp8"):
            results["fp8 _scaled_mm"] = [{"error": str(e).splitlines()[0]}]
    if want("fake-quant"):
        q = QuantCLIP(model, QuantRecipe("4-4-8", observer="minmax")).cuda()
        tok = torch.randint(1, 49000, (8, 77)).index_fill_(1, torch.tensor([9]), 49407)
        calibrate(q, [torch.randn(8, 3, 224, 224)], tok, device="cuda", progress=False)
        run("fake-quant 4-4-8 (fp32)", lambda x: q.encode_image(x), batches=(1, 8, 64, 256))
        del q
    torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as d:
        for bits in ("8-8-8", "4-4-8", "2-2-8"):
            if not want(f"engine {bits}"):
                continue
            path = build_artifact(model, bits, Path(d) / f"{bits}.p4q")
            kinds = ("ptr", "auto") if bits != "2-2-8" else ("auto",)
            for kind in kinds:  # "ptr": the engine before the TMA kernel, measured in the same run
                with kernel_env(kind):
                    eng = Engine.load(path, device="cuda")
                    run(f"engine {bits}" + (" (pointer qgemm only)" if kind == "ptr" else ""), lambda x: eng.encode(x))
                    del eng
                torch.cuda.empty_cache()
    return results


def part_compile(args) -> dict:
    import copy

    model = vit_b32()
    rows = []
    for b in args.compile_batches:
        torch._dynamo.reset()
        m = copy.deepcopy(model).to(torch.bfloat16).cuda()
        fn = torch.compile(m.visual, mode="max-autotune", dynamic=False)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                for _ in range(3):
                    fn(torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.bfloat16))
            row = measure(lambda x: fn(x), b, torch.bfloat16)
            row["compile_s"] = time.perf_counter() - t0
        except Exception as e:
            row = {"batch": b, "error": f"{e.__class__.__name__}: {str(e).splitlines()[0]}"}
        rows.append(row)
        log("compile", row)
        Path(args.out, "compile_partial.json").write_text(json.dumps({"torch.compile bf16 max-autotune": rows}))
        del m, fn
        torch.cuda.empty_cache()
    return {"torch.compile bf16 max-autotune": rows}


def part_reference_parity(args) -> dict:
    """Only the reference-task GPU-vs-CPU engine parity (the ``parity`` part runs it after the kernel checks)."""
    with tempfile.TemporaryDirectory() as d:
        return {"engine": reference_parity(Path(d), tuple(args.parity_artifact or ()))}


PARTS = {
    "parity": part_parity,
    "kernels": part_kernels,
    "models": part_models,
    "compile": part_compile,
    "reference_parity": part_reference_parity,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="parity,kernels,models")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--compile-batches",
        type=lambda v: [int(x) for x in v.split(",")],
        default=list(BATCHES),
        help="batch sizes for the compile part (each compiles for minutes)",
    )
    ap.add_argument(
        "--models",
        type=lambda v: v.split(","),
        default=None,
        help="models part: only rows whose name starts with one of these (comma separated)",
    )
    ap.add_argument(
        "--parity-artifact",
        action="append",
        help="also check this reference-task .p4q (e.g. an "
        "exported P4Q model) GPU vs CPU engine on the adapt_test split; repeatable",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = env()
    log(info)
    status = 0
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            res = PARTS[part](args)
        except Exception:
            traceback.print_exc()
            res = {"error": traceback.format_exc().splitlines()[-1]}
            status = 1
        res["env"] = info
        res["seconds"] = time.perf_counter() - t0
        res["command"] = "python benchmarks/gpu_bench.py " + " ".join(sys.argv[1:])
        (out / f"{part}.json").write_text(json.dumps(res, indent=1))
        log(f"== {part} done in {res['seconds']:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
