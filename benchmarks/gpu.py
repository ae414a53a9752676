"""GPU benchmark of the Triton lowering: ceilings, the Llama-8B layer shapes, and decode steps of a Llama-shaped model.

    python benchmarks/gpu.py                                  # everything, one command, about 5 minutes
    python benchmarks/gpu.py --json out/gpu.json --budget 240 --recipes int4_awq,fp8_dynamic
    python benchmarks/gpu.py --dry-run                        # the whole logic on the CPU: tiny shapes, fake times

Without a CUDA device (or without Triton) it prints why and exits with status 0, having run nothing (`--dry-run`
runs anyway). `benchmarks/gpu_check.sh` runs it after the CUDA tests, in one call of at most 8 minutes.

1. Ceilings, measured in the same run: device-to-device copy bandwidth (bytes read + written per second) and bf16
   `torch.matmul` throughput at 8192^3.
2. Layers: the four Llama-8B linear shapes (q/o 4096x4096, k/v 1024x4096 with GQA, gate/up 14336x4096, down
   4096x14336) at M = 1 and 16 (decode GEMVs) and M = 2048 (prefill), for each weight format through the op's CUDA
   implementation (`dispatch`, activation quantization included): INT4 g128 (int4_awq's layers), NVFP4
   weight-only, FP8 with dynamic per-token activations (fp8_dynamic), INT8 likewise (int8_dynamic). Device time per
   call is replayed from one CUDA graph over enough weight copies to defeat L2 (no host overhead, weights streamed
   from memory), and reported as achieved GB/s, fraction of copy bandwidth and ratio to bf16 cuBLAS on the same
   shape. Anchors in the same run, where they apply: `torch._scaled_mm` (FP8, activations already quantized) and
   `torch._weight_int4pack_mm` (tinygemm, INT4 bf16).
3. Host time per quantized-linear call, at M = 1 on the 4096x4096 layer: a loop of calls timed on the host
   without synchronising (the GPU runs behind), through the public op under no_grad and through its
   autograd-free twin (what inference graphs call).
4. Decode steps of a Llama-shaped decoder (hidden 4096, 32 query and 8 KV heads, MLP 14336, random bf16 weights;
   --layers of them): one token after a --past-len KV cache, for bf16 and each recipe. With CUDA graphs:
   `torch.compile(model, mode="reduce-overhead")` for bf16, `torch.compile(model, backend="quant",
   options={"recipe": r, "mode": "reduce-overhead"})` for a recipe (the goals are judged on these). Eager, launched
   op by op from Python (host-bound at batch 1): the bf16 model itself, and the quantized graph with
   `compiler="eager"`; "host us/lin" is the eager step's time beyond bf16's per quantized linear. "logits cos" is
   the cosine similarity of the recipe's decode logits with the bf16 model's.

One summary table compares the measurements with the goals of issue 26 (`GOALS`); everything goes to JSON (default
out/gpu_benchmark.json) with the device, versions and the tuned configurations. A time budget (default 300 s) keeps
the run short: sections and recipes that would start too late are skipped and listed as such.

`--dry-run` runs the same code on the CPU with shapes divided by 64, one model layer, and a fake clock (timings
are placeholders, not measurements), so that the logic and the table are checked without a GPU
(tests/test_triton_gpu_benchmark.py).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

DEFAULT_RECIPES = ("nvfp4_weight_only", "int4_awq", "fp8_dynamic", "int8_dynamic")
# (name, N, K) of the Llama-8B linears; the M = 2048 prefill GEMM runs on each as well.
LLAMA8B_SHAPES = (("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336))
FORMATS = ("int4", "nvfp4", "fp8", "int8")
# The goals of issue 26: (goal name, minimum). GEMV goals are judged at M = 1 on the large (MLP) layers, the prefill
# goal at M = 2048 on every layer (the worst counts), decode goals on CUDA-graph steps, host on the eager step.
GOALS = {
    "int4 GEMV M=1, fraction of copy BW": 0.60,
    "int4 GEMV M=1, x bf16": 2.0,
    "nvfp4 GEMV M=1, fraction of copy BW": 0.50,
    "W4 prefill M=2048, x bf16": 0.9,
    "decode int4_awq, x bf16": 1.6,
    "decode nvfp4_weight_only, x bf16": 1.6,
    "decode fp8_dynamic, x bf16": 1.2,
    "decode int8_dynamic, x bf16": 1.2,
    "host us per quantized linear": 20.0,  # at most
}
AT_MOST = {"host us per quantized linear"}


# ------------------------------------------------------------------------------------------- the model


class LlamaConfig:
    def __init__(self, hidden=4096, layers=8, heads=32, kv_heads=8, intermediate=14336, vocab=32000,
                 max_positions=4096):
        self.hidden, self.layers, self.heads, self.kv_heads = hidden, layers, heads, kv_heads
        self.intermediate, self.vocab, self.max_positions = intermediate, vocab, max_positions
        self.head_dim = hidden // heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden, c.heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)

    def forward(self, x, cos, sin, past_k=None, past_v=None, collect=None):
        b, t, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(b, t, c.heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.kv_heads, c.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if collect is not None:
            collect.append((k, v))
        causal = past_k is None
        if past_k is not None:
            k = torch.cat((past_k, k), dim=2)
            v = torch.cat((past_v, v), dim=2)
        rep = c.heads // c.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c.heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.up_proj = nn.Linear(c.hidden, c.intermediate, bias=False)
        self.down_proj = nn.Linear(c.intermediate, c.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden)
        self.mlp = MLP(c)

    def forward(self, h, cos, sin, past_k=None, past_v=None, collect=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, past_k, past_v, collect)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaLike(nn.Module):
    """A Llama-shaped decoder with random weights. `forward(ids)` is a prefill (causal attention over `ids`);
    `forward(ids, past_k, past_v)` one decode step after a KV cache `[layers, batch, kv_heads, past, head_dim]`
    (the cache is read, not updated: the step's latency is what is measured)."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden)
        self.lm_head = nn.Linear(c.hidden, c.vocab, bias=False)
        inv = 1.0 / (10000.0 ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        freqs = torch.outer(torch.arange(c.max_positions, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, ids, past_k=None, past_v=None, collect=None):
        start = 0 if past_k is None else past_k.shape[3]
        t = ids.shape[1]
        cos = self.cos[start:start + t].to(self.lm_head.weight.dtype)
        sin = self.sin[start:start + t].to(self.lm_head.weight.dtype)
        h = self.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            if past_k is None:
                h = layer(h, cos, sin, collect=collect)
            else:
                h = layer(h, cos, sin, past_k[i], past_v[i])
        return self.lm_head(self.norm(h))

    def kv_cache(self, ids):
        """The keys and values a prefill of `ids` leaves, stacked as `[layers, batch, kv_heads, len, head_dim]`."""
        collect = []
        self(ids, collect=collect)
        return torch.stack([k for k, _ in collect]), torch.stack([v for _, v in collect])


def build_model(c: LlamaConfig, device, dtype) -> LlamaLike:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaLike(c)
    for p in model.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02)
    return model.to(dtype).eval()


def model_inputs(c: LlamaConfig, device, prefill_len: int, past_len: int, dtype):
    g = torch.Generator(device="cpu").manual_seed(1)
    prefill = torch.randint(0, c.vocab, (1, prefill_len), generator=g).to(device)
    step = torch.randint(0, c.vocab, (1, 1), generator=g).to(device)
    shape = (c.layers, 1, c.kv_heads, past_len, c.head_dim)
    past_k = (torch.randn(shape, generator=g) * 0.5).to(device, dtype)
    past_v = (torch.randn(shape, generator=g) * 0.5).to(device, dtype)
    return prefill, step, past_k, past_v


# ------------------------------------------------------------------------------------------------- timing


class Clock:
    """How the benchmark times things: on a GPU the real measurements; in a dry run (`fake=True`) each function
    runs once and a placeholder time comes back, so that the whole logic runs on the CPU."""

    def __init__(self, fake: bool = False):
        self.fake = fake

    def bench(self, fn) -> float:
        """Median milliseconds of fn() (triton.testing.do_bench: L2 flushed between calls)."""
        if self.fake:
            fn()
            return 1.0
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))

    def graph_ms(self, calls, iters: int = 20) -> float:
        """Median device milliseconds per call of `calls` (functions on different weight copies), replayed from
        one CUDA graph: no host launch overhead, and weights that do not stay in L2 between calls of one copy."""
        for fn in calls:  # warm-up: tuning and compilation happen outside the graph
            fn()
        if self.fake:
            return 0.5
        torch.cuda.synchronize()
        graph = _capture(lambda: [fn() for fn in calls])
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / len(calls))
        return _median(times)

    def latency_ms(self, fn, iters: int) -> float:
        """Median wall-clock milliseconds of a synchronised call (what a caller waits, launch overhead included)."""
        fn()
        if self.fake:
            return 2.0
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return _median(times)

    def host_us(self, fn, calls: int) -> float:
        """Host microseconds per call of `fn`, unsynchronised (the GPU queue absorbs the launches)."""
        for _ in range(3):
            fn()
        self.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = (time.perf_counter() - t0) / calls * 1e6
        self.synchronize()
        return 10.0 if self.fake else elapsed

    def synchronize(self) -> None:
        if not self.fake:
            torch.cuda.synchronize()


def _median(values) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def _capture(fn) -> "torch.cuda.CUDAGraph":
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class Budget:
    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


# --------------------------------------------------------------------------------------------- sections


def ceilings(device, clock: Clock, size: int) -> dict:
    src = torch.empty(size, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = clock.bench(lambda: dst.copy_(src))
    del src, dst
    s = 8192 if device.type == "cuda" else 64
    a = torch.randn(s, s, device=device, dtype=torch.bfloat16)
    b = torch.randn(s, s, device=device, dtype=torch.bfloat16)
    mm_ms = clock.bench(lambda: a @ b)
    return {"copy_gbps": 2 * size * 4 / copy_ms / 1e6, "bf16_matmul_tflops": 2 * s**3 / mm_ms / 1e9}


def _copies(nbytes: int, l2_bytes: int) -> int:
    """How many weight copies a graph cycles through so that together they are 3x the L2 cache."""
    return max(1, min(64, math.ceil(3 * l2_bytes / max(nbytes, 1))))


def _layer(fmt: str, w: torch.Tensor) -> tuple[str, tuple, int]:
    """(op name, the op's weight and activation arguments after x, weight bytes) as the format's preset stores
    the layer."""
    from qcompile import numerics

    k = w.shape[1]
    if fmt == "int4":
        t = numerics.quantize_int4(w, 128)
        return "int4_linear", (t.packed, t.scale, t.zero_point, 128, 4, k, None, None, "none", "tensor"), \
            t.packed.numel() + t.scale.numel() * 4
    if fmt == "nvfp4":
        t = numerics.quantize_nvfp4(w)
        return "nvfp4_linear", (t.packed, t.block_scale, t.global_scale, k, None, None, "none", "tensor"), \
            t.packed.numel() + t.block_scale.numel() + 4
    if fmt == "fp8":
        t = numerics.quantize_fp8(w, "channel")
        return "fp8_linear", (t.q, t.scale, 0, None, None, "fp8_e4m3", "token"), t.q.numel() + t.scale.numel() * 4
    t = numerics.quantize_int8(w, "channel")
    return "int8_linear", (t.q, t.scale, None, None, "int8", "token"), t.q.numel() + t.scale.numel() * 4


def _clone_args(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _anchor(fmt: str, x: torch.Tensor, args: tuple):
    """(name, make) where `make(layer arguments)` is a call of PyTorch's own kernel for the format's product, where
    it applies here; else None."""
    try:
        if fmt == "fp8" and x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9):
            from qcompile.lowering.triton import launch

            a, sa = launch.quantize_rows(x, "fp8_e4m3")  # activations quantized beforehand

            def make(layer):
                return functools.partial(launch.scaled_mm_fp8, a, sa, layer[0], layer[1], None, x.dtype)

            make(args)()  # raises where cuBLASLt lacks row-wise scaling
            return "torch._scaled_mm", make
        if fmt == "int4" and x.is_cuda and x.dtype == torch.bfloat16:
            from qcompile.lowering.triton import dequant

            def make(layer):  # repacks each weight once, on its first call
                return functools.partial(dequant.tinygemm_mm, x, *layer[:3], 128, None, x.dtype)

            make(args)()
            return "torch._weight_int4pack_mm", make
    except Exception:  # an anchor that does not run here is left out
        return None
    return None


def layer_benchmarks(device, clock: Clock, copy_gbps: float, budget: Budget, skipped: list, shapes,
                     ms_list, prefill_m: int, formats=FORMATS) -> list[dict]:
    """Every format on every Llama-8B shape at each M, through the op's CUDA implementation, against bf16."""
    from qcompile.lowering.triton import dispatch

    bf16 = torch.bfloat16
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0  # dry: one copy
    rows = []
    for name, n, k in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, device=device, dtype=bf16) * 0.02
        layers = {fmt: _layer(fmt, w) for fmt in formats}
        for m in (*ms_list, *([prefill_m] if prefill_m else [])):
            if budget.elapsed() > 0.55 * budget.seconds:  # the rest is the decode section's
                skipped.append(f"layers {name} M={m} (time budget)")
                continue
            x = torch.randn(m, k, device=device, dtype=bf16)
            io = m * k * 2 + m * n * 2
            copies = [w] + [w.clone() for _ in range(_copies(w.numel() * 2, l2) - 1)]
            base = clock.graph_ms([functools.partial(torch.matmul, x, c.t()) for c in copies])
            del copies
            rows.append(_layer_row(name, "bf16 cuBLAS", m, n, k, base, n * k * 2 + io, copy_gbps, base))
            for fmt, (op, args, wbytes) in layers.items():
                fn = getattr(dispatch, op)
                copies = [args] + [_clone_args(args) for _ in range(_copies(wbytes, l2) - 1)]
                try:
                    ms = clock.graph_ms([functools.partial(fn, x, *a) for a in copies])
                    rows.append(_layer_row(name, fmt, m, n, k, ms, wbytes + io, copy_gbps, base,
                                           path=dispatch.plan(op, x, *args)))
                    anchor = _anchor(fmt, x, args)
                    if anchor is not None:
                        ms = clock.graph_ms([anchor[1](a) for a in copies])
                        rows.append(_layer_row(name, anchor[0], m, n, k, ms, wbytes + io, copy_gbps, base))
                except Exception as error:  # keep the other rows
                    rows.append({"layer": name, "format": fmt, "shape": f"{m}x{n}x{k}",
                                 "note": f"failed: {type(error).__name__}: {error}"[:200]})
                del copies
            print(f"  {name} M={m}: " + ", ".join(
                f"{r['format']} {r['ms']:.4f} ms" for r in rows if r.get("layer") == name and r.get("m") == m
                and "ms" in r), flush=True)
        del w, layers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _layer_row(layer, fmt, m, n, k, ms, nbytes, copy_gbps, base_ms, **extra) -> dict:
    gbps = nbytes / ms / 1e6
    return {"layer": layer, "format": fmt, "m": m, "shape": f"{m}x{n}x{k}", "ms": ms, "gbps": gbps,
            "copy_fraction": gbps / copy_gbps, "tflops": 2 * m * n * k / ms / 1e9, "vs_bf16": base_ms / ms, **extra}


def host_overhead(device, clock: Clock, n: int, k: int, calls: int, formats=FORMATS) -> list[dict]:
    """Host microseconds per call at M = 1: the public op under no_grad, and its autograd-free twin."""
    from qcompile.lowering import triton as triton_lowering

    twins = triton_lowering.kernel_call_ops()
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    rows = []
    with torch.no_grad():
        for fmt in formats:
            op_name, args, _ = _layer(fmt, w)
            public = getattr(torch.ops.qcompile, op_name).default
            row = {"format": fmt, "public_us": clock.host_us(lambda: public(x, *args), calls)}
            if public in twins:
                twin = twins[public]
                row["twin_us"] = clock.host_us(lambda: twin(x, *args), calls)
            rows.append(row)
            print(f"  {fmt}: public op {row['public_us']:.1f} us, twin {_fmt(row.get('twin_us'), '.1f')} us per "
                  "call", flush=True)
    return rows


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def _release(device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _decode(compile_fn, inputs, reference_logits, clock: Clock, iters: int) -> dict:
    """Eager-launch and CUDA-graph latency of one decode step, and its logits' cosine with the reference.

    `compile_fn(graphs)`: the step function launched op by op from Python (graphs False) or compiled with CUDA
    graphs (True)."""
    _, step, past_k, past_v = inputs
    eager = compile_fn(False)
    eager_ms = clock.latency_ms(lambda: eager(step, past_k, past_v), iters)
    torch._dynamo.reset()
    graphed = compile_fn(True)
    graph_ms = clock.latency_ms(lambda: graphed(step, past_k, past_v), iters)
    cos = _cosine(graphed(step, past_k, past_v).clone(), reference_logits)
    return {"eager_ms": eager_ms, "graph_ms": graph_ms, "logits_cos": cos}


def decode_benchmarks(device, clock: Clock, c, recipes, args, budget: Budget, skipped: list) -> list[dict]:
    import qcompile

    dtype = torch.bfloat16
    model = build_model(c, device, dtype)
    inputs = model_inputs(c, device, args.prefill_len, args.past_len, dtype)
    prefill = inputs[0]
    quantized_linears = 7 * c.layers  # q, k, v, o, gate, up, down per layer (lm_head stays bf16: DEFAULT_EXCLUDE)
    rows = []
    with torch.no_grad():
        reference_logits = model(*inputs[1:])
        t0 = time.monotonic()
        # eager: PyTorch's own ops launched from Python; graphs: inductor with CUDA graphs (a dry run leaves inductor
        # out: its CPU compilations would take minutes)
        def bf16_fn(graphs):
            if not graphs:
                return model
            if clock.fake:
                return torch.compile(model, dynamic=False, backend="eager")
            return torch.compile(model, dynamic=False, mode="reduce-overhead")

        base = _decode(bf16_fn, inputs, reference_logits, clock, args.iters)
        base.update(name="bf16", compile_s=time.monotonic() - t0)
        rows.append(base)
        print(f"  bf16: eager {base['eager_ms']:.3f} ms, CUDA graph {base['graph_ms']:.3f} ms", flush=True)
        _release(device)
        for recipe in recipes:
            if budget.left() < args.recipe_seconds:
                skipped.append(f"decode {recipe} (time budget)")
                rows.append({"name": recipe, "note": "skipped: time budget"})
                continue
            t0 = time.monotonic()
            try:
                r = qcompile.RECIPES[recipe]

                def compile_fn(graphs, recipe=recipe, r=r):
                    # eager: the quantized graph run op by op from Python (compiler "eager"), as bf16's eager step
                    if graphs and not clock.fake:
                        options = {"recipe": recipe, "mode": "reduce-overhead"}
                    else:
                        options = {"recipe": recipe, "compiler": "eager"}
                    compiled = torch.compile(model, backend="quant", options=options, dynamic=False)
                    if r.static_inputs or r.algorithm != "max":  # static scales, AWQ/GPTQ/SmoothQuant statistics
                        with qcompile.calibrate(compiled):
                            compiled(prefill)
                            compiled(prefill.roll(1, dims=1))
                    return compiled

                row = _decode(compile_fn, inputs, reference_logits, clock, args.iters)
                row.update(name=recipe, compile_s=time.monotonic() - t0,
                           eager_speedup=base["eager_ms"] / row["eager_ms"],
                           graph_speedup=base["graph_ms"] / row["graph_ms"])
                # what the eager step spends beyond bf16's eager step, per quantized linear: host time, when both
                # steps are host-bound (the GPU's share is the graph time, far below)
                row["host_us_per_linear"] = max(0.0, row["eager_ms"] - base["eager_ms"]) * 1e3 / quantized_linears
                rows.append(row)
                print(f"  {recipe}: eager {row['eager_ms']:.3f} ms ({row['eager_speedup']:.2f}x), CUDA graph "
                      f"{row['graph_ms']:.3f} ms ({row['graph_speedup']:.2f}x), logits cos {row['logits_cos']:.4f}",
                      flush=True)
            except Exception as error:  # keep the other recipes' numbers
                rows.append({"name": recipe, "note": f"failed: {type(error).__name__}: {error}"[:300]})
                print(f"  {recipe}: FAILED {type(error).__name__}: {error}", flush=True)
            finally:
                _release(device)
    return rows


# --------------------------------------------------------------------------------------------- reporting


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def evaluate_goals(result: dict) -> dict:
    """Each goal of issue 26 with the measured value and whether it is met (None where it was not measured)."""
    layers = [r for r in result.get("layers", []) if "ms" in r]
    decode = {r["name"]: r for r in result.get("decode", [])}
    out = {}

    def put(name, value, where=""):
        met = None if value is None else (value <= GOALS[name] if name in AT_MOST else value >= GOALS[name])
        out[name] = {"goal": GOALS[name], "measured": value, "met": met, "where": where}

    def worst(fmt, m, key, large_only):
        rows = [r for r in layers if r["format"] == fmt and r["m"] == m
                and (not large_only or r["layer"] in ("gate/up", "down"))]
        if not rows:
            return None, ""
        row = min(rows, key=lambda r: r[key])
        return row[key], f"{row['layer']} {row['shape']}"

    put("int4 GEMV M=1, fraction of copy BW", *worst("int4", 1, "copy_fraction", True))
    put("int4 GEMV M=1, x bf16", *worst("int4", 1, "vs_bf16", True))
    put("nvfp4 GEMV M=1, fraction of copy BW", *worst("nvfp4", 1, "copy_fraction", True))
    prefill_m = max((r["m"] for r in layers if r["m"] > 16), default=None)  # decode rows are M <= 16
    w4 = [worst(fmt, prefill_m, "vs_bf16", False) for fmt in ("int4", "nvfp4")]
    w4 = [v for v in w4 if v[0] is not None]
    put("W4 prefill M=2048, x bf16", *(min(w4) if w4 else (None, "")))
    for recipe in ("int4_awq", "nvfp4_weight_only", "fp8_dynamic", "int8_dynamic"):
        row = decode.get(recipe, {})
        put(f"decode {recipe}, x bf16", row.get("graph_speedup"), "CUDA graph" if "graph_speedup" in row else "")
    # judged on the call inference graphs make (the twin), the slowest format
    hosts = [(r.get("twin_us", r["public_us"]), f"{'twin' if 'twin_us' in r else 'public op'} call, {r['format']}")
             for r in result.get("host", [])]
    put("host us per quantized linear", *(max(hosts) if hosts else (None, "")))
    return out


def format_summary(result: dict) -> str:
    """The one table of a run: every goal of issue 26, the measured value and where, and the CUDA tests."""
    goals = result["goals"]
    head = f"{'goal':<40}{'target':>10}{'measured':>11}  {'status':<13}where"
    lines = [head, "-" * (len(head) + 20)]
    for name, g in goals.items():
        status = "not measured" if g["met"] is None else ("met" if g["met"] else "MISSED")
        sign = "<=" if name in AT_MOST else ">="
        lines.append(f"{name:<40}{sign + ' ' + format(g['goal'], 'g'):>10}{_fmt(g['measured'], '.3g'):>11}  "
                     f"{status:<13}{g['where']}")
    tests = result.get("cuda_tests")
    if tests:
        lines.append(f"{'CUDA correctness tests':<40}{'all pass':>10}{'':>11}  {tests}")
    return "\n".join(lines)


def format_layer_table(rows: list[dict]) -> str:
    head = f"{'layer':<9}{'format':<27}{'shape MxNxK':>18}{'ms':>9}{'GB/s':>7}{'%copy':>7}{'x bf16':>8}  path"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['layer']:<9}{r['format']:<27}{r.get('shape', ''):>18}{_fmt(r.get('ms'), '.4f'):>9}"
                     f"{_fmt(r.get('gbps'), '.0f'):>7}{_fmt(r.get('copy_fraction'), '.0%'):>7}"
                     f"{_fmt(r.get('vs_bf16'), '.2f'):>8}  {r.get('path', r.get('note', ''))[:70]}")
    return "\n".join(lines)


def format_decode_table(rows: list[dict]) -> str:
    head = f"{'model':<20}{'eager ms':>10}{'x bf16':>8}{'graph ms':>10}{'x bf16':>8}{'host us/lin':>12}" \
           f"{'logits cos':>11}{'compile s':>10}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['name']:<20}{_fmt(r.get('eager_ms'), '.3f'):>10}{_fmt(r.get('eager_speedup'), '.2f'):>8}"
                     f"{_fmt(r.get('graph_ms'), '.3f'):>10}{_fmt(r.get('graph_speedup'), '.2f'):>8}"
                     f"{_fmt(r.get('host_us_per_linear'), '.1f'):>12}{_fmt(r.get('logits_cos'), '.4f'):>11}"
                     f"{_fmt(r.get('compile_s'), '.0f'):>10}  {r.get('note', '')}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    from qcompile.recipes import RECIPES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="out/gpu_benchmark.json", help="where to write the results")
    p.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                   help=f"comma-separated recipes for the decode section (from: {', '.join(RECIPES)})")
    p.add_argument("--budget", type=float, default=300.0, help="seconds after which nothing new starts")
    p.add_argument("--recipe-seconds", type=float, default=45.0,
                   help="time a recipe needs at least; recipes that would start later are skipped")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the decode-step model")
    p.add_argument("--prefill-len", type=int, default=256, help="calibration batch length of static recipes")
    p.add_argument("--past-len", type=int, default=1024)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--host-calls", type=int, default=200)
    p.add_argument("--tests", default=None, help="the CUDA tests' pytest summary line, shown in the table")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="only the M = 1 weight-only GEMVs (INT4, NVFP4) on the MLP layers, and the host time")
    p.add_argument("--dry-run", action="store_true",
                   help="run the logic on the CPU: shapes / 64, one layer, placeholder times (no GPU needed)")
    args = p.parse_args(argv)
    args.recipe_list = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in args.recipe_list if r not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; valid: {', '.join(RECIPES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
              "nothing was run.")
        return 0
    try:
        import triton
    except ImportError:
        print("benchmarks/gpu.py needs Triton (pip install 'qcompile[triton]'); nothing was run.")
        return 0
    from qcompile.lowering import ensure_registered
    from qcompile.lowering import triton as triton_lowering

    ensure_registered()  # every lowering, the CUDA kernels and their twins included (idempotent)
    clock = Clock(fake=dry)
    device = torch.device("cpu" if dry else "cuda")
    budget = Budget(args.budget)
    skipped: list[str] = []
    if dry:
        name, capability, memory = "dry run on the CPU (placeholder times)", [0, 0], 0.0
        shapes = tuple((n_, n // 64, k // 64) for n_, n, k in LLAMA8B_SHAPES)
        config = LlamaConfig(hidden=64, layers=1, heads=4, kv_heads=1, intermediate=224, vocab=128, max_positions=64)
        args.past_len, args.prefill_len, args.iters, args.host_calls = 8, 16, 2, 5
        prefill_m, copy_size = 32, 1 << 12
    else:
        props = torch.cuda.get_device_properties(device)
        name, capability, memory = props.name, list(torch.cuda.get_device_capability(device)), props.total_memory
        shapes = LLAMA8B_SHAPES
        config = LlamaConfig(layers=args.layers)
        prefill_m, copy_size = 2048, 1 << 28
    result = {"device": name, "capability": capability, "memory_gib": round(memory / 2**30, 1),
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "dry_run": dry, "nvfp4_activations": triton_lowering.NVFP4_ACTIVATIONS, "cuda_tests": args.tests}
    print(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)

    print("\n== ceilings", flush=True)
    result["ceilings"] = cl = ceilings(device, clock, copy_size)
    print(f"  copy bandwidth {cl['copy_gbps']:.0f} GB/s, bf16 matmul {cl['bf16_matmul_tflops']:.0f} TFLOP/s",
          flush=True)
    formats = [f for f in FORMATS if f != "fp8" or dry or torch.cuda.get_device_capability(device) >= (8, 9)]
    host_shape, ms_list, layer_formats = shapes[0], (1, 16), formats
    if args.quick:
        shapes, ms_list, prefill_m, layer_formats = shapes[2:], (1,), None, ["int4", "nvfp4"]
        args.skip_decode = True
    if not args.skip_layers:
        print("\n== Llama-8B layers (device time per call from CUDA-graph replays)", flush=True)
        result["layers"] = layer_benchmarks(device, clock, cl["copy_gbps"], budget, skipped, shapes, ms_list,
                                            prefill_m, layer_formats)
    print("\n== host time per quantized-linear call (M = 1)", flush=True)
    result["host"] = host_overhead(device, clock, host_shape[1], host_shape[2], args.host_calls, formats)
    if not args.skip_decode:
        print(f"\n== decode step: Llama-shaped, {config.layers} layers, after {args.past_len} tokens", flush=True)
        result["decode"] = decode_benchmarks(device, clock, config, args.recipe_list, args, budget, skipped)

    result["goals"] = evaluate_goals(result)
    result["skipped"] = skipped
    result["elapsed_s"] = budget.elapsed()
    from qcompile.lowering.triton import dispatch, launch

    result["tuned_configs"] = {str(k): str(v) for k, v in launch.tuned_configs().items()}
    result["fp8_gemm_backend"] = {str(k): v for k, v in dispatch.fp8_choices().items()}

    print("\n" + "=" * 100)
    print(f"{name}: copy {cl['copy_gbps']:.0f} GB/s, bf16 matmul {cl['bf16_matmul_tflops']:.0f} TFLOP/s\n")
    if result.get("layers"):
        print(format_layer_table(result["layers"]) + "\n")
    if result.get("decode"):
        print(format_decode_table(result["decode"]) + "\n")
    print("summary (goals of issue 26):\n" + format_summary(result))
    if skipped:
        print("skipped: " + "; ".join(skipped))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {path} ({budget.elapsed():.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
