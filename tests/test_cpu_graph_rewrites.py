"""Graph rewrites for CPU inference: INT8 layers as oneDNN's prepacked GEMM in frozen graphs
(qcompile.lowering.onednn), activations fused into the INT8 kernel's call (qcompile.lowering.activation_fusion),
layers that read one tensor in one call (qcompile.lowering.shared_input), and the NaN/inf checks of compiled graphs.

The oneDNN tests and the checks of compiled graphs take `integer_gemm_on_any_cpu` (the path of CPUs with an INT8 dot
product; the oneDNN tests are skipped where oneDNN's own u8×s8 kernel saturates); the fusion tests take
`avx2_int8_calls` (the fused calls are the AVX2 kernel's), and the test that nothing is fused elsewhere takes
`integer_gemm_on_any_cpu`.
"""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from cpu_helpers import (  # noqa: F401  (fixtures)
    ONEDNN_CALL,
    REL_TOL,
    avx2_int8_calls,
    backend_and_eager,
    calibration_batches,
    compiled_code,
    float64_product,
    int8_weight,
    integer_gemm_on_any_cpu,
    mlp,
    needs_native_int8,
    reference_kernels,
    reference_layer,
    rel,
    traced_with_freezing,
)
import qcompile as qc
from qcompile.lowering import onednn
from qcompile.lowering.cpu import int8 as cpu_int8


# oneDNN's u8×s8 GEMM is exact only with an INT8 dot-product instruction (see `cpu_int8.has_fast_int8_gemm`).
needs_exact_onednn = pytest.mark.skipif(
    not cpu_int8._onednn_int8_gemm_is_exact(),
    reason="oneDNN's u8×s8 GEMM saturates on this CPU (no VNNI/AMX): qcompile takes the reference path here",
)


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
@needs_exact_onednn
@pytest.mark.parametrize("recipe", ["int8_dynamic", "int8_sq"])
def test_backend_runs_prepacked_onednn_gemm(recipe):
    """backend='quant' freezes its INT8 graphs: inductor prepacks the weights for oneDNN's INT8 GEMM."""
    model = mlp()
    compiled, eager = backend_and_eager(model, recipe, torch.float32)
    torch._dynamo.reset()
    for shape in [(3, 5, 64), (2, 11, 64)]:  # a second shape recompiles, with dynamic sizes
        x = torch.randn(*shape)
        with torch.no_grad():
            out, code = run_and_get_code(compiled, x)
        code = "\n".join(code)
        assert code.count(ONEDNN_CALL) == 2 and "_int_mm" not in code and "qcompile.int8_linear" not in code
        with torch.no_grad():
            want = eager(x)  # the same quantized graph, run by the eager CPU kernels checked above
        # Two layers: float32 rounding differences in the first can move one INT8 code of the second's input by one
        # step, about 1e-3 of the output; a wrong scale, zero point or layout is off by far more.
        assert rel(out, want) <= 2e-3
    if recipe == "int8_dynamic":  # and against the reference lowering computed here from the float model
        hidden = torch.nn.functional.gelu(reference_layer(model[0], x))
        assert rel(out, reference_layer(model[2], hidden)) <= 2e-3


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
@needs_exact_onednn
@pytest.mark.parametrize("recipe", ["int8_dynamic", "int8_sq"])
def test_backend_prepacked_gemm_keeps_bfloat16(recipe):
    compiled, eager = backend_and_eager(mlp().to(torch.bfloat16), recipe, torch.bfloat16)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        out, code = run_and_get_code(compiled, x)
        want = eager(x)
    assert ONEDNN_CALL in "\n".join(code)
    assert out.dtype == want.dtype == torch.bfloat16
    # both round each layer's output to bfloat16 (2^-8 relative); one code step of the second layer's input on top
    assert rel(out.float(), want.float()) <= 2e-2


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
@needs_exact_onednn
@pytest.mark.parametrize("recipe", ["int8_dynamic", "int8_sq"])
def test_compiled_quantized_model_with_freezing_runs_prepacked_gemm(recipe):
    qm = qc.quantize(mlp(), recipe, calib=calibration_batches(), progress=False)
    x = torch.randn(2, 7, 64)
    with torch._inductor.config.patch(freezing=True):
        out, code = compiled_code(torch.compile(qm), x)
    assert code.count(ONEDNN_CALL) == 2 and "_int_mm" not in code
    with torch.no_grad():
        assert rel(out, qm(x)) <= 2e-3
    # freezing asked of inductor alone (dynamo keeps the weights as inputs): the _int_mm path, not a broken prepack
    out, code = compiled_code(torch.compile(qm, options={"freezing": True}), x)
    assert "extern_kernels._int_mm(" in code and ONEDNN_CALL not in code
    with torch.no_grad():
        assert rel(out, qm(x)) <= REL_TOL


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_onednn_pattern_computes_the_int8_product(granularity):
    """The rewritten graph, run eagerly (dequantize ops as float math on integer values), is the reference."""
    x = torch.randn(3, 6, 40) * 2
    x[0, 1] = 0.0
    weight, weight_scale = int8_weight(24, 40, "channel", 7)
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
    assert rel(got, float64_product(x, weight, weight_scale, bias, scale, granularity)) <= REL_TOL
    x[2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        gm(x)


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
def test_onednn_rewrite_leaves_other_layers_alone():
    weight, weight_scale = int8_weight(8, 16, "channel", 8)

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


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
def test_quantized_model_keeps_one_copy_of_its_tensors():
    qm = qc.quantize(mlp(), "int8_dynamic", calib=calibration_batches(), progress=False)
    assert all(not name.startswith("_frozen") for name in qm.state_dict())
    frozen = dict(qm._frozen_graph_module.named_buffers())
    assert frozen and all(value is qm.graph_module.get_buffer(name) for name, value in frozen.items())
    qm.to(torch.float32)  # a move rebuilds the frozen variant on the moved tensors
    assert all(value is qm.graph_module.get_buffer(name) for name, value in qm._frozen_graph_module.named_buffers())
    state = {name: value.clone() for name, value in qm.state_dict().items()}
    qm.load_state_dict(state, assign=True)  # so does loading new tensors in place of the old ones
    assert all(value is qm.graph_module.get_buffer(name) for name, value in qm._frozen_graph_module.named_buffers())
    assert any(value is state[f"graph_module.{name}"] for name, value in qm._frozen_graph_module.named_buffers())


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("entry", ["quantize", "quantize_frozen", "backend_int8_sq", "backend_int8_dynamic"])
def test_compiled_fast_path_rejects_non_finite_input(bad, entry):
    if entry.startswith("quantize"):
        compiled = torch.compile(qc.quantize(mlp(), "int8_sq", calib=calibration_batches(), progress=False))
        if entry == "quantize_frozen":  # traced and compiled under inductor's freezing flag
            compiled = traced_with_freezing(compiled)
    else:
        recipe = entry.removeprefix("backend_")
        compiled = torch.compile(mlp(), backend="quant", options={"recipe": recipe})
        if recipe == "int8_sq":
            with qc.calibrate(compiled), torch.no_grad():
                for batch in calibration_batches():
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


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
@pytest.mark.parametrize("entry", ["quantize_frozen", "backend_int8_dynamic"])
def test_compiled_fast_path_rejects_non_finite_hidden_input(entry):
    """An inf made between two quantized layers (not in the graph's input) is caught at the second one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), _Overflow(), torch.nn.Linear(32, 16)).eval()
    if entry == "quantize_frozen":
        compiled = traced_with_freezing(torch.compile(qc.quantize(model, "int8_dynamic", calib=calibration_batches(),
                                                                    progress=False)))
    else:
        compiled = torch.compile(model, backend="quant", options={"recipe": "int8_dynamic"})
    with torch.no_grad(), pytest.raises(ValueError, match="NaN or inf"):
        compiled(torch.randn(2, 7, 64))


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
    with reference_kernels(), torch.no_grad():
        reference = qm(x)  # the reference lowering, activations in PyTorch
    with torch.no_grad():
        eager = qm(x)
    assert [c[4:] for c in avx2_int8_calls] == [("gelu",), ("silu",), (), (), ()]
    assert rel(eager, reference) <= 1e-4  # PyTorch's float32 GELU vs the kernel's, through four more layers
    unfused = qm(x)  # autograd on: the public ops, activations apart
    assert rel(eager, unfused) <= 1e-5
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled, code = compiled_code(torch.compile(qm), x)
        assert code.count("torch.ops.qcompile.cpu_int8_linear_activation.default(") == 2
        assert rel(compiled, eager) <= 1e-5
        backend = torch.compile(model, backend="quant", options={"recipe": "int8_dynamic"})
        torch._dynamo.reset()
        with torch.no_grad():
            out, codes = run_and_get_code(backend, x)
    assert "\n".join(codes).count("torch.ops.qcompile.cpu_int8_linear_activation.default(") == 2
    assert rel(out, eager) <= 1e-5


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
def test_no_activation_fusion_where_the_kernel_does_not_run():
    """With an INT8 dot product (the fixture's CPU), inductor's integer GEMM path keeps the public ops."""
    qm = qc.quantize(_Block().eval(), "int8_dynamic", calib=[torch.randn(4, 9, 32)], progress=False)
    assert qm._fused_graph_module is None and not _fused_ops(qm._inference_graph_module)
    qm = qc.quantize(_Attention().eval(), "int8_dynamic", calib=[torch.randn(2, 6, 32)], progress=False)
    assert qm._fused_graph_module is None and not _shared_calls(qm._inference_graph_module)


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
    assert rel(eager, qm(x)) <= 1e-5  # the public ops one by one (autograd on); only the SiLU differs
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled, code = compiled_code(torch.compile(qm), x)
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
    assert rel(out, eager) <= 1e-5


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
