"""INT8 layers on the CPU (qcompile.lowering.cpu.int8) where the CPU has an INT8 dot product: `torch._int_mm`, the
gate that chooses it, and the inductor decomposition.

Reference: `qcompile.lowering.torch_reference` (fake-quantize the input, dequantize the weight, float32 GEMM) and
float64 math on the same quantized operands. The integer product is exact, so the fast path may differ from the
reference only by float32 rounding of the sums and the final scaling: bound 1e-5 relative to the output's scale.
Tests of that path take `integer_gemm_on_any_cpu` (the path as on a CPU with VNNI, whatever this one has).
"""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from cpu_helpers import (  # noqa: F401  (fixtures)
    ONEDNN_CALL,
    REL_TOL,
    backend_and_eager,
    calibration_batches,
    compiled_code,
    float64_product,
    int8_weight,
    int_mm_calls,
    integer_gemm_on_any_cpu,
    mlp,
    reference_layer,
    rel,
)
import qcompile as qc
from qcompile.lowering import native
from qcompile.lowering import torch_reference as ref
from qcompile.lowering.cpu import activation_scale
from qcompile.lowering.cpu import int8 as cpu_int8


CASES = [
    # (x shape, N, weight granularity, input granularity, static scale, bias)
    ((4, 16, 64), 48, "channel", "token", None, True),
    ((1, 1, 64), 8, "channel", "token", None, False),  # a decode step
    ((3, 33), 7, "tensor", "token", None, True),  # nothing divisible by anything
    ((5, 2), 3, "channel", "token", None, False),  # K = 2
    ((17, 130), 129, "channel", "tensor", 0.05, True),  # static per-tensor scale (int8_sq)
    ((2, 9, 40), 24, "tensor", "tensor", None, False),  # dynamic per-tensor
]


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
@pytest.mark.parametrize("case", CASES, ids=[f"x{c[0]}-n{c[1]}-{c[2]}-{c[3]}" for c in CASES])
def test_int8_fast_path_matches_reference(case, int_mm_calls):
    shape, n, w_gran, x_gran, static, with_bias = case
    g = torch.Generator().manual_seed(len(shape) * 100 + n)
    x = torch.randn(*shape, generator=g) * 3
    if len(shape) > 2:
        x[:, 0, :] = 0.0  # all-zero tokens: their scale is 0, replaced by 1 (every code 0)
    weight, weight_scale = int8_weight(n, shape[-1], w_gran, n)
    bias = torch.randn(n, generator=g) if with_bias else None
    scale = None if static is None else torch.tensor(static)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, bias, scale, "int8", x_gran)
    assert len(int_mm_calls) == 1  # the integer kernel ran, not the float reference
    want = ref.int8_linear(x, weight, weight_scale, bias, scale, "int8", x_gran)
    assert got.shape == want.shape == (*shape[:-1], n)
    assert rel(got, want) <= REL_TOL
    assert rel(got, float64_product(x, weight, weight_scale, bias, scale, x_gran)) <= REL_TOL


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
def test_int8_fast_path_huge_and_tiny_values():
    # Outputs near 1e36: finite, but acc · s_x alone (about 1e39) would overflow float32.
    x = torch.tensor([[3e36, -1e36, 5.0, 0.0], [1e-30, -2e-30, 0.0, 3e-31]])
    weight, weight_scale = int8_weight(6, 4, "channel", 1)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    want = float64_product(x, weight, weight_scale, None, None, "token")
    assert torch.isfinite(got).all()
    for row in range(2):  # each token has its own scale: compare each row at its own magnitude
        assert rel(got[row], want[row]) <= REL_TOL


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
def test_int8_fast_path_bfloat16_input_keeps_dtype():
    x = torch.randn(4, 32).bfloat16()
    weight, weight_scale = int8_weight(16, 32, "channel", 2)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    want = ref.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    assert got.dtype == torch.bfloat16
    assert rel(got.float(), want.float()) <= 1e-2  # both end in a bfloat16 rounding of the same float32 value


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("static", [None, 0.1], ids=["dynamic", "static"])
def test_int8_fast_path_rejects_non_finite_input(bad, static):
    x = torch.randn(3, 16)
    x[1, 4] = bad
    weight, weight_scale = int8_weight(8, 16, "channel", 3)
    scale = None if static is None else torch.tensor(static)
    with pytest.raises(ValueError, match="NaN or inf"):
        torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, scale, "int8", "token")


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
def test_k_of_one_keeps_the_reference(int_mm_calls):
    # torch._int_mm gives wrong sums for K == 1 on the CPU; the reference must take such a layer
    x = torch.randn(5, 1)
    weight, weight_scale = int8_weight(3, 1, "channel", 6)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    assert not int_mm_calls
    assert rel(got, float64_product(x, weight, weight_scale, None, None, "token")) <= REL_TOL


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
def test_other_formats_keep_the_reference(int_mm_calls):
    x = torch.randn(2, 32)
    weight, weight_scale = int8_weight(8, 32, "channel", 4)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "none", "tensor")  # weight-only
    assert not int_mm_calls
    assert rel(got, x.double() @ (weight.double() * weight_scale.double()).T) <= REL_TOL
    empty = torch.ops.qcompile.int8_linear(x[:0], weight, weight_scale, None, None, "int8", "token")
    assert empty.shape == (0, 8)


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
@pytest.mark.parametrize("recipe", ["int8_dynamic", "int8_sq"])
def test_compiled_quantized_model_runs_the_integer_kernel(recipe):
    qm = qc.quantize(mlp(), recipe, calib=calibration_batches(), progress=False)
    x = torch.randn(2, 7, 64)
    out, code = compiled_code(torch.compile(qm), x)
    assert "extern_kernels._int_mm(" in code  # decomposed into the integer GEMM inside inductor's code...
    assert "torch.ops.qcompile.int8_linear" not in code  # ...not called as an opaque op
    with torch.no_grad():
        assert rel(out, qm(x)) <= REL_TOL  # the eager QuantizedModel (itself checked against the reference above)


def test_check_finite_amax_reads_every_value_of_every_tensor():
    finite = [torch.rand(5, 1), torch.rand(()), torch.rand(3)]
    assert activation_scale.check_finite_amax(finite).item() == 1.0
    for bad in (float("nan"), float("inf")):
        for index in range(len(finite)):
            amaxes = [t.clone() for t in finite]
            amaxes[index].reshape(-1)[-1] = bad  # the last value of one tensor among several
            with pytest.raises(ValueError, match="NaN or inf"):
                activation_scale.check_finite_amax(amaxes)


def test_integer_gemm_gate_matches_the_kernels():
    """The real gate says yes exactly where oneDNN's u8×s8 GEMM sums extreme codes exactly (fresh random ones)."""
    g = torch.Generator().manual_seed(11)
    codes = torch.randint(-127, 128, (64, 256), generator=g)
    codes[:, ::2] = 127  # pairs of large products: what a saturating int16 accumulation gets wrong
    weight = torch.randint(-127, 128, (32, 256), generator=g, dtype=torch.int8)
    weight[:, ::2] = 127
    packed = torch.ops.onednn.qlinear_prepack(weight, [64, 256])
    got = torch.ops.onednn.qlinear_pointwise(
        (codes + 128).to(torch.uint8), 1.0, 128, packed, torch.ones(32), torch.zeros(32, dtype=torch.long), None, 1.0,
        0, torch.float32, "none", [], "",
    )
    exact = torch.equal(got.double(), codes.double() @ weight.double().T)
    assert cpu_int8.has_fast_int8_gemm() == exact
    if not exact:  # and the layers then take the reference
        assert not cpu_int8.takes_integer_gemm(torch.float32, 256, weight, "int8", "token")


@pytest.mark.parametrize("recipe", ["int8_dynamic", "int8_sq"])
def test_without_fast_integer_gemm_the_reference_runs(recipe, monkeypatch, int_mm_calls):
    """A CPU without VNNI or AVX2: eager, compiled and backend='quant' all compute the reference, with no integer
    kernel."""
    monkeypatch.setattr(cpu_int8, "has_fast_int8_gemm", lambda: False)
    monkeypatch.setattr(native, "has_int8_gemm", lambda: False)
    model = mlp()
    qm = qc.quantize(model, recipe, calib=calibration_batches(), progress=False)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        eager = qm(x)
    assert not int_mm_calls
    if recipe == "int8_dynamic":
        hidden = torch.nn.functional.gelu(reference_layer(model[0], x))
        assert rel(eager, reference_layer(model[2], hidden)) <= REL_TOL
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled, _ = compiled_code(torch.compile(qm), x)
        backend, eager_backend = backend_and_eager(model, recipe, torch.float32)
        torch._dynamo.reset()
        with torch.no_grad():
            out, code = run_and_get_code(backend, x)
    code = "\n".join(code)
    assert "_int_mm" not in code and ONEDNN_CALL not in code
    assert rel(compiled, eager) <= 1e-4  # inductor's fused float kernels round differently from eager's
    with torch.no_grad():
        assert rel(out, eager_backend(x)) <= 1e-4


def test_decomposition_leaves_other_devices_alone():
    meta = torch.empty(2, 8, device="meta")
    weight, weight_scale = int8_weight(4, 8, "channel", 5)
    assert cpu_int8.decompose_int8_linear(
        meta, weight.to("meta"), weight_scale.to("meta"), None, None, "int8", "token"
    ) is NotImplemented
