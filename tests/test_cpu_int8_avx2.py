"""The INT8 kernel for x86 CPUs with AVX2 and no INT8 dot product (`native`'s C kernel, `int8_gemm.c`, called from
qcompile.lowering.cpu.int8): alone, with the activation after the layer fused into its call, and shared by layers
that read one tensor.

The kernel's integer product is exact, so its output is the integer formula's bit for bit (`integer_formula`); its
GELU and SiLU are within a few float32 ulps of the exact functions. Tests of the kernel take `avx2_int8_calls`
(the path as on such a CPU, whatever this one has, with the kernel's calls recorded).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from cpu_helpers import (  # noqa: F401  (fixtures)
    REL_TOL,
    avx2_int8_calls,
    backend_and_eager,
    calibration_batches,
    compiled_code,
    int8_weight,
    int_mm_calls,
    integer_formula,
    integer_gemm_on_any_cpu,
    mlp,
    needs_native_int8,
    reference_kernels,
    rel,
    traced_with_freezing,
)
import qcompile as qc
from qcompile.lowering import native
from qcompile.lowering import torch_reference as ref


NATIVE_CASES = [
    # (x shape, N, weight granularity, input granularity, static scale, bias)
    ((1, 1, 576), 1536, "channel", "token", None, True),  # a decode step
    ((7, 33), 17, "channel", "token", None, True),  # no dimension a multiple of the tiles (6 rows, 16 columns)
    ((5, 1), 3, "channel", "token", None, False),  # K = 1: one odd pair
    ((2, 61, 800), 150, "channel", "token", None, True),  # K past one 384-pair block, M past one task of 24 rows
    ((31, 130), 129, "tensor", "tensor", 0.05, True),  # static per-tensor scale (int8_sq), codes clamped at ±127
    ((2, 9, 40), 24, "channel", "tensor", None, False),  # dynamic per-tensor
]


@needs_native_int8
@pytest.mark.parametrize("case", NATIVE_CASES, ids=[f"x{c[0]}-n{c[1]}-{c[3]}" for c in NATIVE_CASES])
def test_avx2_int8_kernel_is_the_integer_formula_bit_for_bit(case, avx2_int8_calls, int_mm_calls):
    shape, n, w_gran, x_gran, static, with_bias = case
    g = torch.Generator().manual_seed(sum(shape) + n)
    x = torch.randn(*shape, generator=g) * 3
    x.reshape(-1, shape[-1])[0] = 0.0  # an all-zero token: scale 0 replaced by 1, every code 0
    weight, weight_scale = int8_weight(n, shape[-1], w_gran, n)
    bias = torch.randn(n, generator=g) if with_bias else None
    scale = None if static is None else torch.tensor(static)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, bias, scale, "int8", x_gran)
    assert len(avx2_int8_calls) == 1 and not int_mm_calls  # the C kernel ran, not a float or oneDNN path
    assert torch.equal(got, integer_formula(x, weight, weight_scale, bias, scale, x_gran))
    want = ref.int8_linear(x, weight, weight_scale, bias, scale, "int8", x_gran)
    assert rel(got, want) <= REL_TOL  # and the reference (float32 GEMM of dequantized values) agrees


@needs_native_int8
def test_avx2_int8_kernel_extreme_codes_and_magnitudes(avx2_int8_calls):
    """Every product ±127·127 (where saturating int16 pair sums go wrong), and tokens near 1e36 and 1e-30."""
    k = 1000
    x = torch.full((3, k), 5.0)
    x[:, 1::2] = -5.0
    x[1] *= 3e35
    x[2] *= 1e-31
    weight = torch.full((20, k), 127, dtype=torch.int8)
    weight[:, 1::2] = -127
    weight_scale = torch.rand(20, generator=torch.Generator().manual_seed(4)) * 1e-3
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    assert len(avx2_int8_calls) == 1
    assert torch.equal(got, integer_formula(x, weight, weight_scale, None, None, "token"))
    # hand-checked: every code is ±127 with matching signs, so acc = 1000 · 127²
    assert torch.equal(got[0], torch.tensor(1000.0 * 127 * 127) * weight_scale * (torch.tensor(5.0) / 127))
    assert torch.isfinite(got).all()


def _int16_border_rows(k: int, g: torch.Generator) -> torch.Tensor:
    """Rows of x whose codes are x itself (each row's largest |x| is 127, so its scale is 1), chosen around the
    kernel's int16 limit: it adds the products of codes k, k + 1, k + 4 and k + 5 (k a multiple of 8, or that plus
    2) in int16, against weights + 128 in [0, 255], so the positive codes of such a four may sum to 128 at most, and
    the negative ones too (255 · 129 > 32767); it moves codes out of fours past that."""

    def row(values):
        out = torch.tensor(values, dtype=torch.float32).repeat(k // len(values) + 1)[:k].clone()
        if out.abs().max() < 127:
            out[-1] = 127.0  # the row's largest |value| must be 127
        return out

    return torch.stack([
        row([127.0]),  # every four over the limit: three of its codes move, pairs of them apart
        row([-127.0]),
        row([32.0] * 8 + [-32.0] * 8),  # fours of ±128: kept
        row([33.0] + [32.0] * 7 + [-33.0] + [-32.0] * 7),  # fours of 129 (and 128), -129: moved
        row([127.0, -127.0, 1.0, -1.0]),  # fours of 254 and -254 with both signs in them
        torch.randint(-127, 128, (k,), generator=g).float(),  # uniformly spread codes
    ])


@needs_native_int8
@pytest.mark.parametrize("m", [8, 13, 1], ids=["full-tiles", "tile-tail", "one-row"])
def test_avx2_int8_kernel_is_exact_where_int16_sums_would_overflow(m, avx2_int8_calls):
    """Codes at and past the limit of the kernel's int16 sums, against the largest weights of both signs (codes 127
    and -128) and random ones: the sums must still be exact."""
    k, n = 203, 37
    g = torch.Generator().manual_seed(m)
    weight = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    weight[0], weight[1] = 127, -128
    weight[2:10] = torch.where(torch.rand(8, k, generator=g) < 0.5, -128, 127).to(torch.int8)
    border = _int16_border_rows(k, g)
    x = torch.cat([border, torch.randn(max(m - len(border), 0), k, generator=g) * 3])[:m]
    if m == 1:
        x = border[3:4]  # the row whose fours sit just past the limit
    weight_scale = torch.rand(n, generator=g) * 1e-2
    bias = torch.randn(n, generator=g)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, bias, None, "int8", "token")
    assert len(avx2_int8_calls) == 1
    assert torch.equal(got, integer_formula(x, weight, weight_scale, bias, None, "token"))
    # hand-checked: a row of codes 127 against a column of codes 127 sums to 127 · 127 · k (scale 1)
    if m > 1:
        assert got[0, 0] == torch.tensor(127.0 * 127 * k) * weight_scale[0] + bias[0]
        assert got[1, 1] == torch.tensor(127.0 * 128 * k) * weight_scale[1] + bias[1]  # -127 against -128


@needs_native_int8
@pytest.mark.parametrize("m", [8, 6, 1], ids=["full-tiles", "tile-tail", "one-row"])
def test_avx2_int8_kernel_is_exact_with_few_codes_past_the_limit(m, avx2_int8_calls):
    """Rows like real activations (most codes small, a few large), where the kernel keeps its int16 sums over fours
    of codes and moves only the few past the limit: fours of 129 whose pairs are in range (64 at k, 65 at k + 4),
    and fours of -129 whose first pair is past it too."""
    k, n = 203, 37
    g = torch.Generator().manual_seed(10 + m)
    weight = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    weight[0], weight[1] = 127, -128
    x = torch.randint(-20, 21, (m, k), generator=g).float()
    for row in range(m):
        for start in torch.randperm(k // 8 - 1, generator=g)[:3].tolist():
            at = 8 * start + 2 * (row % 2)
            x[row, at], x[row, at + 1], x[row, at + 4], x[row, at + 5] = 64.0, 0.0, 65.0, 0.0
            x[row, at + 8], x[row, at + 9], x[row, at + 12] = -127.0, -2.0, 0.0
        x[row, -1] = 127.0  # scale 1: the codes are x
    weight_scale = torch.rand(n, generator=g) * 1e-2
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    assert len(avx2_int8_calls) == 1
    assert torch.equal(got, integer_formula(x, weight, weight_scale, None, None, "token"))


def test_avx2_int8_kernel_takes_no_more_input_features_than_its_sums_hold(avx2_int8_calls, int_mm_calls):
    k = native.INT8_KERNEL_MAX_K + 1
    weight = torch.full((2, k), 127, dtype=torch.int8)
    x = torch.full((1, k), 1.0)
    weight_scale = torch.tensor([[1e-3], [2e-3]])
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    assert not avx2_int8_calls  # the reference ran, not the kernel (float32 sums of the dequantized values)
    # a float32 sum of K equal terms: relative error up to K · 2^-24
    assert rel(got, integer_formula(x, weight, weight_scale, None, None, "token")) <= k * 2**-24
    if native.has_int8_gemm():
        with pytest.raises(ValueError, match="at most 65536 input features"):
            native.Int8Weight(native.load(), weight, weight_scale)


@needs_native_int8
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("static", [None, 0.1], ids=["dynamic", "static"])
@pytest.mark.parametrize("column", [4, 37], ids=["vector-part", "tail"])
def test_avx2_int8_kernel_rejects_non_finite_input(bad, static, column, avx2_int8_calls):
    x = torch.randn(3, 38)
    x[2, column] = bad
    weight, weight_scale = int8_weight(8, 38, "channel", 3)
    scale = None if static is None else torch.tensor(static)
    with pytest.raises(ValueError, match="NaN or inf"):
        torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, scale, "int8", "token")


@needs_native_int8
@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
def test_avx2_int8_kernel_rejects_a_bad_static_scale(bad, avx2_int8_calls):
    weight, weight_scale = int8_weight(8, 16, "channel", 3)
    with pytest.raises(ValueError, match="static int8 input scale"):
        torch.ops.qcompile.int8_linear(torch.randn(3, 16), weight, weight_scale, None, torch.tensor(bad), "int8",
                                       "tensor")


@needs_native_int8
def test_avx2_int8_kernel_static_scale_of_zero_means_one(avx2_int8_calls):
    """As in the reference, a calibrated scale of 0 (an input that was all zeros) is replaced by 1."""
    x = torch.tensor([[0.4, -2.6, 300.0, 0.0]])
    weight, weight_scale = int8_weight(5, 4, "channel", 8)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, torch.tensor(0.0), "int8", "tensor")
    codes = torch.tensor([[0.0, -3.0, 127.0, 0.0]])  # hand-rounded (half to even), clamped at 127
    want = (codes.double() @ weight.double().T).float() * weight_scale.reshape(1, -1)
    assert torch.equal(got, want)


@needs_native_int8
def test_avx2_int8_kernel_bfloat16_input_keeps_dtype(avx2_int8_calls):
    x = torch.randn(4, 32).bfloat16()
    weight, weight_scale = int8_weight(16, 32, "channel", 2)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    assert len(avx2_int8_calls) == 1 and got.dtype == torch.bfloat16
    assert torch.equal(got, integer_formula(x, weight, weight_scale, None, None, "token").bfloat16())


@needs_native_int8
def test_avx2_int8_weight_is_packed_once_and_follows_changes(avx2_int8_calls, monkeypatch):
    packs = []
    real = native.Int8Weight

    def counting(*args):
        packs.append(1)
        return real(*args)

    monkeypatch.setattr(native, "Int8Weight", counting)
    weight, weight_scale = int8_weight(24, 48, "channel", 9)
    x = torch.randn(5, 48)
    first = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    again = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    assert torch.equal(first, again) and len(packs) == 1
    with torch.no_grad():
        weight.neg_()  # in place: the packed copy must not be reused
    changed = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    assert len(packs) == 2 and torch.equal(changed, integer_formula(x, weight, weight_scale, None, None, "token"))


@needs_native_int8
@pytest.mark.parametrize("recipe", ["int8_dynamic", "int8_sq"])
def test_avx2_int8_kernel_runs_eager_compiled_and_in_the_backend(recipe, avx2_int8_calls, int_mm_calls):
    """Without VNNI, every entry point runs the C kernel (the op is called whole from compiled code) and matches the
    reference lowering."""
    model = mlp()
    qm = qc.quantize(model, recipe, calib=calibration_batches(), progress=False)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        eager = qm(x)
    assert len(avx2_int8_calls) == 2  # both layers
    with torch.no_grad(), reference_kernels():
        assert rel(eager, qm(x)) <= REL_TOL
    with torch._inductor.config.patch(fx_graph_cache=False):
        for fn in (torch.compile(qm), traced_with_freezing(torch.compile(qm))):
            avx2_int8_calls.clear()
            compiled, code = compiled_code(fn, x)
            assert "torch.ops.qcompile.cpu_int8_linear.default(" in code and len(avx2_int8_calls) == 2
            assert rel(compiled, eager) <= 1e-4  # GELU compiled vs eager between the layers
        backend, eager_backend = backend_and_eager(model, recipe, torch.float32)
        torch._dynamo.reset()
        avx2_int8_calls.clear()
        with torch.no_grad():
            out, code = run_and_get_code(backend, x)
    assert "torch.ops.qcompile.cpu_int8_linear.default(" in "\n".join(code) and len(avx2_int8_calls) == 2
    assert not int_mm_calls
    with torch.no_grad():
        assert rel(out, eager_backend(x)) <= 1e-4


_ACTIVATIONS64 = {
    "gelu": lambda v: v * 0.5 * torch.special.erfc(-v / math.sqrt(2.0)),  # Phi via erfc: exact in both tails
    "silu": lambda v: v * torch.sigmoid(v),
}


_TORCH32 = {"gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu}


def _kernel_activation(values: torch.Tensor, activation: str) -> torch.Tensor:
    """The INT8 kernel's activation of `values`: a zero weight makes every output its bias, so y = act(bias)."""
    library = native.load()
    weight = native.Int8Weight(library, torch.zeros(values.numel(), 3, dtype=torch.int8), torch.ones(1))
    out = native.int8_linear(library, torch.randn(7, 3), weight, values, None, activation)  # 7 rows: a tile edge
    assert torch.equal(out.isnan(), out[:1].isnan().expand_as(out))  # every row alike
    assert torch.equal(out.nan_to_num(), out[:1].nan_to_num().expand_as(out))
    return out[0]


@needs_native_int8
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_kernel_activation_is_as_accurate_as_float32_allows(activation):
    """Against float64 on a dense grid, random values and the clamping points: within 1e-6 of the exact function
    relative to its value (a few float32 ulps) everywhere, as close in absolute terms as PyTorch's own float32
    function (within a factor 2), and, for GELU, far closer where PyTorch's 1 + erf(x / sqrt 2) cancels (x < -3)."""
    g = torch.Generator().manual_seed(5)
    values = torch.cat([torch.linspace(-20, 20, 40001), torch.randn(20000, generator=g) * 5,
                        torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-6, -1e-6, 14.99, -14.99, 15.0, -15.0, -87.9,
                                      -88.1, 88.1, 3e38, -3e38])])
    got = _kernel_activation(values, activation).double()
    want = _ACTIVATIONS64[activation](values.double())
    error = (got - want).abs()
    tiny = want.abs() < 1e-35  # under float32's normal range: only a tiny absolute error is asked
    assert (error[~tiny] / want[~tiny].abs()).max() <= 1e-6
    assert error[tiny].max() <= 1e-35
    torch_error = (_TORCH32[activation](values).double() - want).abs()
    assert error.max() <= 2 * torch_error.max()
    if activation == "gelu":
        tail = (values < -3) & (values > -15)
        assert (torch_error[tail] / want[tail].abs()).max() > 1e-3  # what the erfc form avoids
    # hand-checked values: GELU(x) = x Phi(x), Phi(-3) = 0.0013498980316301; SiLU(2) = 2 / (1 + e^-2)
    if activation == "gelu":
        assert _kernel_activation(torch.tensor([-3.0]), "gelu").item() == pytest.approx(-3 * 0.0013498980316301,
                                                                                        rel=1e-6)
    else:
        assert _kernel_activation(torch.tensor([2.0]), "silu").item() == pytest.approx(2 / (1 + math.exp(-2)), rel=1e-6)


@needs_native_int8
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_kernel_activation_of_overflowed_outputs_is_torchs(activation):
    """An output that overflowed to ±inf: act(inf) = inf, act(-inf) = NaN, as PyTorch's float32 functions give."""
    got = _kernel_activation(torch.tensor([float("inf"), -float("inf")]), activation)
    assert got[0] == float("inf") and torch.isnan(got[1])
    assert torch.equal(_TORCH32[activation](torch.tensor([float("inf")])), got[:1])


@needs_native_int8
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("shape,n,static", [((1, 1, 384), 1536, None), ((7, 33), 17, None), ((2, 61, 800), 150, None),
                                            ((31, 130), 129, 0.05), ((5, 1), 3, None)],
                         ids=["decode", "edges", "two-blocks", "static", "k1"])
def test_fused_op_is_the_activation_of_the_exact_layer(activation, shape, n, static, avx2_int8_calls):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(*shape, generator=g) * 2
    weight, weight_scale = int8_weight(n, shape[-1], "channel" if static is None else "tensor", n)
    bias = torch.randn(n, generator=g)
    scale = None if static is None else torch.tensor(static)
    granularity = "token" if static is None else "tensor"
    got = torch.ops.qcompile.cpu_int8_linear_activation(x, weight, weight_scale, bias, scale, "int8", granularity,
                                                        activation)
    assert avx2_int8_calls == [(*x.reshape(-1, shape[-1]).shape, n, static is not None, activation)]  # one call
    want = _ACTIVATIONS64[activation](integer_formula(x, weight, weight_scale, bias, scale, granularity).double())
    assert ((got.double() - want).abs() <= 1e-6 * want.abs() + 1e-35).all()


def test_fused_op_rejects_an_unknown_activation():
    weight, weight_scale = int8_weight(4, 8, "channel", 1)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        torch.ops.qcompile.cpu_int8_linear_activation(torch.randn(2, 8), weight, weight_scale, None, None, "int8",
                                                      "token", "relu")
    if native.has_int8_gemm():
        with pytest.raises(ValueError, match="unknown activation"):
            native.int8_linear(native.load(), torch.randn(2, 8), native.Int8Weight(native.load(), weight,
                                                                                   weight_scale), None, None, "tanh")


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
def test_fused_op_without_the_kernel_is_the_op_then_the_activation():
    """On a CPU where the INT8 kernel does not run (here: one with an INT8 dot product, as the fixture says), the op
    is the layer (its integer GEMM) followed by PyTorch's activation."""
    x = torch.randn(3, 5, 32)
    weight, weight_scale = int8_weight(16, 32, "channel", 6)
    bias = torch.randn(16)
    got = torch.ops.qcompile.cpu_int8_linear_activation(x, weight, weight_scale, bias, None, "int8", "token", "silu")
    layer = torch.ops.qcompile.int8_linear(x, weight, weight_scale, bias, None, "int8", "token")
    assert torch.equal(got, torch.nn.functional.silu(layer))


@needs_native_int8
@pytest.mark.parametrize("shape,static", [((7, 33), None), ((2, 61, 800), None), ((1, 1, 384), None),
                                          ((31, 130), 0.05), ((3, 5, 40), "tensor")],
                         ids=["edges", "two-blocks", "decode", "static", "dynamic-tensor"])
def test_shared_input_op_is_the_separate_layers_bit_for_bit(shape, static, avx2_int8_calls):
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g) * 2
    ns, activations = (17, 64, 5), ["gelu", "none", "silu"]
    weights = [int8_weight(n, shape[-1], "channel", n) for n in ns]
    biases = [torch.randn(17, generator=g), None, torch.randn(5, generator=g)]
    scale = torch.tensor(static) if isinstance(static, float) else None
    granularity = "token" if static is None else "tensor"
    got = torch.ops.qcompile.cpu_int8_linear_shared(x, [w for w, _ in weights], [s for _, s in weights], biases,
                                                    scale, "int8", granularity, activations)
    rows = x.reshape(-1, shape[-1]).shape[0]
    # one call for the three
    assert avx2_int8_calls == [("shared", rows, shape[-1], ns, static is not None, tuple(activations))]
    for out, (w, s), b, activation in zip(got, weights, biases, activations):
        layer = integer_formula(x, w, s, b, scale, granularity)
        if activation == "none":
            assert torch.equal(out, layer)
        else:  # what the one-layer call gives, bit for bit, and the exact function within 1e-6 of its value
            alone = torch.ops.qcompile.cpu_int8_linear_activation(x, w, s, b, scale, "int8", granularity, activation)
            assert torch.equal(out, alone)
            want = _ACTIVATIONS64[activation](layer.double())
            assert ((out.double() - want).abs() <= 1e-6 * want.abs() + 1e-35).all()


@needs_native_int8
def test_shared_input_op_rejects_non_finite_input_and_bad_lists(avx2_int8_calls):
    x = torch.randn(4, 24)
    x[3, 7] = float("nan")
    (w1, s1), (w2, s2) = int8_weight(8, 24, "channel", 1), int8_weight(8, 24, "channel", 2)
    shared = torch.ops.qcompile.cpu_int8_linear_shared
    with pytest.raises(ValueError, match="NaN or inf"):
        shared(x, [w1, w2], [s1, s2], [None, None], None, "int8", "token", ["none", "none"])
    with pytest.raises(ValueError, match="one weight scale, one bias"):
        shared(x, [w1, w2], [s1], [None, None], None, "int8", "token", ["none", "none"])
    with pytest.raises(ValueError, match="one weight scale, one bias"):
        shared(x, [w1, w2], [s1, s2], [None, None], None, "int8", "token", ["none"])
    with pytest.raises(ValueError, match=r"unknown activation\(s\) \['relu'\]"):
        shared(x, [w1, w2], [s1, s2], [None, None], None, "int8", "token", ["relu", "none"])
