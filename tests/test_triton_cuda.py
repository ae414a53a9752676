"""Every CUDA kernel path against a float64 product computed on the CPU, on awkward shapes; skipped without CUDA.

Each call runs after the caching allocator's free memory was filled with NaN (an output element a kernel fails to
write shows), three times (split-K partial sums race on atomics: every run must be right, not merely the same),
through the public op and its autograd-free twin; and one call per path is replayed from a CUDA graph with new
activations copied into the captured input. The reference is the weight dequantized by `qcompile.numerics` and the
activation quantized as `torch_reference.quantize_input` defines it, multiplied in float64 on the CPU; the
tolerance is one output rounding plus float32 summation over K (and half an ulp of the activation dtype on the
weight where the path dequantizes it into that dtype first).
"""

from __future__ import annotations

import pytest
import torch

from qcompile import numerics
from qcompile.lowering import torch_reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

_EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}  # half an ulp

# (op, weights, input format, granularity, static scale, compute capability)
CASES = [
    ("int8_linear", "int8", "none", "tensor", None, (8, 0)),
    ("int8_linear", "int8", "int8", "token", None, (8, 0)),
    ("int8_linear", "int8", "int8", "tensor", 0.03, (8, 0)),
    ("fp8_linear", "fp8_channel", "none", "tensor", None, (8, 9)),
    ("fp8_linear", "fp8_channel", "fp8_e4m3", "token", None, (8, 9)),
    ("fp8_linear", "fp8_tensor", "fp8_e4m3", "tensor", 0.01, (8, 9)),
    ("fp8_linear", "fp8_block", "none", "tensor", None, (8, 9)),
    ("int4_linear", "int4_g128", "none", "tensor", None, (8, 0)),
    ("int4_linear", "int4_asym_g32", "none", "tensor", None, (8, 0)),
    ("int4_linear", "int4_g128", "int8", "token", None, (8, 0)),
    ("int4_linear", "int4_g128", "fp8_e4m3", "tensor", 0.01, (8, 9)),
    ("nvfp4_linear", "nvfp4", "none", "block", None, (8, 0)),
    ("nvfp4_linear", "nvfp4", "nvfp4", "block", 0.002, (8, 0)),
]
# (M, N, K): one row, rows that fill no tile, a prefill; N and K off every power of two
SHAPES = [(1, 1000, 1056), (5, 72, 4160), (17, 1030, 288), (300, 200, 520)]


def _weights(kind: str, w: torch.Tensor):
    """(the op's weight arguments, the dequantized weight [N, K] in float32)."""
    k = w.shape[1]
    if kind == "int8":
        t = numerics.quantize_int8(w, "channel")
        return (t.q, t.scale), numerics.dequantize_int8(t)
    if kind.startswith("fp8"):
        granularity = kind.split("_")[1]
        t = numerics.quantize_fp8(w, granularity, block_size=128)
        return (t.q, t.scale, 128 if granularity == "block" else 0), numerics.dequantize_fp8(t)
    if kind.startswith("int4"):
        group = int(kind.rsplit("_g", 1)[1])
        t = numerics.quantize_int4(w, group, symmetric="asym" not in kind)
        return (t.packed, t.scale, t.zero_point, group, 4, k), numerics.dequantize_int4(t)
    t = numerics.quantize_nvfp4(w)
    return (t.packed, t.block_scale, t.global_scale, k), numerics.dequantize_nvfp4(t)


def _poison() -> None:
    """Fill the allocator's free blocks with NaN: small blocks (< 1 MiB) come from 2 MiB segments, large ones apart."""
    held = [torch.full((1 << 16,), float("nan"), device="cuda") for _ in range(64)]  # 256 KiB each
    held.append(torch.full((1 << 24,), float("nan"), device="cuda"))  # 64 MiB
    del held


def _check(out: torch.Tensor, x: torch.Tensor, w_deq: torch.Tensor, bias, fmt, granularity, scale, rounding):
    a = ref.quantize_input(x.cpu(), fmt, granularity, None if scale is None else scale.cpu()).double()
    w = w_deq.cpu().double()
    b = bias.cpu().double()
    expected = (a.reshape(-1, a.shape[-1]) @ w.T + b).reshape(*x.shape[:-1], -1)
    bound = (a.abs().reshape(-1, a.shape[-1]) @ w.abs().T).reshape(expected.shape) + b.abs()
    o = out.cpu().double()
    assert out.shape == expected.shape and out.dtype == x.dtype
    assert not o.isnan().any(), "NaN in the output: an element was not written"
    eps = _EPS[x.dtype]
    tol = 2.02 * eps * expected.abs() + (4 * x.shape[-1] * 2.0**-24 + rounding) * bound + 1e-30
    excess = ((o - expected).abs() - tol).max().item()
    assert excess <= 0, f"max |out - ref| beyond tolerance by {excess:.3g} (max |ref| {expected.abs().max():.3g})"


@pytest.fixture(scope="module")
def ops():
    from qcompile.lowering import triton as triton_lowering

    if not triton_lowering.register():
        pytest.skip("Triton is not installed")
    return triton_lowering.kernel_call_ops()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_awkward_shapes(ops, case, dtype):
    op_name, kind, fmt, granularity, static, need = case
    if torch.cuda.get_device_capability() < need:
        pytest.skip(f"needs compute capability {need}")
    from qcompile.lowering.triton import dispatch

    public = getattr(torch.ops.qcompile, op_name).default
    for m, n, k in SHAPES:
        g = torch.Generator().manual_seed(m + n + k)
        w = torch.randn(n, k, generator=g)
        w[:2, :64] = 0.0  # all-zero groups and blocks
        wargs, w_deq = _weights(kind, w)
        wargs = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in wargs)
        x = torch.randn(m, k, generator=g).to("cuda", dtype)
        bias = torch.randn(n, generator=g).cuda()
        scale = None if static is None else torch.tensor(static, device="cuda")
        args = (x, *wargs, bias, scale, fmt, granularity)
        path = dispatch.plan(op_name, *args)
        assert path.startswith("triton"), path
        # prefill of 4-bit weights dequantizes them into the activation dtype, and cuBLAS adds the bias rounded to it
        rounding = _EPS[dtype] if op_name in ("int4_linear", "nvfp4_linear") and fmt in ("none", "nvfp4") \
            and m >= 64 else 0.0
        with torch.no_grad():
            for fn in (public, ops[public], public):
                _poison()
                out = fn(*args)
                torch.cuda.synchronize()
                _check(out, x, w_deq, bias, fmt, granularity, scale, rounding)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}")
def test_cuda_graph_replay(ops, case):
    op_name, kind, fmt, granularity, static, need = case
    if torch.cuda.get_device_capability() < need:
        pytest.skip(f"needs compute capability {need}")
    m, n, k = 3, 1000, 1056
    g = torch.Generator().manual_seed(7)
    wargs, w_deq = _weights(kind, torch.randn(n, k, generator=g))
    wargs = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in wargs)
    x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
    bias = torch.randn(n, generator=g).cuda()
    scale = None if static is None else torch.tensor(static, device="cuda")
    twin = ops[getattr(torch.ops.qcompile, op_name).default]
    with torch.no_grad():
        twin(x, *wargs, bias, scale, fmt, granularity)  # tuning and compilation happen outside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            twin(x, *wargs, bias, scale, fmt, granularity)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = twin(x, *wargs, bias, scale, fmt, granularity)
        new = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
        x.copy_(new)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
    _check(out, new, w_deq, bias, fmt, granularity, scale, 0.0)
