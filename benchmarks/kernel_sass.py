"""Static profile of the Triton kernels: compile them for a GPU architecture on any machine (no GPU needed: Triton
ships ptxas and nvdisasm) and count the SASS instructions of each main loop - per logit for attention, per weight
element for the GEMM's low-bit layouts.

    python benchmarks/kernel_sass.py                      # sm_90: attention tiles, GEMM main loops, TMA kernels
    python benchmarks/kernel_sass.py --root ../old-checkout --parts attention --out before.json   # an older kernel

Why: the tiled attention kernel was issue-bound (2026-12-01: ~56 instructions per logit over both passes, ~0.29 ms
of issue slots for ViT-B/16 at batch 256 of the 0.56 ms measured), and the issue asks for low-bit main loops with
about one integer operation per weight: counts predict both before a GPU run (they do not replace one).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_OP = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA `\((\.L_x_\d+)\)")
#: Arguments the JIT specializes as divisible by 16 at a real launch (16-byte aligned pointers, strides of 3D / D).
_DIVISIBLE = ("qkv_ptr", "out_ptr", "D", "stride_b", "stride_l", "out_stride_b", "out_stride_l")
_FLOATS = ("qk_scale", "sp", "zpp", "pv_scale", "so", "zo", "sm_scale")


def load_module(root: Path, name: str):
    """``kernels/<name>.py`` of the checkout at ``root``, imported standalone (its package as ``_sass_kernels``)."""
    path = root / "kernels" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_sass_kernels.{name}", path)
    pkg = importlib.util.module_from_spec(importlib.util.spec_from_loader("_sass_kernels", loader=None))
    pkg.__path__ = [str(path.parent)]
    sys.modules["_sass_kernels"] = pkg
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_kernel(root: Path):
    """The attention kernels of the checkout at ``root``: (tiled, short)."""
    mod = load_module(root, "qattention")
    tiled = getattr(mod, "_qattention_tiled_kernel", None) or mod._qattention_kernel
    return tiled, mod._qattention_kernel  # before 2026-12-02 the short path had a kernel of its own


def compile_sass(
    fn,
    constants: dict,
    num_warps: int,
    num_stages: int,
    arch: int,
    types: dict | None = None,
    divisible=_DIVISIBLE,
    with_metadata: bool = False,
):
    """SASS of ``fn`` specialised like a real launch (``types``: argument -> Triton type, else ``*i8`` for ``*_ptr``,
    fp32 for the attention scales, i32; ``divisible``: arguments the JIT would see as multiples of 16)."""
    names = fn.arg_names
    sig = {}
    for i, a in enumerate(names):
        if fn.params[i].is_constexpr:
            sig[a] = "constexpr"
        elif types and a in types:
            sig[a] = types[a]
        else:
            sig[a] = "*i8" if a.endswith("_ptr") else "fp32" if a in _FLOATS else "i32"
    consts = {k: v for k, v in constants.items() if k in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible if a in names}
    k = triton.compile(
        ASTSource(fn, sig, consts, attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=num_warps, num_stages=num_stages),
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    try:
        sass = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
        return (sass, k.metadata) if with_metadata else sass
    finally:
        os.unlink(f.name)


def loops(sass: str) -> list[dict]:
    """Each backward branch spanning more than 50 instructions (a main loop): its instruction counts."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := _LABEL.match(ln))}
    out = []
    for i, ln in enumerate(lines):
        m = _BRANCH.search(ln)
        if not m or labels.get(m.group(1), i) >= i:
            continue
        ops = collections.Counter(mm.group(1) for x in lines[labels[m.group(1)] : i + 1] if (mm := _OP.search(x)))
        if sum(ops.values()) > 50:
            out.append({"instructions": sum(ops.values()), "ops": dict(ops.most_common())})
    return out


def profile(fn, block_m: int, block_n: int, hd: int, num_warps: int, arch: int, one_pass: bool) -> dict:
    bd = max(16, 1 << (hd - 1).bit_length())
    constants = dict(
        HD=hd, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_L=block_m, BLOCK_D=bd, CAUSAL=False,
        P_QMAX=255.0, O_QMAX=255.0, ONE_PASS=one_pass, SPLIT_CQ=False, FOLD_SM=hd in (16, 64, 256),
    )  # fmt: skip
    sass = compile_sass(fn, constants, num_warps, 1 if one_pass else 2, arch)
    (Path(tempfile.gettempdir()) / f"qattention_{block_m}x{block_n}_w{num_warps}.sass").write_text(sass)
    total = sum(1 for ln in sass.splitlines() if _OP.search(ln))
    per_thread = block_m * block_n / (32 * num_warps)
    ls = loops(sass)
    for lp in ls:
        lp["per_logit"] = round(lp["instructions"] / per_thread, 2)
    return {
        "tile": f"{block_m}x{block_n}", "head_dim": hd, "warps": num_warps, "one_pass": one_pass,
        "kernel_instructions": total, "logits_per_thread": per_thread, "loops": ls,
    }  # fmt: skip


#: The pointer GEMM kernel's arguments that are not int8 pointers or int32 scalars.
_GEMM_TYPES = {
    "wp0": "*i8", "wp1": "*i32", "colsum_ptr": "*i32", "wscale_ptr": "*fp32", "bias_ptr": "*fp32", "res_ptr": "*fp32",
    "oinv_ptr": "*fp32", "ozp_ptr": "*i32", "a_scale": "fp32",
}  # fmt: skip
_GEMM_DIVISIBLE = (
    "a_ptr", "wp0", "wp1", "colsum_ptr", "wscale_ptr", "bias_ptr", "res_ptr", "oinv_ptr", "ozp_ptr", "out_ptr",
    "N", "K", "KW0", "KW1", "stride_am", "stride_rm", "stride_om",
)  # fmt: skip


def gemm_profile(mod, bits: int, block_m: int, block_n: int, swap: bool, packed: bool, arch: int) -> dict:
    """The pointer GEMM's main loop (requantizing epilogue) for ``bits`` in its engine layout: direct int8 for 8,
    interleaved bytes (lane 4 for 3/4-bit, 2 for 2-bit) otherwise; instructions per weight element per thread."""
    lane = {8: 0, 4: 4, 3: 4, 2: 2}[bits]
    consts = dict(
        W0=8, W1=0, OFFSET=0, DIRECT8=bits == 8, NIB=lane, PACKED=packed, SWAP=swap, SUB=64, HAS_BIAS=True,
        HAS_RES=False, ACT=0, OUT_MODE=2, OUT_QMAX=255.0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=8,
    )  # fmt: skip
    warps = 4
    sass = compile_sass(mod._qgemm_kernel, consts, warps, 3, arch, _GEMM_TYPES, _GEMM_DIVISIBLE)
    k_step = 128 if bits == 8 else 64 * (8 // lane)  # K per main-loop iteration
    per_thread = block_n * k_step / (32 * warps)
    ls = loops(sass)
    for lp in ls:
        lp["per_weight"] = round(lp["instructions"] / per_thread, 2)
    return {"bits": bits, "tile": f"{block_m}x{block_n}", "swap": swap, "packed": packed, "loops": ls}


def tma_profile(mod, block_m: int, block_n: int, ws: bool, epilogue: str, arch: int) -> dict:
    """The persistent TMA kernel with direct 8-bit weights (``num_warps`` 4 as the warp-specialized candidates, 8 as
    the plain ones): warps after Triton's partitioning, shared memory, instructions, and the warp-specialization
    markers (``USETMAXREG``: registers moved between partitions)."""
    fn = mod._qgemm_tma_kernel
    warps = 4 if ws else 8
    out_ty = "*fp32" if epilogue == "residual" else "*i8"
    types = {
        "a_desc": f"tensordesc<i8[{block_m}, 128]>", "w_desc0": f"tensordesc<i8[{block_n}, 128]>",
        "w_desc1": f"tensordesc<i8[{block_n}, 128]>", **_GEMM_TYPES, "out_ptr": out_ty, "a_corr": "i32",
    }  # fmt: skip
    consts = dict(
        W0=8, W1=0, OFFSET=0, DIRECT8=True, NIB=0, PACKED=False, SWAP=False, SUB=64, HAS_BIAS=True,
        HAS_RES=epilogue == "residual", ACT=1 if epilogue == "gelu" else 0, OUT_MODE=1 if epilogue == "residual" else 2,
        OUT_QMAX=255.0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, GROUP_M=8,
        **({"FLATTEN": not ws, "WS": ws} if "WS" in fn.arg_names else {}),  # a root from before the withdrawal
    )  # fmt: skip
    divisible = tuple(x for x in _GEMM_DIVISIBLE if x in fn.arg_names)
    sass, meta = compile_sass(fn, consts, warps, 3, arch, types, divisible, with_metadata=True)
    ops = collections.Counter(m.group(1) for ln in sass.splitlines() if (m := _OP.search(ln)))
    return {
        "tile": f"{block_m}x{block_n}", "ws": ws, "epilogue": epilogue, "warps_asked": warps,
        "warps": meta.num_warps, "shared_bytes": meta.shared, "kernel_instructions": sum(ops.values()),
        "setmaxnreg": ops.get("USETMAXREG", 0), "mma": ops.get("IGMMA", 0),
    }  # fmt: skip


def tma_rows(root: Path, arch: int) -> list[dict]:
    mod = load_module(root, "qgemm")
    has_ws = "WS" in mod._qgemm_tma_kernel.arg_names
    rows = []
    for epilogue in ("requant", "gelu", "residual"):
        for bm, bn in ((128, 128), (128, 256)):
            for ws in (False, True) if has_ws else (False,):
                try:
                    rows.append(tma_profile(mod, bm, bn, ws, epilogue, arch))
                except Exception as e:  # noqa: BLE001 - a Triton that cannot build it: recorded, not fatal
                    rows.append({"tile": f"{bm}x{bn}", "ws": ws, "epilogue": epilogue, "error": str(e)[:200]})
    return rows


def attention_rows(root: Path, arch: int) -> list[dict]:
    tiled, short = load_kernel(root)
    return [
        profile(tiled, 64, 32, 64, 4, arch, False),
        profile(tiled, 128, 64, 64, 8, arch, False),
        profile(short, 64, 64, 64, 4, arch, True),  # ViT-B/32's 50 tokens: one tile per (image, head)
    ]


def gemm_rows(root: Path, arch: int) -> list[dict]:
    mod = load_module(root, "qgemm")
    has_packed = "PACKED" in mod._qgemm_kernel.arg_names
    return [
        gemm_profile(mod, bits, 32, 64, swap, packed, arch)
        for bits in (8, 4, 2)
        for swap in (False, True)
        for packed in ((False, True) if bits < 8 and has_packed else (False,))
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--parts", default="attention,gemm,tma")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    doc = {
        "arch": f"sm_{args.arch}",
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "root": str(args.root),
        "command": "python benchmarks/kernel_sass.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if "attention" in args.parts:
        doc["rows"] = attention_rows(args.root, args.arch)
        for r in doc["rows"]:
            per = " + ".join(f"{lp['instructions']} ({lp['per_logit']}/logit)" for lp in r["loops"])
            print(f"attention {r['tile']:>7} hd {r['head_dim']} w{r['warps']} one_pass={r['one_pass']}: "
                  f"{r['kernel_instructions']} instructions; loops {per or '-'}")  # fmt: skip
    if "gemm" in args.parts:
        doc["gemm"] = gemm_rows(args.root, args.arch)
        for r in doc["gemm"]:
            per = " + ".join(f"{lp['instructions']} ({lp['per_weight']}/weight)" for lp in r["loops"])
            print(f"gemm W{r['bits']} {r['tile']} swap={r['swap']} packed={r['packed']}: loop {per}")
    if "tma" in args.parts:
        doc["tma"] = tma_rows(args.root, args.arch)
        for r in doc["tma"]:
            print(f"tma W8 {r['tile']} ws={r['ws']} {r['epilogue']}: " + (
                f"error {r['error']}" if "error" in r else
                f"{r['warps']} warps (asked {r['warps_asked']}), {r['shared_bytes']} B shared, "
                f"{r['kernel_instructions']} instructions, {r['setmaxnreg']} setmaxnreg, {r['mma']} wgmma"
            ))  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
