"""The CPU fast path (qcompile.lowering.cpu): the same function as the reference lowering, and the path taken.

Reference: `qcompile.lowering.torch_reference` (fake-quantize the input, dequantize the weight, float32 GEMM) and
float64 math on the same quantized operands. The integer product is exact, so the fast path may differ from the
reference only by float32 rounding of the sums and the final scaling: bound 1e-5 relative to the output's scale.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import qcompile as qc
from qcompile import numerics
from qcompile.lowering import cpu as cpu_lowering
from qcompile.lowering import native, onednn
from qcompile.lowering import torch_reference as ref

REL_TOL = 1e-5

# oneDNN's u8×s8 GEMM is exact only with an INT8 dot-product instruction (see `cpu_lowering.has_fast_int8_gemm`).
needs_exact_onednn = pytest.mark.skipif(
    not cpu_lowering._onednn_int8_gemm_is_exact(),
    reason="oneDNN's u8×s8 GEMM saturates on this CPU (no VNNI/AMX): qcompile takes the reference path here",
)


@pytest.fixture(autouse=True)
def integer_gemm_on_any_cpu(monkeypatch):
    """The fast paths, as on a CPU with VNNI, whatever this one has.

    `torch._int_mm` is exact on every CPU (only slow without VNNI, which does not matter for these shapes), and the
    rewritten oneDNN graphs are checked eagerly or skipped where oneDNN's own kernel would run (`needs_exact_onednn`).
    Tests of the real gate set it themselves.
    """
    monkeypatch.setattr(cpu_lowering, "has_fast_int8_gemm", lambda: True)


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


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30))


def _weight(n: int, k: int, granularity: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = numerics.quantize_int8(torch.randn(n, k, generator=g), granularity)
    return w.q, w.scale


def _float64_product(x, weight, weight_scale, bias, input_scale, granularity):
    """Quantize x with the reference quantizer, then multiply the dequantized operands in float64."""
    xq = numerics.quantize_int8(x.float(), granularity, scale=input_scale)
    out = (xq.q.double() * xq.scale.double()) @ (weight.double() * weight_scale.double()).T
    return out if bias is None else out + bias.double()


CASES = [
    # (x shape, N, weight granularity, input granularity, static scale, bias)
    ((4, 16, 64), 48, "channel", "token", None, True),
    ((1, 1, 64), 8, "channel", "token", None, False),  # a decode step
    ((3, 33), 7, "tensor", "token", None, True),  # nothing divisible by anything
    ((5, 2), 3, "channel", "token", None, False),  # K = 2
    ((17, 130), 129, "channel", "tensor", 0.05, True),  # static per-tensor scale (int8_sq)
    ((2, 9, 40), 24, "tensor", "tensor", None, False),  # dynamic per-tensor
]


@pytest.mark.parametrize("case", CASES, ids=[f"x{c[0]}-n{c[1]}-{c[2]}-{c[3]}" for c in CASES])
def test_int8_fast_path_matches_reference(case, int_mm_calls):
    shape, n, w_gran, x_gran, static, with_bias = case
    g = torch.Generator().manual_seed(len(shape) * 100 + n)
    x = torch.randn(*shape, generator=g) * 3
    if len(shape) > 2:
        x[:, 0, :] = 0.0  # all-zero tokens: their scale is 0, replaced by 1 (every code 0)
    weight, weight_scale = _weight(n, shape[-1], w_gran, n)
    bias = torch.randn(n, generator=g) if with_bias else None
    scale = None if static is None else torch.tensor(static)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, bias, scale, "int8", x_gran)
    assert len(int_mm_calls) == 1  # the integer kernel ran, not the float reference
    want = ref.int8_linear(x, weight, weight_scale, bias, scale, "int8", x_gran)
    assert got.shape == want.shape == (*shape[:-1], n)
    assert _rel(got, want) <= REL_TOL
    assert _rel(got, _float64_product(x, weight, weight_scale, bias, scale, x_gran)) <= REL_TOL


def test_int8_fast_path_huge_and_tiny_values():
    # Outputs near 1e36: finite, but acc · s_x alone (about 1e39) would overflow float32.
    x = torch.tensor([[3e36, -1e36, 5.0, 0.0], [1e-30, -2e-30, 0.0, 3e-31]])
    weight, weight_scale = _weight(6, 4, "channel", 1)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    want = _float64_product(x, weight, weight_scale, None, None, "token")
    assert torch.isfinite(got).all()
    for row in range(2):  # each token has its own scale: compare each row at its own magnitude
        assert _rel(got[row], want[row]) <= REL_TOL


def test_int8_fast_path_bfloat16_input_keeps_dtype():
    x = torch.randn(4, 32).bfloat16()
    weight, weight_scale = _weight(16, 32, "channel", 2)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    want = ref.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    assert got.dtype == torch.bfloat16
    assert _rel(got.float(), want.float()) <= 1e-2  # both end in a bfloat16 rounding of the same float32 value


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("static", [None, 0.1], ids=["dynamic", "static"])
def test_int8_fast_path_rejects_non_finite_input(bad, static):
    x = torch.randn(3, 16)
    x[1, 4] = bad
    weight, weight_scale = _weight(8, 16, "channel", 3)
    scale = None if static is None else torch.tensor(static)
    with pytest.raises(ValueError, match="NaN or inf"):
        torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, scale, "int8", "token")


def test_k_of_one_keeps_the_reference(int_mm_calls):
    # torch._int_mm gives wrong sums for K == 1 on the CPU; the reference must take such a layer
    x = torch.randn(5, 1)
    weight, weight_scale = _weight(3, 1, "channel", 6)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    assert not int_mm_calls
    assert _rel(got, _float64_product(x, weight, weight_scale, None, None, "token")) <= REL_TOL


def test_other_formats_keep_the_reference(int_mm_calls):
    x = torch.randn(2, 32)
    weight, weight_scale = _weight(8, 32, "channel", 4)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "none", "tensor")  # weight-only
    assert not int_mm_calls
    assert _rel(got, x.double() @ (weight.double() * weight_scale.double()).T) <= REL_TOL
    empty = torch.ops.qcompile.int8_linear(x[:0], weight, weight_scale, None, None, "int8", "token")
    assert empty.shape == (0, 8)


# ------------------------------------------------------------------------------------------- compiled


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32)).eval()


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 12, 64, generator=g) for _ in range(3)]


def _compiled_code(fn, *args):
    torch._dynamo.reset()
    with torch.no_grad():
        out, code = run_and_get_code(fn, *args)
    return out, "\n".join(code)


@pytest.mark.parametrize("recipe", ["int8_dynamic", "int8_sq"])
def test_compiled_quantized_model_runs_the_integer_kernel(recipe):
    qm = qc.quantize(_mlp(), recipe, calib=_calib(), progress=False)
    x = torch.randn(2, 7, 64)
    out, code = _compiled_code(torch.compile(qm), x)
    assert "extern_kernels._int_mm(" in code  # decomposed into the integer GEMM inside inductor's code...
    assert "torch.ops.qcompile.int8_linear" not in code  # ...not called as an opaque op
    with torch.no_grad():
        assert _rel(out, qm(x)) <= REL_TOL  # the eager QuantizedModel (itself checked against the reference above)


def _backend_and_eager(model, recipe: str, dtype: torch.dtype):
    """backend='quant' compiled by inductor, and the same quantized graph run eagerly; calibrated alike if needed."""
    compiled = torch.compile(model, backend="quant", options={"recipe": recipe})
    eager = torch.compile(model, backend="quant", options={"recipe": recipe, "compiler": "eager"})
    if recipe == "int8_sq":
        for fn in (compiled, eager):
            with qc.calibrate(fn), torch.no_grad():
                for batch in _calib():
                    fn(batch.to(dtype))
    return compiled, eager


@needs_exact_onednn
@pytest.mark.parametrize("recipe", ["int8_dynamic", "int8_sq"])
def test_backend_runs_prepacked_onednn_gemm(recipe):
    """backend='quant' freezes its INT8 graphs: inductor prepacks the weights for oneDNN's INT8 GEMM."""
    model = _mlp()
    compiled, eager = _backend_and_eager(model, recipe, torch.float32)
    torch._dynamo.reset()
    for shape in [(3, 5, 64), (2, 11, 64)]:  # a second shape recompiles, with dynamic sizes
        x = torch.randn(*shape)
        with torch.no_grad():
            out, code = run_and_get_code(compiled, x)
        code = "\n".join(code)
        assert code.count(_ONEDNN_CALL) == 2 and "_int_mm" not in code and "qcompile.int8_linear" not in code
        with torch.no_grad():
            want = eager(x)  # the same quantized graph, run by the eager CPU kernels checked above
        # Two layers: float32 rounding differences in the first can move one INT8 code of the second's input by one
        # step, about 1e-3 of the output; a wrong scale, zero point or layout is off by far more.
        assert _rel(out, want) <= 2e-3
    if recipe == "int8_dynamic":  # and against the reference lowering computed here from the float model
        hidden = torch.nn.functional.gelu(_reference_layer(model[0], x))
        assert _rel(out, _reference_layer(model[2], hidden)) <= 2e-3


_ONEDNN_CALL = "torch.ops.onednn.qlinear_pointwise"


@needs_exact_onednn
@pytest.mark.parametrize("recipe", ["int8_dynamic", "int8_sq"])
def test_backend_prepacked_gemm_keeps_bfloat16(recipe):
    compiled, eager = _backend_and_eager(_mlp().to(torch.bfloat16), recipe, torch.bfloat16)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        out, code = run_and_get_code(compiled, x)
        want = eager(x)
    assert _ONEDNN_CALL in "\n".join(code)
    assert out.dtype == want.dtype == torch.bfloat16
    # both round each layer's output to bfloat16 (2^-8 relative); one code step of the second layer's input on top
    assert _rel(out.float(), want.float()) <= 2e-2


@needs_exact_onednn
@pytest.mark.parametrize("recipe", ["int8_dynamic", "int8_sq"])
def test_compiled_quantized_model_with_freezing_runs_prepacked_gemm(recipe):
    qm = qc.quantize(_mlp(), recipe, calib=_calib(), progress=False)
    x = torch.randn(2, 7, 64)
    with torch._inductor.config.patch(freezing=True):
        out, code = _compiled_code(torch.compile(qm), x)
    assert code.count(_ONEDNN_CALL) == 2 and "_int_mm" not in code
    with torch.no_grad():
        assert _rel(out, qm(x)) <= 2e-3
    # freezing asked of inductor alone (dynamo keeps the weights as inputs): the _int_mm path, not a broken prepack
    out, code = _compiled_code(torch.compile(qm, options={"freezing": True}), x)
    assert "extern_kernels._int_mm(" in code and _ONEDNN_CALL not in code
    with torch.no_grad():
        assert _rel(out, qm(x)) <= REL_TOL


@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_onednn_pattern_computes_the_int8_product(granularity):
    """The rewritten graph, run eagerly (dequantize ops as float math on integer values), is the reference."""
    x = torch.randn(3, 6, 40) * 2
    x[0, 1] = 0.0
    weight, weight_scale = _weight(24, 40, "channel", 7)
    bias = torch.randn(24)
    scale = torch.tensor(0.03) if granularity == "tensor" else None

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, value in [("w", weight), ("ws", weight_scale), ("b", bias), ("s", scale)]:
                if value is not None:
                    self.register_buffer(name, value)

        def forward(self, x):
            s = None if scale is None else self.s
            return torch.ops.qcompile.int8_linear.default(x, self.w, self.ws, self.b, s, "int8", granularity)

    gm = torch.fx.symbolic_trace(Layer())
    assert onednn.rewrite_int8_linears(gm) == 1
    assert not any(node.target is torch.ops.qcompile.int8_linear.default for node in gm.graph.nodes)
    got = gm(x)
    assert _rel(got, _float64_product(x, weight, weight_scale, bias, scale, granularity)) <= REL_TOL
    x[2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        gm(x)


def test_onednn_rewrite_leaves_other_layers_alone():
    weight, weight_scale = _weight(8, 16, "channel", 8)

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", weight)
            self.register_buffer("ws", weight_scale)
            self.register_buffer("k1", weight[:, :1].contiguous())

        def forward(self, x):
            weight_only = torch.ops.qcompile.int8_linear.default(x, self.w, self.ws, None, None, "none", "tensor")
            k_of_one = torch.ops.qcompile.int8_linear.default(x[..., :1], self.k1, self.ws, None, None, "int8", "token")
            return weight_only + k_of_one

    gm = torch.fx.symbolic_trace(Layers())
    assert onednn.rewrite_int8_linears(gm) == 0


def test_quantized_model_keeps_one_copy_of_its_tensors():
    qm = qc.quantize(_mlp(), "int8_dynamic", calib=_calib(), progress=False)
    assert all(not name.startswith("_frozen") for name in qm.state_dict())
    frozen = dict(qm._frozen_graph_module.named_buffers())
    assert frozen and all(value is qm.graph_module.get_buffer(name) for name, value in frozen.items())
    qm.to(torch.float32)  # a move rebuilds the frozen variant on the moved tensors
    assert all(value is qm.graph_module.get_buffer(name) for name, value in qm._frozen_graph_module.named_buffers())
    state = {name: value.clone() for name, value in qm.state_dict().items()}
    qm.load_state_dict(state, assign=True)  # so does loading new tensors in place of the old ones
    assert all(value is qm.graph_module.get_buffer(name) for name, value in qm._frozen_graph_module.named_buffers())
    assert any(value is state[f"graph_module.{name}"] for name, value in qm._frozen_graph_module.named_buffers())


def _reference_layer(linear, x):
    w = numerics.quantize_int8(linear.weight.detach(), "channel")
    return ref.int8_linear(x, w.q, w.scale, linear.bias.detach(), None, "int8", "token")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("entry", ["quantize", "quantize_frozen", "backend_int8_sq", "backend_int8_dynamic"])
def test_compiled_fast_path_rejects_non_finite_input(bad, entry):
    if entry.startswith("quantize"):
        compiled = torch.compile(qc.quantize(_mlp(), "int8_sq", calib=_calib(), progress=False))
        if entry == "quantize_frozen":  # traced and compiled under inductor's freezing flag
            compiled = _traced_with_freezing(compiled)
    else:
        recipe = entry.removeprefix("backend_")
        compiled = torch.compile(_mlp(), backend="quant", options={"recipe": recipe})
        if recipe == "int8_sq":
            with qc.calibrate(compiled), torch.no_grad():
                for batch in _calib():
                    compiled(batch)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        compiled(x)
        x[1, 2, 3] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            compiled(x)


class _Overflow(torch.nn.Module):
    def forward(self, h):
        return h * 1e30 * 1e30  # inf wherever h is not tiny


@pytest.mark.parametrize("entry", ["quantize_frozen", "backend_int8_dynamic"])
def test_compiled_fast_path_rejects_non_finite_hidden_input(entry):
    """An inf made between two quantized layers (not in the graph's input) is caught at the second one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), _Overflow(), torch.nn.Linear(32, 16)).eval()
    if entry == "quantize_frozen":
        compiled = _traced_with_freezing(torch.compile(qc.quantize(model, "int8_dynamic", calib=_calib(),
                                                                    progress=False)))
    else:
        compiled = torch.compile(model, backend="quant", options={"recipe": "int8_dynamic"})
    with torch.no_grad(), pytest.raises(ValueError, match="NaN or inf"):
        compiled(torch.randn(2, 7, 64))


def test_check_finite_amax_reads_every_value_of_every_tensor():
    finite = [torch.rand(5, 1), torch.rand(()), torch.rand(3)]
    assert cpu_lowering.check_finite_amax(finite).item() == 1.0
    for bad in (float("nan"), float("inf")):
        for index in range(len(finite)):
            amaxes = [t.clone() for t in finite]
            amaxes[index].reshape(-1)[-1] = bad  # the last value of one tensor among several
            with pytest.raises(ValueError, match="NaN or inf"):
                cpu_lowering.check_finite_amax(amaxes)


def test_integer_gemm_gate_matches_the_kernels(monkeypatch):
    """The real gate says yes exactly where oneDNN's u8×s8 GEMM sums extreme codes exactly (fresh random ones)."""
    monkeypatch.undo()
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
    assert cpu_lowering.has_fast_int8_gemm() == exact
    if not exact:  # and the layers then take the reference
        assert not cpu_lowering.takes_integer_gemm(torch.float32, 256, weight, "int8", "token")


@pytest.mark.parametrize("recipe", ["int8_dynamic", "int8_sq"])
def test_without_fast_integer_gemm_the_reference_runs(recipe, monkeypatch, int_mm_calls):
    """A CPU without VNNI or AVX2: eager, compiled and backend='quant' all compute the reference, with no integer
    kernel."""
    monkeypatch.setattr(cpu_lowering, "has_fast_int8_gemm", lambda: False)
    monkeypatch.setattr(native, "has_int8_gemm", lambda: False)
    model = _mlp()
    qm = qc.quantize(model, recipe, calib=_calib(), progress=False)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        eager = qm(x)
    assert not int_mm_calls
    if recipe == "int8_dynamic":
        hidden = torch.nn.functional.gelu(_reference_layer(model[0], x))
        assert _rel(eager, _reference_layer(model[2], hidden)) <= REL_TOL
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled, _ = _compiled_code(torch.compile(qm), x)
        backend, eager_backend = _backend_and_eager(model, recipe, torch.float32)
        torch._dynamo.reset()
        with torch.no_grad():
            out, code = run_and_get_code(backend, x)
    code = "\n".join(code)
    assert "_int_mm" not in code and _ONEDNN_CALL not in code
    assert _rel(compiled, eager) <= 1e-4  # inductor's fused float kernels round differently from eager's
    with torch.no_grad():
        assert _rel(out, eager_backend(x)) <= 1e-4


def test_compiled_layers_the_decompositions_decline_run_the_op():
    """Weight-only INT8, K = 1 and block-wise FP8 are not decomposed: inductor calls the op's own CPU kernel."""
    w, ws = _weight(8, 32, "channel", 12)
    k1, k1_scale = _weight(8, 1, "channel", 13)
    fp8 = numerics.quantize_fp8(torch.randn(256, 128), "block", block_size=128)

    def layers(x):
        weight_only = torch.ops.qcompile.int8_linear(x, w, ws, None, None, "none", "tensor")
        k_of_one = torch.ops.qcompile.int8_linear(x[..., :1], k1, k1_scale, None, None, "int8", "token")
        blocks = torch.ops.qcompile.fp8_linear(torch.cat([x] * 4, -1), fp8.q, fp8.scale, 128, None, None,
                                               "fp8_e4m3", "token")
        return weight_only + k_of_one, blocks

    x = torch.randn(3, 5, 32)
    with torch._inductor.config.patch(fx_graph_cache=False):
        (got, got_blocks), code = _compiled_code(torch.compile(layers), x)
    want, want_blocks = layers(x)
    # the INT8 kernel through its twin without autograd (qcompile::cpu_int8_linear), FP8 through the op itself
    assert "torch.ops.qcompile.cpu_int8_linear.default(" in code and "torch.ops.qcompile.fp8_linear.default(" in code
    assert _rel(got, want) <= REL_TOL and _rel(got_blocks, want_blocks) <= REL_TOL


def _traced_with_freezing(compiled):
    def call(x):
        with torch._inductor.config.patch(freezing=True):
            return compiled(x)

    return call


def test_decomposition_leaves_other_devices_alone():
    meta = torch.empty(2, 8, device="meta")
    weight, weight_scale = _weight(4, 8, "channel", 5)
    assert cpu_lowering.decompose_int8_linear(
        meta, weight.to("meta"), weight_scale.to("meta"), None, None, "int8", "token"
    ) is NotImplemented


# ------------------------------------------------------------------------------- 4-bit weight-only kernel

needs_native = pytest.mark.skipif(native.load() is None, reason="no C compiler: the CPU weight-only kernel is off")


@pytest.fixture
def native_calls(monkeypatch) -> list:
    """Records which native entry point ran: 'linear' (straight from the codes) or 'dequantize' (then GEMM)."""
    calls = []
    for name in ("linear", "dequantize"):
        real = getattr(native, name)

        def spy(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(native, name, spy)
    return calls


def _int4_args(w, fmt, group):
    if fmt == "nvfp4":
        t = numerics.quantize_nvfp4(w)
        return "nvfp4_linear", (t.packed, t.block_scale, t.global_scale, w.shape[1])
    symmetric = fmt != "int4_asym"
    bits = 3 if fmt == "int3" else 4
    t = numerics.quantize_int4(w, group, symmetric=symmetric, bits=bits)
    return "int4_linear", (t.packed, t.scale, t.zero_point, group, bits, w.shape[1])


WEIGHT_CASES = [
    # (format, x shape, N, K group, input format, input granularity)
    ("int4", (1, 1, 576), 96, 128, "none", "tensor"),  # a decode step, K not a multiple of the group
    ("int4", (3, 256), 40, 128, "none", "tensor"),
    ("int4_asym", (2, 5, 200), 33, 64, "none", "tensor"),
    ("int3", (4, 130), 17, 32, "none", "tensor"),
    ("nvfp4", (1, 1, 100), 24, 16, "none", "tensor"),  # K = 100: 6.25 blocks of 16
    ("nvfp4", (8, 64), 8, 16, "nvfp4", "block"),  # NVFP4 activations too
    ("int4", (5, 256), 16, 128, "fp8_e4m3", "tensor"),  # W4A8
    ("int4", (3, 7, 96), 20, 32, "none", "tensor"),  # 21 rows: dequantize once, then the float GEMM
    ("nvfp4", (40, 48), 9, 16, "none", "tensor"),
    ("int4", (2, 6), 3, 2, "none", "tensor"),  # tiny K: no full 16-byte chunk, the scalar tail only
]


@needs_native
@pytest.mark.parametrize("case", WEIGHT_CASES, ids=[f"{c[0]}-x{c[1]}-n{c[2]}-g{c[3]}-{c[4]}" for c in WEIGHT_CASES])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_weight_only_kernel_matches_reference(case, with_bias, native_calls):
    fmt, shape, n, group, input_format, granularity = case
    g = torch.Generator().manual_seed(n * 7 + len(shape))
    w = torch.randn(n, shape[-1], generator=g)
    w[0] = 0.0  # an all-zero row: every group scale is the substitute 1.0
    w[-1, :3] *= 1e4  # one outlier group
    x = torch.randn(*shape, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    op, weight = _int4_args(w, fmt, group)
    input_scale = torch.tensor(x.abs().max().item() / 448.0) if input_format == "fp8_e4m3" else None
    if input_format == "nvfp4":
        input_scale = torch.tensor(x.abs().max().item() / (6.0 * 448.0))
    args = (x, *weight, bias, input_scale, input_format, granularity)
    got = getattr(torch.ops.qcompile, op)(*args)
    want = getattr(ref, op)(*args)
    rows = x.numel() // shape[-1]
    assert native_calls == ["linear" if rows <= cpu_lowering.SMALL_BATCH else "dequantize"]
    assert got.shape == want.shape == (*shape[:-1], n)
    assert _rel(got, want) <= REL_TOL


@needs_native
@pytest.mark.parametrize("fmt", ["int4", "int4_asym", "int3", "nvfp4"])
def test_weight_only_dequantize_is_exact(fmt):
    # weights over six orders of magnitude, K = 300 (not a multiple of any group)
    w = torch.randn(37, 300, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 3, 300)
    library = native.load()
    if fmt == "nvfp4":
        t = numerics.quantize_nvfp4(w)
        weight, want = cpu_lowering.nvfp4_weight(t.packed, t.block_scale, t.global_scale, 300), numerics.dequantize_nvfp4(t)
    else:
        t = numerics.quantize_int4(w, 64, symmetric=fmt != "int4_asym", bits=3 if fmt == "int3" else 4)
        weight = cpu_lowering.int4_weight(t.packed, t.scale, t.zero_point, 64, 300)
        want = numerics.dequantize_int4(t)
    assert torch.equal(native.dequantize(library, weight), want)  # bit for bit


@needs_native
def test_weight_only_kernel_propagates_non_finite_input():
    # weight-only layers do not quantize their input: NaN/inf pass through as the float reference passes them
    w = torch.randn(8, 64)
    op, weight = _int4_args(w, "int4", 32)
    x = torch.randn(2, 64)
    x[1, 5] = float("nan")
    got = torch.ops.qcompile.int4_linear(x, *weight, None, None, "none", "tensor")
    assert torch.isnan(got[1]).all() and torch.isfinite(got[0]).all()


@needs_native
def test_weight_only_kernel_view_is_cached_per_weight_and_follows_changes(native_calls):
    import gc
    import weakref

    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 64, generator=g)

    def layer():
        return _int4_args(torch.randn(16, 64, generator=g), "nvfp4", 16)[1]

    def run(weight):
        return torch.ops.qcompile.nvfp4_linear(x, *weight, None, None, "none", "block")

    def want(weight):
        return ref.nvfp4_linear(x, *weight, None, None, "none", "block")

    weight = layer()
    first = run(weight)
    assert _rel(first, want(weight)) <= REL_TOL
    cached = dict(cpu_lowering._WEIGHTS)
    assert _rel(run(weight), first) == 0 and cpu_lowering._WEIGHTS.keys() == cached.keys()  # built once
    weight[0].bitwise_xor_(0x11)  # the codes change in place: the next call sees them
    assert _rel(run(weight), want(weight)) <= REL_TOL and _rel(run(weight), first) > 0.01
    weight[2].mul_(2.0)  # and the global scale
    assert _rel(run(weight), want(weight)) <= REL_TOL
    # the cache keeps no weight alive, and a new weight (likely at the freed addresses) is not served the old view
    alive = weakref.ref(weight[0])
    del weight
    gc.collect()
    assert alive() is None
    for _ in range(3):
        other = layer()
        assert _rel(run(other), want(other)) <= REL_TOL
        del other


def test_weight_only_falls_back_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failed", False)
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(native, "_compiler", lambda: "false")
    with pytest.warns(UserWarning, match="CPU kernels are unavailable"):
        assert native.load() is None
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind
    w = torch.randn(8, 64)
    op, weight = _int4_args(w, "int4", 32)
    x = torch.randn(2, 64)
    got = torch.ops.qcompile.int4_linear(x, *weight, None, None, "none", "tensor")
    assert _rel(got, ref.int4_linear(x, *weight, None, None, "none", "tensor")) == 0.0  # the reference itself


@needs_native
def test_native_build_is_cached_and_atomic(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failed", False)
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    assert native.load() is not None
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # one library, no temporary files
    first = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_library", None)
    assert native.load() is not None
    assert built[0].stat().st_mtime_ns == first  # reused, not rebuilt


@needs_native
@pytest.mark.parametrize("recipe", ["nvfp4_weight_only", "int4_awq"])
def test_compiled_weight_only_model_runs_the_kernel(recipe, native_calls):
    model = _mlp()
    qm = qc.quantize(model, recipe, calib=_calib(), progress=False)
    compiled = torch.compile(qm)
    x = torch.randn(1, 1, 64)  # a decode-sized batch
    with torch.no_grad():
        got = compiled(x)
    assert native_calls.count("linear") >= 2  # both layers, from inside the compiled graph
    native_calls.clear()
    with torch.no_grad(), _reference_kernels():
        want = qm(x)
    assert not native_calls
    assert _rel(got, want) <= 1e-4  # the second layer's input went through GELU compiled two ways


@needs_native
@pytest.mark.parametrize("recipe,op", [("int4_awq", "int4_linear"), ("nvfp4_weight_only", "nvfp4_linear")])
def test_compiled_graphs_call_the_kernel_twin_without_autograd(recipe, op):
    """Inductor calls `qcompile::cpu_<op>` (same schema and kernel, no autograd layer), and the twin computes what
    the public op computes."""
    qm = qc.quantize(_mlp(), recipe, calib=_calib(), progress=False)
    x = torch.randn(1, 1, 64)
    out, code = _compiled_code(torch.compile(qm), x)
    assert f"torch.ops.qcompile.cpu_{op}.default(" in code and f"torch.ops.qcompile.{op}.default(" not in code
    with torch.no_grad():
        assert _rel(out, qm(x)) <= 1e-4
    public, twin = getattr(torch.ops.qcompile, op).default, getattr(torch.ops.qcompile, f"cpu_{op}").default
    assert str(twin._schema).replace(f"cpu_{op}", op) == str(public._schema)
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(twin.name(), "Autograd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(public.name(), "Autograd")


def _ops_called(fn, *args) -> set:
    """Names of the `qcompile::` linear ops that one call of `fn` dispatches (from the profiler's events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*args)
    return {event.name for event in prof.events() if event.name.startswith("qcompile::") and "linear" in event.name}


@pytest.mark.parametrize("recipe,op", [("int8_dynamic", "int8_linear"), ("int4_awq", "int4_linear"),
                                       ("nvfp4_weight_only", "nvfp4_linear")])
def test_eager_calls_without_autograd_take_the_twins(recipe, op):
    """Eager calls under no_grad / inference_mode run the twins (no autograd layer), the same values bit for bit;
    with autograd on, the public ops (gradients flow); off the CPU, no twin graph at all."""
    qm = qc.quantize(_mlp(), recipe, calib=_calib(), progress=False)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert _ops_called(qm, x) == {f"qcompile::cpu_{op}"}
        fast = qm(x)
    with torch.inference_mode():
        assert _ops_called(qm, x) == {f"qcompile::cpu_{op}"}
    assert _ops_called(qm, x) == {f"qcompile::{op}"}  # grad mode on: the public op, which has autograd
    slow = qm(x)
    assert torch.equal(fast, slow.detach())
    x.requires_grad_(True)
    qm(x).sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)

    qm.to(torch.device("meta"))  # tensors off the CPU: the twins (CPU kernels only) must not be used
    assert qm._inference_graph_module is None


class _reference_kernels:
    """Runs the ops on the plain-PyTorch reference while active."""

    def __enter__(self):
        self._saved = native._library, native._failed
        native._library, native._failed = None, True

    def __exit__(self, *exc):
        native._library, native._failed = self._saved


# ------------------------------------------------------------------- INT8 kernel for CPUs with AVX2, no VNNI

needs_native_int8 = pytest.mark.skipif(not native.has_int8_gemm(), reason="no C compiler or no AVX2: no INT8 kernel")


@pytest.fixture
def avx2_int8_calls(monkeypatch) -> list:
    """A CPU without an INT8 dot product (the gate says so, whatever this one has); records the INT8 kernel's calls
    as (M, K, N, static scale given), with the activation's name after them when it applies one; a call for several
    weights as ("shared", M, K, (N, ...), static scale given, (activation, ...))."""
    monkeypatch.setattr(cpu_lowering, "has_fast_int8_gemm", lambda: False)
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


def _integer_formula(x, weight, weight_scale, bias, input_scale, granularity):
    """What the kernel must return bit for bit: the reference quantizer's codes and scales, the integer product
    (exact in float64: |sum| < 2^53), then acc · s_w · s_x + bias rounded in float32 in that order."""
    xq = numerics.quantize_int8(x.float().reshape(-1, x.shape[-1]), granularity, scale=input_scale)
    acc = (xq.q.double() @ weight.double().T).float()
    out = acc * weight_scale.float().reshape(1, -1) * xq.scale.reshape(-1, 1)
    out = out if bias is None else out + bias.float()
    return out.reshape(*x.shape[:-1], weight.shape[0])


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
    weight, weight_scale = _weight(n, shape[-1], w_gran, n)
    bias = torch.randn(n, generator=g) if with_bias else None
    scale = None if static is None else torch.tensor(static)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, bias, scale, "int8", x_gran)
    assert len(avx2_int8_calls) == 1 and not int_mm_calls  # the C kernel ran, not a float or oneDNN path
    assert torch.equal(got, _integer_formula(x, weight, weight_scale, bias, scale, x_gran))
    want = ref.int8_linear(x, weight, weight_scale, bias, scale, "int8", x_gran)
    assert _rel(got, want) <= REL_TOL  # and the reference (float32 GEMM of dequantized values) agrees


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
    assert torch.equal(got, _integer_formula(x, weight, weight_scale, None, None, "token"))
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
    assert torch.equal(got, _integer_formula(x, weight, weight_scale, bias, None, "token"))
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
    assert torch.equal(got, _integer_formula(x, weight, weight_scale, None, None, "token"))


def test_avx2_int8_kernel_takes_no_more_input_features_than_its_sums_hold(avx2_int8_calls, int_mm_calls):
    k = native.INT8_KERNEL_MAX_K + 1
    weight = torch.full((2, k), 127, dtype=torch.int8)
    x = torch.full((1, k), 1.0)
    weight_scale = torch.tensor([[1e-3], [2e-3]])
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    assert not avx2_int8_calls  # the reference ran, not the kernel (float32 sums of the dequantized values)
    # a float32 sum of K equal terms: relative error up to K · 2^-24
    assert _rel(got, _integer_formula(x, weight, weight_scale, None, None, "token")) <= k * 2**-24
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
    weight, weight_scale = _weight(8, 38, "channel", 3)
    scale = None if static is None else torch.tensor(static)
    with pytest.raises(ValueError, match="NaN or inf"):
        torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, scale, "int8", "token")


@needs_native_int8
@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
def test_avx2_int8_kernel_rejects_a_bad_static_scale(bad, avx2_int8_calls):
    weight, weight_scale = _weight(8, 16, "channel", 3)
    with pytest.raises(ValueError, match="static int8 input scale"):
        torch.ops.qcompile.int8_linear(torch.randn(3, 16), weight, weight_scale, None, torch.tensor(bad), "int8",
                                       "tensor")


@needs_native_int8
def test_avx2_int8_kernel_static_scale_of_zero_means_one(avx2_int8_calls):
    """As in the reference, a calibrated scale of 0 (an input that was all zeros) is replaced by 1."""
    x = torch.tensor([[0.4, -2.6, 300.0, 0.0]])
    weight, weight_scale = _weight(5, 4, "channel", 8)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, torch.tensor(0.0), "int8", "tensor")
    codes = torch.tensor([[0.0, -3.0, 127.0, 0.0]])  # hand-rounded (half to even), clamped at 127
    want = (codes.double() @ weight.double().T).float() * weight_scale.reshape(1, -1)
    assert torch.equal(got, want)


@needs_native_int8
def test_avx2_int8_kernel_bfloat16_input_keeps_dtype(avx2_int8_calls):
    x = torch.randn(4, 32).bfloat16()
    weight, weight_scale = _weight(16, 32, "channel", 2)
    got = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    assert len(avx2_int8_calls) == 1 and got.dtype == torch.bfloat16
    assert torch.equal(got, _integer_formula(x, weight, weight_scale, None, None, "token").bfloat16())


@needs_native_int8
def test_avx2_int8_weight_is_packed_once_and_follows_changes(avx2_int8_calls, monkeypatch):
    packs = []
    real = native.Int8Weight

    def counting(*args):
        packs.append(1)
        return real(*args)

    monkeypatch.setattr(native, "Int8Weight", counting)
    weight, weight_scale = _weight(24, 48, "channel", 9)
    x = torch.randn(5, 48)
    first = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    again = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    assert torch.equal(first, again) and len(packs) == 1
    with torch.no_grad():
        weight.neg_()  # in place: the packed copy must not be reused
    changed = torch.ops.qcompile.int8_linear(x, weight, weight_scale, None, None, "int8", "token")
    assert len(packs) == 2 and torch.equal(changed, _integer_formula(x, weight, weight_scale, None, None, "token"))


@needs_native_int8
@pytest.mark.parametrize("recipe", ["int8_dynamic", "int8_sq"])
def test_avx2_int8_kernel_runs_eager_compiled_and_in_the_backend(recipe, avx2_int8_calls, int_mm_calls):
    """Without VNNI, every entry point runs the C kernel (the op is called whole from compiled code) and matches the
    reference lowering."""
    model = _mlp()
    qm = qc.quantize(model, recipe, calib=_calib(), progress=False)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        eager = qm(x)
    assert len(avx2_int8_calls) == 2  # both layers
    with torch.no_grad(), _reference_kernels():
        assert _rel(eager, qm(x)) <= REL_TOL
    with torch._inductor.config.patch(fx_graph_cache=False):
        for fn in (torch.compile(qm), _traced_with_freezing(torch.compile(qm))):
            avx2_int8_calls.clear()
            compiled, code = _compiled_code(fn, x)
            assert "torch.ops.qcompile.cpu_int8_linear.default(" in code and len(avx2_int8_calls) == 2
            assert _rel(compiled, eager) <= 1e-4  # GELU compiled vs eager between the layers
        backend, eager_backend = _backend_and_eager(model, recipe, torch.float32)
        torch._dynamo.reset()
        avx2_int8_calls.clear()
        with torch.no_grad():
            out, code = run_and_get_code(backend, x)
    assert "torch.ops.qcompile.cpu_int8_linear.default(" in "\n".join(code) and len(avx2_int8_calls) == 2
    assert not int_mm_calls
    with torch.no_grad():
        assert _rel(out, eager_backend(x)) <= 1e-4


# ------------------------------------------------------------------- activations fused into the INT8 kernel

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
    weight, weight_scale = _weight(n, shape[-1], "channel" if static is None else "tensor", n)
    bias = torch.randn(n, generator=g)
    scale = None if static is None else torch.tensor(static)
    granularity = "token" if static is None else "tensor"
    got = torch.ops.qcompile.cpu_int8_linear_activation(x, weight, weight_scale, bias, scale, "int8", granularity,
                                                        activation)
    assert avx2_int8_calls == [(*x.reshape(-1, shape[-1]).shape, n, static is not None, activation)]  # one call
    want = _ACTIVATIONS64[activation](_integer_formula(x, weight, weight_scale, bias, scale, granularity).double())
    assert ((got.double() - want).abs() <= 1e-6 * want.abs() + 1e-35).all()


def test_fused_op_rejects_an_unknown_activation():
    weight, weight_scale = _weight(4, 8, "channel", 1)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        torch.ops.qcompile.cpu_int8_linear_activation(torch.randn(2, 8), weight, weight_scale, None, None, "int8",
                                                      "token", "relu")
    if native.has_int8_gemm():
        with pytest.raises(ValueError, match="unknown activation"):
            native.int8_linear(native.load(), torch.randn(2, 8), native.Int8Weight(native.load(), weight,
                                                                                   weight_scale), None, None, "tanh")


def test_fused_op_without_the_kernel_is_the_op_then_the_activation():
    """On a CPU where the INT8 kernel does not run (here: one with an INT8 dot product, as the fixture says), the op
    is the layer (its integer GEMM) followed by PyTorch's activation."""
    x = torch.randn(3, 5, 32)
    weight, weight_scale = _weight(16, 32, "channel", 6)
    bias = torch.randn(16)
    got = torch.ops.qcompile.cpu_int8_linear_activation(x, weight, weight_scale, bias, None, "int8", "token", "silu")
    layer = torch.ops.qcompile.int8_linear(x, weight, weight_scale, bias, None, "int8", "token")
    assert torch.equal(got, torch.nn.functional.silu(layer))


class _Block(torch.nn.Module):
    """GELU and SiLU after INT8 layers, one layer whose output also feeds a residual, one tanh-form GELU."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.up, self.mid, self.side, self.tanh, self.down = (
            torch.nn.Linear(32, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 64),
            torch.nn.Linear(64, 16))

    def forward(self, x):
        h = torch.nn.functional.gelu(self.up(x))
        h = torch.nn.functional.silu(self.mid(h))
        s = self.side(h)
        h = torch.nn.functional.gelu(s) + s  # two users: the layer's own output is needed, no fusion
        h = torch.nn.functional.gelu(self.tanh(h), approximate="tanh")  # not the erf form: no fusion
        return self.down(h)


def _fused_ops(gm) -> list[str]:
    return [n.args[-1] for n in gm.graph.nodes if n.target == torch.ops.qcompile.cpu_int8_linear_activation.default]


@needs_native_int8
def test_activation_fusion_in_every_entry_point(avx2_int8_calls):
    model = _Block().eval()
    qm = qc.quantize(model, "int8_dynamic", calib=[torch.randn(4, 9, 32)], progress=False)
    assert _fused_ops(qm._inference_graph_module) == ["gelu", "silu"]
    assert _fused_ops(qm._fused_graph_module) == ["gelu", "silu"]
    assert not _fused_ops(qm.graph_module)  # the graph with autograd keeps the public ops
    x = torch.randn(2, 9, 32)
    with _reference_kernels(), torch.no_grad():
        reference = qm(x)  # the reference lowering, activations in PyTorch
    with torch.no_grad():
        eager = qm(x)
    assert [c[4:] for c in avx2_int8_calls] == [("gelu",), ("silu",), (), (), ()]
    assert _rel(eager, reference) <= 1e-4  # PyTorch's float32 GELU vs the kernel's, through four more layers
    unfused = qm(x)  # autograd on: the public ops, activations apart
    assert _rel(eager, unfused) <= 1e-5
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled, code = _compiled_code(torch.compile(qm), x)
        assert code.count("torch.ops.qcompile.cpu_int8_linear_activation.default(") == 2
        assert _rel(compiled, eager) <= 1e-5
        backend = torch.compile(model, backend="quant", options={"recipe": "int8_dynamic"})
        torch._dynamo.reset()
        with torch.no_grad():
            out, codes = run_and_get_code(backend, x)
    assert "\n".join(codes).count("torch.ops.qcompile.cpu_int8_linear_activation.default(") == 2
    assert _rel(out, eager) <= 1e-5


def test_no_activation_fusion_where_the_kernel_does_not_run():
    """With an INT8 dot product (the fixture's CPU), inductor's integer GEMM path keeps the public ops."""
    qm = qc.quantize(_Block().eval(), "int8_dynamic", calib=[torch.randn(4, 9, 32)], progress=False)
    assert qm._fused_graph_module is None and not _fused_ops(qm._inference_graph_module)
    qm = qc.quantize(_Attention().eval(), "int8_dynamic", calib=[torch.randn(2, 6, 32)], progress=False)
    assert qm._fused_graph_module is None and not _shared_calls(qm._inference_graph_module)


# ------------------------------------------------------------------- layers reading one tensor, one kernel call


@needs_native_int8
@pytest.mark.parametrize("shape,static", [((7, 33), None), ((2, 61, 800), None), ((1, 1, 384), None),
                                          ((31, 130), 0.05), ((3, 5, 40), "tensor")],
                         ids=["edges", "two-blocks", "decode", "static", "dynamic-tensor"])
def test_shared_input_op_is_the_separate_layers_bit_for_bit(shape, static, avx2_int8_calls):
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g) * 2
    ns, activations = (17, 64, 5), ["gelu", "none", "silu"]
    weights = [_weight(n, shape[-1], "channel", n) for n in ns]
    biases = [torch.randn(17, generator=g), None, torch.randn(5, generator=g)]
    scale = torch.tensor(static) if isinstance(static, float) else None
    granularity = "token" if static is None else "tensor"
    got = torch.ops.qcompile.cpu_int8_linear_shared(x, [w for w, _ in weights], [s for _, s in weights], biases,
                                                    scale, "int8", granularity, activations)
    rows = x.reshape(-1, shape[-1]).shape[0]
    # one call for the three
    assert avx2_int8_calls == [("shared", rows, shape[-1], ns, static is not None, tuple(activations))]
    for out, (w, s), b, activation in zip(got, weights, biases, activations):
        layer = _integer_formula(x, w, s, b, scale, granularity)
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
    (w1, s1), (w2, s2) = _weight(8, 24, "channel", 1), _weight(8, 24, "channel", 2)
    shared = torch.ops.qcompile.cpu_int8_linear_shared
    with pytest.raises(ValueError, match="NaN or inf"):
        shared(x, [w1, w2], [s1, s2], [None, None], None, "int8", "token", ["none", "none"])
    with pytest.raises(ValueError, match="one weight scale, one bias"):
        shared(x, [w1, w2], [s1], [None, None], None, "int8", "token", ["none", "none"])
    with pytest.raises(ValueError, match="one weight scale, one bias"):
        shared(x, [w1, w2], [s1, s2], [None, None], None, "int8", "token", ["none"])
    with pytest.raises(ValueError, match=r"unknown activation\(s\) \['relu'\]"):
        shared(x, [w1, w2], [s1, s2], [None, None], None, "int8", "token", ["relu", "none"])


class _Attention(torch.nn.Module):
    """q/k/v reading one tensor; gate (then SiLU) and up reading another."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(32, 32) for _ in range(4))
        self.gate, self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        q, k, v = (t.view(*x.shape[:-1], 4, 8).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
        attention = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        h = x + self.o(attention)
        return h + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def _shared_calls(gm) -> list[int]:
    return [len(n.args[1]) for n in gm.graph.nodes if n.target == torch.ops.qcompile.cpu_int8_linear_shared.default]


@needs_native_int8
@pytest.mark.parametrize("recipe", ["int8_dynamic", "int8_sq"])
def test_shared_input_layers_merge_in_every_entry_point(recipe, avx2_int8_calls):
    model = _Attention().eval()
    calib = [torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    qm = qc.quantize(model, recipe, calib=calib, progress=False)
    assert _shared_calls(qm._inference_graph_module) == [3, 2]  # q/k/v, gate (with its SiLU) and up
    assert _shared_calls(qm._fused_graph_module) == [3, 2] and not _shared_calls(qm.graph_module)
    # the static scales equal to the first layer's of each group, which the call reads, leave the graph
    assert not [n for n in qm._inference_graph_module.graph.nodes if n.op == "get_attr" and not n.users]
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        eager = qm(x)
    static = recipe == "int8_sq"
    expected_calls = [("shared", 12, 32, (32, 32, 32), static, ("none",) * 3), (12, 32, 32, static),
                      ("shared", 12, 32, (64, 64), static, ("silu", "none")), (12, 64, 32, static)]
    assert avx2_int8_calls == expected_calls
    assert _rel(eager, qm(x)) <= 1e-5  # the public ops one by one (autograd on); only the SiLU differs
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled, code = _compiled_code(torch.compile(qm), x)
        assert code.count("torch.ops.qcompile.cpu_int8_linear_shared.default(") == 2
        assert torch.equal(compiled, eager)
        torch._dynamo.reset()
        backend = torch.compile(model, backend="quant", options={"recipe": recipe})
        if static:
            with qc.calibrate(backend), torch.no_grad():
                for batch in calib:
                    backend(batch)
        with torch.no_grad():
            backend(x)  # compiles (int8_dynamic)
            avx2_int8_calls.clear()
            out = backend(x)
    assert avx2_int8_calls == expected_calls
    assert _rel(out, eager) <= 1e-5


@needs_native_int8
def test_layers_with_different_static_scales_stay_apart(avx2_int8_calls):
    qm = qc.quantize(_Attention().eval(), "int8_sq", calib=[torch.randn(2, 6, 32)], progress=False)
    k_layer = next(n for n in qm.graph_module.graph.nodes
                   if n.target == torch.ops.qcompile.int8_linear.default and n.args[1].target.endswith("k_weight"))
    scale = getattr(qm.graph_module, k_layer.args[4].target)
    with torch.no_grad():
        scale.mul_(1.5)  # k's calibrated scale no longer equals q's and v's
    qm._build_graph_variants()
    assert _shared_calls(qm._inference_graph_module) == [2, 2]  # q and v; gate and up


# ------------------------------------------------------------------------------------------- FP8 decomposed


@pytest.mark.parametrize("recipe", ["fp8_dynamic", "fp8"])
def test_compiled_fp8_is_decomposed_and_matches_the_reference(recipe):
    qm = qc.quantize(_mlp(), recipe, calib=_calib(), progress=False)
    x = torch.randn(2, 7, 64)
    out, code = _compiled_code(torch.compile(qm), x)
    assert "torch.ops.qcompile.fp8_linear" not in code  # fused aten ops, not the opaque reference op
    # the FP8 rounding is integer and float arithmetic, not a conversion to FP8 (scalar per element in the C++)
    assert re.search(r"(convert|static_cast)<(at::|c10::)?Float8_e4m3fn>", code) is None
    with torch.no_grad():
        # eager = the reference; two layers (see test_backend_runs_the_integer_kernel). Without the FP8 round trip
        # of the activations the error would be FP8's, ~1e-2.
        assert _rel(out, qm(x)) <= 1e-4


def _fp8_rounding_cases() -> torch.Tensor:
    """float32 values where rounding to FP8 E4M3 can go wrong, and a sweep over all float32 values |v| <= 448."""
    codes = torch.arange(0, 0x7F, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    values = codes.to(torch.float32)  # 0, 2^-9, ..., 448 (0x7F is NaN)
    midpoints = (values[:-1] + values[1:]) / 2  # exact in float32: the ties, rounded to the even code
    special = torch.tensor([2.0**-6, 2.0**-10, 2.0**-149, 2.0**-126, 1e-30, 447.99, 448.0])
    points = torch.cat([values, midpoints, special])
    up = torch.nextafter(points, torch.tensor(float("inf")))
    down = torch.nextafter(points, torch.tensor(0.0))
    top = torch.tensor(448.0).view(torch.int32).item()
    sweep = torch.arange(0, top + 1, 997, dtype=torch.int32).view(torch.float32)  # every exponent, ~1.1M values
    cases = torch.cat([points, up, down, sweep]).clamp(max=448.0)
    return torch.cat([cases, -cases])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_fp8_rounding_in_arithmetic_is_the_cast():
    v = _fp8_rounding_cases()
    want = v.to(torch.float8_e4m3fn).to(torch.float32)
    assert _same_bits(cpu_lowering.round_to_fp8_e4m3(v), want)  # signed zeros too
    assert _same_bits(torch.compile(cpu_lowering.round_to_fp8_e4m3)(v), want)  # as inductor generates it
    # hand-checked ties, which go to the even code: 1 + 1/16 between 1 and 1.125, 1 + 3/16 between 1.125 and 1.25;
    # in subnormal steps of 2^-9: 0.5, 1.5 and -4.5 steps
    ties = torch.tensor([1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, -(2.0**-7 + 2.0**-10)])
    assert cpu_lowering.round_to_fp8_e4m3(ties).tolist() == [1.0, 1.25, 0.0, 2.0**-8, -(2.0**-7)]


def test_fp8_decoding_in_arithmetic_is_the_cast():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    want = codes.to(torch.float32)
    for decode in (cpu_lowering.fp8_e4m3_to_float32, torch.compile(cpu_lowering.fp8_e4m3_to_float32)):
        got = decode(codes)
        assert torch.equal(got.isnan(), want.isnan()) and want.isnan().sum() == 2  # S.1111.111
        finite = ~want.isnan()
        assert _same_bits(got[finite], want[finite])
    assert cpu_lowering.fp8_e4m3_to_float32(codes[[0x01, 0x08, 0x38, 0x7E, 0x80, 0xB9]]).tolist() == \
        [2.0**-9, 2.0**-6, 1.0, 448.0, -0.0, -1.125]


@pytest.mark.parametrize("granularity,static", [("token", None), ("tensor", 0.02)])
def test_fp8_decomposition_is_the_reference(granularity, static):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 5, 48, generator=g)
    x[0, 0] = 0.0
    w = numerics.quantize_fp8(torch.randn(24, 48, generator=g), "channel")
    bias = torch.randn(24, generator=g)
    scale = None if static is None else torch.tensor(static)
    args = (x, w.q, w.scale, 0, bias, scale, "fp8_e4m3", granularity)
    got = cpu_lowering.decompose_fp8_linear(*args)
    assert _rel(got, ref.fp8_linear(*args)) <= REL_TOL
    assert cpu_lowering.decompose_fp8_linear(x, w.q, w.scale, 128, bias, scale, "fp8_e4m3", granularity) \
        is NotImplemented  # 128x128 block scales stay on the reference


def test_compiled_fp8_rejects_non_finite_input():
    compiled = torch.compile(qc.quantize(_mlp(), "fp8_dynamic", calib=_calib(), progress=False))
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        compiled(x)
        x[0, 1, 2] = float("inf")
        with pytest.raises(ValueError, match="NaN or inf"):
            compiled(x)


# ------------------------------------------------------------------- quantized inputs of the 4-bit kernels


def test_e2m1_rounding_in_arithmetic_is_the_encoder():
    grid = torch.tensor(numerics.E2M1_VALUES)
    points = torch.cat([grid, (grid[:-1] + grid[1:]) / 2, torch.tensor([5.5, 6.5, 7.0, 1e30, float("inf")])])
    up = torch.nextafter(points, torch.tensor(float("inf")))
    down = torch.nextafter(points, torch.tensor(0.0))
    sweep = torch.arange(0, 0x7F800000, 4099, dtype=torch.int32).view(torch.float32)  # every binade, ~520k values
    v = torch.cat([points, up, down, sweep])
    v = torch.cat([v, -v])
    want = numerics.e2m1_decode(numerics.e2m1_encode(v))
    assert _same_bits(cpu_lowering.round_to_e2m1(v), want)  # -0.0 where the encoder gives code 8
    assert _same_bits(torch.compile(cpu_lowering.round_to_e2m1)(v), want)
    # hand-checked ties to the even code: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0001, -0.1])
    assert cpu_lowering.round_to_e2m1(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -6.0, -0.0]


def _awkward_activation(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, m).unsqueeze(1)  # rows from 1e-3 to 1e2
    x[0, :16] = 0.0  # an all-zero block
    x[1, :16] = -0.0
    x[1, 16:] *= 1e-9  # blocks far below the tensor's scale
    x[2, 3] = -1e-30
    return x


@pytest.mark.parametrize("k", [64, 37])  # 37: a partial last block
@pytest.mark.parametrize("global_scale", ["calibrated", "too small", "too large"])
def test_nvfp4_input_round_trip_is_the_reference(k, global_scale):
    x = _awkward_activation(6, k, seed=k)
    calibrated = x.abs().max() / (numerics.E2M1_MAX * numerics.FP8_E4M3_MAX)
    gs = {"calibrated": calibrated, "too small": calibrated / 1e3, "too large": calibrated * 300}[global_scale]
    want = ref.quantize_input(x, "nvfp4", "block", gs)
    for fn in (cpu_lowering.fake_quantize_nvfp4_input, torch.compile(cpu_lowering.fake_quantize_nvfp4_input)):
        got = fn(x, gs)
        assert got.shape == want.shape and _same_bits(got, want)
    assert (want == 0).float().mean() < 0.9 and want.abs().max() > 0  # not all flushed: the check has teeth


@pytest.mark.parametrize("granularity,static", [("tensor", 0.05), ("tensor", None), ("token", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_input_round_trip_is_the_reference(granularity, static, dtype):
    x = _awkward_activation(5, 48, seed=3).to(dtype).reshape(5, 2, 24)
    scale = None if static is None else torch.tensor(static)
    got = cpu_lowering.fake_quantize_input(x, scale, "fp8_e4m3", granularity)
    assert got.dtype == torch.float32 and _same_bits(got, ref.quantize_input(x, "fp8_e4m3", granularity, scale))


def _max_calibrated(name: str) -> qc.Recipe:
    return dataclasses.replace(qc.RECIPES[name], algorithm="max")


@pytest.mark.parametrize("recipe", ["w4a8_awq", "nvfp4"])
def test_compiled_4bit_layers_quantize_their_input_outside_the_kernel_call(recipe):
    qm = qc.quantize(_mlp(), _max_calibrated(recipe), calib=_calib(), progress=False)
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(qm)
    out, code = _compiled_code(compiled, x)
    calls = re.findall(r"torch\.ops\.qcompile\.cpu_(?:int4|nvfp4)_linear\.default\(([^\n]*)", code)
    assert len(calls) == 2 and all("'none'" in call for call in calls), calls  # inputs come in as float32
    assert re.search(r"(convert|static_cast)<(at::|c10::)?Float8_e4m3fn>", code) is None
    with torch.no_grad():
        # the eager model quantizes inside the kernel call: the same values into the same kernel
        assert torch.equal(out, qm(x))
        x[1, 2, 3] = float("nan")
        with pytest.raises(ValueError, match="NaN or inf"):
            compiled(x)


def test_compiled_fp8_takes_an_empty_batch():
    """A static per-tensor scale: the decomposition's amax check has nothing to reduce."""
    qm = qc.quantize(_mlp(), "fp8", calib=_calib(), progress=False)
    compiled = torch.compile(qm)
    with torch.no_grad():
        compiled(torch.randn(2, 5, 64))
        out = compiled(torch.empty(2, 0, 64))
    assert out.shape == (2, 0, 32)
