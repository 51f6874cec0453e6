"""GPU engine: executes a ``.p4q`` artifact with the Triton kernels, one CUDA graph per batch-size bucket.

Per residual block (``full`` scope) the data stays in integer codes between kernels::

    x (fp32 residual) -> LN+quant -> qgemm in_proj (requant to q|k|v codes) -> qattention (requant to out_proj
    input) -> qgemm out_proj (+bias, +residual) -> LN+quant -> qgemm c_fc (+bias, GELU, requant) -> qgemm c_proj
    (+bias, +residual)

Sites the artifact leaves in float (the ``release`` scope's attention) fall back to torch ops on dequantized values.
The same class also runs on the CPU under ``TRITON_INTERPRET=1``, which is how CI checks it against the CPU engine.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from p4q_engine.artifact.format import Artifact, ArtifactError
from p4q_engine.errors import ConfigError
from p4q_engine.kernels.epilogue import LN_MAX_D, ln_tail_enabled
from p4q_engine.kernels.layernorm import RowNorm, layernorm_quant, quantize_rows
from p4q_engine.kernels.qattention import AttnSites, qattention
from p4q_engine.kernels.qgemm import PackedWeight, Requant, qgemm
from p4q_engine.kernels.tuning import batch_invariant
from p4q_engine.runtime.engine import Engine, Site, patchify, unpack_weight

_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu"}


@dataclass
class KLinear:
    """A Linear on the device: packed weight (or float weight), bias, input site."""

    w: Optional[PackedWeight]
    w_float: Optional[torch.Tensor]  # [K, N] where the artifact stores float weights
    bias: Optional[torch.Tensor]
    site: Optional[Site]

    @property
    def quantized(self) -> bool:
        return self.w is not None and self.site is not None


#: Most images per kernel-engine forward (see ``KernelEngine._max_chunk``).
MAX_CHUNK = 1024


def _out_features(lin: KLinear) -> int:
    """Output features of a kernel Linear (bias, float weight, or the packed weight's per-channel scales)."""
    if lin.bias is not None:
        return int(lin.bias.numel())
    if lin.w_float is not None:
        return int(lin.w_float.shape[1])
    return int(lin.w.scale.numel())


def _site_tuple(site: Site) -> tuple[float, int]:
    return float(site.qp.scale), int(site.qp.zero_point)


class KernelEngine(Engine):
    """:class:`Engine` whose image tower runs on the Triton kernels."""

    def _check_device(self) -> None:
        import os

        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda requested but no CUDA GPU is available")
        if self.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ConfigError("the kernel engine on the CPU needs TRITON_INTERPRET=1 (use the CPU Engine instead)")
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.use_graphs = self.device.type == "cuda"
        self._graph_pool: Optional[tuple] = None
        self._replay_lock = threading.Lock()
        self.fuse_ln = ln_tail_enabled()  # read once, at load: a captured graph keeps the choice it was built with

    # ---------------------------------------------------------------- build
    def _linear(self, art: Artifact, prefix: str) -> KLinear:
        d = art.manifest["linears"][prefix]
        site = Site.from_manifest(art.manifest["sites"][d["in_site"]]) if d["in_site"] else None
        bias = art.tensors.get(f"{prefix}.bias") if d["bias"] else None
        bias = bias.to(self.device).contiguous() if bias is not None else None
        if d["weight_bits"] is None:
            return KLinear(None, art.tensors[f"{prefix}.weight"].t().contiguous().to(self.device), bias, site)
        codes, scale = unpack_weight(art, f"{prefix}.w")
        bits = int(d["weight_bits"])
        planes = [
            art.tensors[f"{prefix}.w.p{i}"].to(self.device).contiguous()
            for i in range(len(art.layout(f"{prefix}.w.p0")["planes"]))
        ]
        pw = PackedWeight(
            planes,
            scale.float().to(self.device),
            codes.to(torch.int32).sum(1).to(torch.int32).to(self.device),
            bits,
            codes.shape[0],
            codes.shape[1],
            codes=codes.to(self.device),  # the main loop's layout is built from them (kernels/weight_layout.py)
        )
        return KLinear(pw, None, bias, site)

    def _build_tower(self, art: Artifact) -> None:
        dev = self.device
        self.k_conv = self._linear(art, "visual.conv")
        self.k_proj = self._linear(art, "visual.proj")
        t, sites = art.tensors, art.manifest["sites"]
        self.k_blocks = []
        for i in range(int(self.cfg["layers"])):
            p = f"visual.blocks.{i}"
            blk = {
                "ln_1": (t[f"{p}.ln_1.weight"].to(dev), t[f"{p}.ln_1.bias"].to(dev)),
                "ln_2": (t[f"{p}.ln_2.weight"].to(dev), t[f"{p}.ln_2.bias"].to(dev)),
                "ls_1": t[f"{p}.ls_1"].to(dev) if f"{p}.ls_1" in t else None,
                "ls_2": t[f"{p}.ls_2"].to(dev) if f"{p}.ls_2" in t else None,
                "in_proj": self._linear(art, f"{p}.attn.in_proj"),
                "out_proj": self._linear(art, f"{p}.attn.out_proj"),
                "c_fc": self._linear(art, f"{p}.mlp.c_fc"),
                "c_proj": self._linear(art, f"{p}.mlp.c_proj"),
                "sites": {s: Site.from_manifest(sites[f"{p}.attn.{s}"]) for s in "qkvp"},
            }
            self.k_blocks.append(blk)
        if self.adapter is not None:
            self.k_fc1, self.k_fc2 = self._linear(art, "adapter.fc1"), self._linear(art, "adapter.fc2")
        self.class_embedding = self.class_embedding.to(dev)
        self.pos = self.pos.to(dev)
        self.ln_pre = tuple(v.to(dev) for v in self.ln_pre) if self.ln_pre is not None else None
        self.ln_post = tuple(v.to(dev) for v in self.ln_post)
        if self.cfg["act"] not in _ACT:
            raise ArtifactError(f"the kernel engine has no {self.cfg['act']} epilogue")
        self.max_chunk = self._max_chunk()

    def _max_chunk(self) -> int:
        """Most images per forward: the kernels index with int32 offsets, so the widest activation of a chunk
        (tokens x the widest of 3 x width, the MLP width and the patch vector) stays below 2^31 elements; at most
        1024 (one CUDA graph per power-of-two bucket up to there). Larger batches run in chunks."""
        tokens, width = self.pos.shape
        blk = self.k_blocks[0] if self.k_blocks else None
        mlp = _out_features(blk["c_fc"]) if blk is not None else width
        widest = max(3 * width, mlp, 3 * self.patch[0] * self.patch[1])
        fit = max(1, (2**31 - 1) // (tokens * widest))
        return min(MAX_CHUNK, 1 << (fit.bit_length() - 1))

    # ---------------------------------------------------------------- ops
    def _codes(self, x: torch.Tensor, site: Site, ln=None) -> torch.Tensor:
        s, z = _site_tuple(site)
        bits = site.qp.spec.bits
        if ln is not None:
            return layernorm_quant(x, ln[0], ln[1], self.eps, s, z, bits)
        return quantize_rows(x, s, z, bits)

    def _ln(self, x: torch.Tensor, ln) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], ln[0], ln[1], self.eps)

    def _apply(
        self,
        lin: KLinear,
        x: torch.Tensor,
        ln=None,
        act: str = "none",
        residual=None,
        requant: Optional[Requant] = None,
        codes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """One Linear: fused kernels when both sides are quantized, torch otherwise. ``codes``: the input's codes
        where the previous GEMM's LayerNorm tail already computed them (``ln`` applied to ``x``)."""
        if lin.quantized:
            codes = self._codes(x, lin.site, ln) if codes is None else codes
            s, z = _site_tuple(lin.site)
            return qgemm(
                codes.reshape(-1, codes.shape[-1]), s, z, lin.w, lin.bias, act=act, residual=residual, requant=requant
            )
        xin = self._ln(x, ln) if ln is not None else x
        xin = xin.reshape(-1, xin.shape[-1])
        if lin.site is not None:
            xin = self._fq(xin, lin.site)
        w = lin.w_float if lin.w is None else self._dequant_weight(lin.w)
        y = xin @ w
        if lin.bias is not None:
            y = y + lin.bias
        if act == "gelu":
            y = F.gelu(y)
        elif act == "quick_gelu":
            y = y * torch.sigmoid(1.702 * y)
        if residual is not None:
            y = y + residual
        if requant is not None:
            q = torch.floor(y / requant.scale.to(y.device) + 0.5) + requant.zero_point.to(y.device).float()
            y = (torch.clamp(q, 0, (1 << requant.bits) - 1).to(torch.int32) - 128).to(torch.int8)
        return y

    def _dequant_weight(self, w: PackedWeight) -> torch.Tensor:
        from p4q_engine.artifact.bitpack import unpack_reference

        cache = getattr(w, "_dq", None)
        if cache is None:
            planes = [p.cpu() for p in w.artifact_planes()]
            stored = unpack_reference(planes, w.bits, w.k).to(torch.int32) - (1 << (w.bits - 1))
            cache = (stored.float() * w.scale.cpu()[:, None]).t().contiguous().to(self.device)
            w._dq = cache  # type: ignore[attr-defined]
        return cache

    @staticmethod
    def _requant(*sites: Site, widths: tuple[int, ...]) -> Requant:
        scale = torch.cat([torch.full((n,), float(s.qp.scale)) for s, n in zip(sites, widths)])
        zp = torch.cat([torch.full((n,), int(s.qp.zero_point), dtype=torch.int32) for s, n in zip(sites, widths)])
        return Requant(scale, zp, sites[0].qp.spec.bits)

    def _row_norm(self, blk: Optional[dict], which: str) -> Optional[RowNorm]:
        """What a residual GEMM's LayerNorm tail computes for the next Linear (``which``: ``ln_1`` before in_proj,
        ``ln_2`` before c_fc), or None where nothing is fused (tail off, no next block, a float Linear)."""
        if blk is None or not self.fuse_ln:
            return None
        lin = blk["in_proj"] if which == "ln_1" else blk["c_fc"]
        if not lin.quantized or _out_features(blk["out_proj"]) > LN_MAX_D:
            return None
        key = f"_norm_{which}"
        if key not in blk:  # built on the first (warm-up) call, never inside graph capture
            s, z = _site_tuple(lin.site)
            w, bias = blk[which]
            blk[key] = RowNorm(w.float().contiguous(), bias.float().contiguous(), self.eps, s, z, lin.site.qp.spec.bits)
        return blk[key]

    def _residual_gemm(self, h, lin: KLinear, x, ls, norm: Optional[RowNorm]):
        """``x + ls * lin(h)`` from codes ``h``, and the next Linear's input codes where a LayerNorm tail is fused
        (no layer scale: the tail normalises the rows the GEMM's own residual epilogue wrote)."""
        s, z = _site_tuple(lin.site)
        if ls is not None:
            return x + ls * qgemm(h, s, z, lin.w, lin.bias), None
        if norm is not None:
            return qgemm(h, s, z, lin.w, lin.bias, residual=x, ln=norm)
        return qgemm(h, s, z, lin.w, lin.bias, residual=x), None

    def _attention_block(self, x: torch.Tensor, blk: dict, b: int, n: int, codes=None):
        """``(x, codes of ln_2(x) for c_fc or None)``; ``codes``: ln_1(x)'s, where the previous block fused them."""
        d = x.shape[-1]
        st = blk["sites"]
        inp, outp = blk["in_proj"], blk["out_proj"]
        fused = all(st[s] is not None for s in "qkvp") and inp.quantized and outp.quantized
        if fused:
            if "_rq" not in blk:  # built on the first (warm-up) call, never inside graph capture
                rq = self._requant(st["q"], st["k"], st["v"], widths=(d, d, d))
                blk["_rq"] = Requant(rq.scale.to(x.device), rq.zero_point.to(x.device), rq.bits)
            rq = blk["_rq"]
            qkv = self._apply(inp, x, ln=blk["ln_1"], requant=rq, codes=codes)
            ao = qattention(
                qkv.view(b, n, 3 * d),
                self.heads,
                AttnSites(
                    _site_tuple(st["q"]),
                    _site_tuple(st["k"]),
                    _site_tuple(st["v"]),
                    _site_tuple(st["p"]),
                    _site_tuple(outp.site),
                    st["p"].qp.spec.bits,
                    outp.site.qp.spec.bits,
                ),
            )
            return self._residual_gemm(ao.view(b * n, d), outp, x, blk["ls_1"], self._row_norm(blk, "ln_2"))
        qkv = self._apply(inp, x, ln=blk["ln_1"], codes=codes).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = (qkv[:, :, i].transpose(1, 2).float() for i in range(3))
        q, k, v = (self._fq(t, st[s]) for t, s in ((q, "q"), (k, "k"), (v, "v")))
        probs = self._fq(torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads), dim=-1), st["p"])
        ao = (probs @ v).transpose(1, 2).reshape(b * n, d)
        out = self._apply(outp, ao)
        return x + (out if blk["ls_1"] is None else blk["ls_1"] * out), None

    def _fq(self, t: torch.Tensor, site: Optional[Site]) -> torch.Tensor:
        """Fake-quantize through a site (float fallback paths), with device-resident qparams."""
        if site is None:
            return t
        from p4q_engine.quant.quantizer import dequantize, quantize

        qp = self._device_qp(site)
        return dequantize(quantize(t, qp), qp)

    def _device_qp(self, site: Site):
        cache = self.__dict__.setdefault("_qp_cache", {})
        if id(site) not in cache:
            cache[id(site)] = (site, site.qp.to(self.device))
        return cache[id(site)][1]

    def _mlp_block(self, x: torch.Tensor, blk: dict, codes=None, nxt: Optional[dict] = None):
        """``(x, codes of the next block's ln_1(x) or None)``; ``codes``: ln_2(x)'s, where out_proj fused them."""
        fc, pr = blk["c_fc"], blk["c_proj"]
        act = _ACT[self.cfg["act"]]
        if fc.quantized and pr.quantized:
            s, z = _site_tuple(pr.site)
            if "_rq_mlp" not in blk:
                blk["_rq_mlp"] = Requant(
                    torch.full((fc.w.n,), s, device=x.device),
                    torch.full((fc.w.n,), z, dtype=torch.int32, device=x.device),
                    pr.site.qp.spec.bits,
                )
            rq = blk["_rq_mlp"]
            h = self._apply(fc, x, ln=blk["ln_2"], act=act, requant=rq, codes=codes)
            return self._residual_gemm(h, pr, x, blk["ls_2"], self._row_norm(nxt, "ln_1"))
        h = self._apply(fc, x, ln=blk["ln_2"], act=act, codes=codes)
        out = self._apply(pr, h)
        return x + (out if blk["ls_2"] is None else blk["ls_2"] * out), None

    # ---------------------------------------------------------------- forward
    def _tower(self, pixels: torch.Tensor) -> torch.Tensor:
        b = pixels.shape[0]
        patches = patchify(pixels.float(), self.patch).contiguous()
        n_patch = patches.shape[1]
        x = self._apply(self.k_conv, patches.view(b * n_patch, -1)).view(b, n_patch, -1)
        x = torch.cat([self.class_embedding.expand(b, 1, -1), x], dim=1) + self.pos
        if self.ln_pre is not None:
            x = self._ln(x, self.ln_pre)
        n, d = x.shape[1], x.shape[2]
        x = x.reshape(b * n, d).contiguous()
        codes = None  # the next Linear's input codes, where the previous GEMM's LayerNorm tail computed them
        for i, blk in enumerate(self.k_blocks):
            nxt = self.k_blocks[i + 1] if i + 1 < len(self.k_blocks) else None
            x, codes = self._attention_block(x, blk, b, n, codes)
            x, codes = self._mlp_block(x, blk, codes, nxt)
        x = x.view(b, n, d)
        if self.cfg["final_ln_after_pool"]:
            x = self._ln(self._pool(x), self.ln_post)
        else:
            x = self._pool(self._ln(x, self.ln_post))
        z = self._apply(self.k_proj, x.contiguous())
        if self.adapter is not None:
            zq = self._fq(z, self.adapter_site)
            h = self._apply(self.k_fc2, torch.relu(self._apply(self.k_fc1, z)))
            z = self.alpha * h + (1.0 - self.alpha) * zq
        return z

    @staticmethod
    def bucket(b: int) -> int:
        """Batch sizes are padded to a power of two, one CUDA graph per bucket."""
        return 1 << max(0, (b - 1).bit_length())

    def _on_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """Copied first, checked on the GPU: a CPU ``isfinite`` pass over a batch of 256 images (38.5 M floats) is
        host work the size of the copy itself, against a 6 ms tower on an H200 (not measured separately)."""
        return pixels.to(self.device, non_blocking=True)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, non_blocking=True)
        if pixels.shape[0] > self.max_chunk:
            return torch.cat([self._forward(c) for c in pixels.split(self.max_chunk)])
        if not self.use_graphs:
            return self._tower(pixels)
        b = pixels.shape[0]
        size = self.bucket(b)
        key = (size, batch_invariant())  # a graph replays the tiles picked at capture: one set per mode
        # one graph at a time (they share one memory pool), its output copied out before another replays
        with self._replay_lock:
            if key not in self._graphs:
                self._graphs[key] = self._capture(size)
            graph, static_in, static_out = self._graphs[key]
            static_in[:b].copy_(pixels)
            if b < size:
                static_in[b:].copy_(pixels[:1].expand(size - b, -1, -1, -1))
            graph.replay()
            return static_out[:b].clone()

    @torch.no_grad()
    def precompile(self, sizes: list[int], workers: Optional[int] = None) -> dict:
        """Compile every kernel the forwards of these batch sizes launch, in parallel (``kernels/compile_ahead.py``),
        so that capturing their graphs afterwards compiles nothing. Best effort: a kernel whose tiles are not shipped
        or cached has every candidate compiled (``untuned``: its real forward times them), and a bucket that fails
        is recorded and left to its real forward, which raises where errors are mapped. Returns what was done."""
        from p4q_engine.kernels import compile_ahead

        done: dict = {"workers": 0, "buckets": [], "untuned": {}, "failed": {}}
        if not self.use_graphs:  # the interpreter compiles nothing
            return done
        done["workers"] = workers = compile_ahead.default_workers() if workers is None else workers
        wanted = set()
        for b in (b for b in sizes if b > 0):  # a batch above max_chunk runs as full chunks and a remainder
            wanted.add(self.bucket(min(b, self.max_chunk)))
            if b > self.max_chunk and b % self.max_chunk:
                wanted.add(self.bucket(b % self.max_chunk))
        buckets = sorted(wanted - {k[0] for k in self._graphs if k[1] == batch_invariant()})
        if not buckets:
            return done
        t0 = time.perf_counter()
        try:
            with compile_ahead.compile_ahead(workers) as on:
                if not on:
                    return done
                for size in buckets:
                    seen = len(compile_ahead.untuned())
                    try:
                        self._tower(torch.zeros(size, 3, *self.image_size, device=self.device))
                        done["buckets"].append(size)
                        if len(compile_ahead.untuned()) > seen:  # compiled, candidates included; tuned at capture
                            done["untuned"][size] = ", ".join(compile_ahead.untuned()[seen:])
                    except compile_ahead.NotTuned as e:
                        done["untuned"][size] = str(e)
                    except Exception as e:  # noqa: BLE001 - the real forward raises it again, where it is mapped
                        done["failed"][size] = f"{type(e).__name__}: {e}"[:300]
        except RuntimeError as e:  # e.g. a caller's own AsyncCompileMode already active: nothing compiled ahead
            done["failed"]["all"] = f"{type(e).__name__}: {e}"[:300]
        done["seconds"] = round(time.perf_counter() - t0, 2)
        return done

    def self_test(self) -> None:
        """The base self-test, its batch-1 kernels compiled in parallel first."""
        self.precompile([1])
        super().self_test()

    def _capture(self, size: int):
        static_in = torch.zeros(size, 3, *self.image_size, device=self.device)
        static_in.normal_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: autotuning and compilation happen outside the graph
                self._tower(static_in)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # one memory pool for every bucket's graph: the engine replays one graph at a time and copies its output out
        # before the next replay, so a graph may reuse what another's intermediates occupy (the pattern vLLM relies
        # on; pytorch/pytorch#166975) - the pools cost the largest bucket's activations, not the sum over buckets
        with torch.cuda.graph(graph, pool=self._graph_pool):
            static_out = self._tower(static_in)
        if self._graph_pool is None:
            self._graph_pool = graph.pool()
        return graph, static_in, static_out
