"""What the CPU lowering's tests share: tolerances, INT8 operands and their exact products, a small model and its
calibration, compiled code, and the fixtures that pick the INT8 path (`qcompile.lowering.cpu.int8`).

The fixtures are imported by name by the test modules that use them and applied explicitly to the tests that need
them: `integer_gemm_on_any_cpu` (the path of a CPU with an INT8 dot product), `avx2_int8_calls` (the path of an AVX2
CPU without one) and `int_mm_calls`.
"""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import qcompile as qc
from qcompile import numerics
from qcompile.lowering import native
from qcompile.lowering import torch_reference as ref
from qcompile.lowering.cpu import int8 as cpu_int8

REL_TOL = 1e-5

needs_native = pytest.mark.skipif(native.load() is None, reason="no C compiler: the CPU weight-only kernel is off")
needs_native_int8 = pytest.mark.skipif(not native.has_int8_gemm(), reason="no C compiler or no AVX2: no INT8 kernel")


@pytest.fixture
def integer_gemm_on_any_cpu(monkeypatch):
    """The fast paths, as on a CPU with VNNI, whatever this one has.

    `torch._int_mm` is exact on every CPU (only slow without VNNI, which does not matter for these shapes), and the
    rewritten oneDNN graphs are checked eagerly or skipped where oneDNN's own kernel would run (`needs_exact_onednn`).
    For the tests of those paths only: tests of the real gate, and of the kernel for AVX2 CPUs (`avx2_int8_calls`),
    do without it.
    """
    monkeypatch.setattr(cpu_int8, "has_fast_int8_gemm", lambda: True)


@pytest.fixture
def avx2_int8_calls(monkeypatch) -> list:
    """A CPU without an INT8 dot product (the gate says so, whatever this one has); records the INT8 kernel's calls
    as (M, K, N, static scale given), with the activation's name after them when it applies one; a call for several
    weights as ("shared", M, K, (N, ...), static scale given, (activation, ...))."""
    monkeypatch.setattr(cpu_int8, "has_fast_int8_gemm", lambda: False)
    calls = []
    real = native.int8_linear

    def spy(library, x2d, weight, bias, static_scale, activation="none"):
        fused = () if activation == "none" else (activation,)
        calls.append((*x2d.shape, weight.out_features, static_scale is not None, *fused))
        return real(library, x2d, weight, bias, static_scale, activation)

    real_many = native.int8_linear_many

    def spy_many(library, x2d, weights, biases, static_scale, activations=None):
        calls.append(("shared", *x2d.shape, tuple(w.out_features for w in weights), static_scale is not None,
                      tuple(activations or ["none"] * len(weights))))
        return real_many(library, x2d, weights, biases, static_scale, activations)

    monkeypatch.setattr(native, "int8_linear", spy)
    monkeypatch.setattr(native, "int8_linear_many", spy_many)
    return calls


@pytest.fixture
def int_mm_calls(monkeypatch) -> list:
    """Counts the calls of torch._int_mm (the integer GEMM) made from here on."""
    from qcompile.lowering import ensure_registered

    ensure_registered()  # inductor, which it imports, must record the real torch._int_mm, not the spy
    calls = []
    real = torch._int_mm

    def spy(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b)

    monkeypatch.setattr(torch, "_int_mm", spy)
    return calls


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30))


def int8_weight(n: int, k: int, granularity: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = numerics.quantize_int8(torch.randn(n, k, generator=g), granularity)
    return w.q, w.scale


def float64_product(x, weight, weight_scale, bias, input_scale, granularity):
    """Quantize x with the reference quantizer, then multiply the dequantized operands in float64."""
    xq = numerics.quantize_int8(x.float(), granularity, scale=input_scale)
    out = (xq.q.double() * xq.scale.double()) @ (weight.double() * weight_scale.double()).T
    return out if bias is None else out + bias.double()


def integer_formula(x, weight, weight_scale, bias, input_scale, granularity):
    """What the kernel must return bit for bit: the reference quantizer's codes and scales, the integer product
    (exact in float64: |sum| < 2^53), then acc · s_w · s_x + bias rounded in float32 in that order."""
    xq = numerics.quantize_int8(x.float().reshape(-1, x.shape[-1]), granularity, scale=input_scale)
    acc = (xq.q.double() @ weight.double().T).float()
    out = acc * weight_scale.float().reshape(1, -1) * xq.scale.reshape(-1, 1)
    out = out if bias is None else out + bias.float()
    return out.reshape(*x.shape[:-1], weight.shape[0])


def reference_layer(linear, x):
    w = numerics.quantize_int8(linear.weight.detach(), "channel")
    return ref.int8_linear(x, w.q, w.scale, linear.bias.detach(), None, "int8", "token")


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32)).eval()


def calibration_batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 12, 64, generator=g) for _ in range(3)]


def compiled_code(fn, *args):
    torch._dynamo.reset()
    with torch.no_grad():
        out, code = run_and_get_code(fn, *args)
    return out, "\n".join(code)


def backend_and_eager(model, recipe: str, dtype: torch.dtype):
    """backend='quant' compiled by inductor, and the same quantized graph run eagerly; calibrated alike if needed."""
    compiled = torch.compile(model, backend="quant", options={"recipe": recipe})
    eager = torch.compile(model, backend="quant", options={"recipe": recipe, "compiler": "eager"})
    if recipe == "int8_sq":
        for fn in (compiled, eager):
            with qc.calibrate(fn), torch.no_grad():
                for batch in calibration_batches():
                    fn(batch.to(dtype))
    return compiled, eager


def traced_with_freezing(compiled):
    def call(x):
        with torch._inductor.config.patch(freezing=True):
            return compiled(x)

    return call


ONEDNN_CALL = "torch.ops.onednn.qlinear_pointwise"


class reference_kernels:
    """Runs the ops on the plain-PyTorch reference while active."""

    def __enter__(self):
        self._saved = native._library, native._failed
        native._library, native._failed = None, True

    def __exit__(self, *exc):
        native._library, native._failed = self._saved
