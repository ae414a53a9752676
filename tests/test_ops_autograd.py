"""Gradients through the `qcompile::` ops: the activation and the bias get them, the frozen weight codes do not.

The reference is float64 autograd of x @ W^T + b with W the dequantized weight (qcompile.numerics, tested on its
own in test_numerics.py); quantized activations pass the gradient straight through.
"""

from __future__ import annotations

import pytest
import torch

import qcompile  # noqa: F401  (registers the ops)
from qcompile import numerics

N, K = 24, 256


def _op_args(kind: str, w: torch.Tensor):
    """(op, arguments after x with the bias at `bias_slot`, bias_slot, dequantized weight, input description)."""
    if kind == "int8":
        t = numerics.quantize_int8(w, "channel")
        return torch.ops.qcompile.int8_linear, [t.q, t.scale, None, None, "int8", "token"], 2, numerics.dequantize_int8(t)
    if kind == "fp8_block":
        t = numerics.quantize_fp8(w, "block", block_size=128)
        return (torch.ops.qcompile.fp8_linear, [t.q, t.scale, 128, None, None, "none", "tensor"], 3,
                numerics.dequantize_fp8(t))
    if kind == "int4":
        t = numerics.quantize_int4(w, 64, symmetric=False)
        return (torch.ops.qcompile.int4_linear, [t.packed, t.scale, t.zero_point, 64, 4, K, None, None, "none", "tensor"],
                6, numerics.dequantize_int4(t))
    if kind == "w4a8":  # the weight rounded through FP8 (docs/formats.md#w4a8): the gradient sees that weight
        t = numerics.quantize_int4(w, 128, fp8_scale=True)
        return (torch.ops.qcompile.int4_linear,
                [t.packed, t.scale, None, 128, 4, K, None, None, "none", "tensor", t.fp8_scale], 6,
                numerics.dequantize_int4(t))
    t = numerics.quantize_nvfp4(w)
    return (torch.ops.qcompile.nvfp4_linear, [t.packed, t.block_scale, t.global_scale, K, None, None, "none", "block"],
            4, numerics.dequantize_nvfp4(t))


@pytest.mark.parametrize("kind", ["int8", "fp8_block", "int4", "w4a8", "nvfp4"])
@pytest.mark.parametrize("compiled", [False, True])
def test_gradients_of_activation_and_bias(kind, compiled):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(N, K, generator=g)
    op, args, bias_slot, w_deq = _op_args(kind, w)
    bias = torch.randn(N, generator=g, requires_grad=True)
    args[bias_slot] = bias
    x = torch.randn(2, 5, K, generator=g, requires_grad=True)
    upstream = torch.randn(2, 5, N, generator=g)

    def f(x):
        return op(x, *args)

    fn = torch.compile(f, fullgraph=True) if compiled else f
    out = fn(x)
    assert out.requires_grad
    gx, gb = torch.autograd.grad(out, (x, bias), upstream)

    x64, b64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    ref = x64 @ w_deq.double().T + b64
    rx, rb = torch.autograd.grad(ref, (x64, b64), upstream.double())
    torch.testing.assert_close(gx.double(), rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-5, atol=1e-5)
    if kind != "int8":  # weight-only: the forward is the float64 product up to float32 rounding
        torch.testing.assert_close(out.detach().double(), ref.detach(), rtol=1e-4, atol=1e-4)


def test_no_gradient_for_the_weight_codes_and_half_precision_grads_keep_their_dtype():
    w = torch.randn(N, K)
    op, args, bias_slot, w_deq = _op_args("int4", w)
    x = torch.randn(3, K, dtype=torch.bfloat16, requires_grad=True)
    out = op(x, *args)
    (gx,) = torch.autograd.grad(out.float().sum(), (x,))
    assert gx.dtype == torch.bfloat16
    want = w_deq.sum(0)
    torch.testing.assert_close(gx.float(), want.expand(3, K), rtol=2**-7, atol=1e-2)
    assert not args[0].requires_grad and not args[1].requires_grad
