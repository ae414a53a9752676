"""Host side of the CUDA lowering, checked on the CPU: the autograd-free twins, launch plans (what they decide, when
they are rebuilt, that they let go of freed weights) and the `quant` backend's mode="reduce-overhead"."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from qcompile import numerics
from qcompile.lowering import torch_reference as ref

triton_lowering = pytest.importorskip("qcompile.lowering.triton")
if not triton_lowering.available():
    pytest.skip("Triton is not installed", allow_module_level=True)

from qcompile.lowering.triton import dispatch, launch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ twins


def test_twins_have_the_public_schemas_and_fakes():
    twins = triton_lowering.kernel_call_ops()
    assert {op.name() for op in twins} == {f"qcompile::{name}" for name in triton_lowering.OPS}
    for public, twin in twins.items():
        assert twin.name() == public.name().replace("qcompile::", "qcompile::cuda_")
        assert [a.name for a in twin._schema.arguments] == [a.name for a in public._schema.arguments]
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(twin.name(), "Autograd")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(twin.name(), "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(public.name(), "CUDA")
    w = numerics.quantize_int4(torch.randn(24, 64), 32)
    x = torch.empty(3, 5, 64, device="meta")
    args = (w.packed.to("meta"), w.scale.to("meta"), None, 32, 4, 64, None, None, "none", "tensor")
    out = torch.ops.qcompile.cuda_int4_linear(x, *args)
    assert out.shape == (3, 5, 24) and out.device.type == "meta"
    assert out.shape == torch.ops.qcompile.int4_linear(x, *args).shape


def test_twins_replace_only_cuda_layers():
    """A CPU graph keeps the public ops (its inductor decompositions choose the CPU kernels)."""
    w = numerics.quantize_int8(torch.randn(16, 32), "channel")
    m = nn.Module()
    m.register_buffer("w", w.q)
    m.register_buffer("s", w.scale)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    out = graph.call_function(torch.ops.qcompile.int8_linear.default,
                              (x, graph.get_attr("w"), graph.get_attr("s"), None, None, "none", "tensor"))
    graph.output(out)
    gm = torch.fx.GraphModule(m, graph)
    assert triton_lowering.use_kernel_call_ops(gm) == 0
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.ops.qcompile.int8_linear.default]


# ----------------------------------------------------------------------------------------- launch plans


@pytest.fixture
def fake_device(monkeypatch):
    """The CUDA path on CPU tensors: device checks pass, and the launchers compute the reference product of the
    operands they are given (recording each call), so a stale or wrong operand shows in the result."""
    calls = []
    monkeypatch.setattr(launch, "_device_ok", lambda t: True)

    def w4_gemm(a, a_scale, packed, scale, zero_point, group_size, global_scale, bias, out_dtype, config=None):
        assert a_scale is None
        calls.append(("w4", packed, scale))
        if global_scale is not None:
            return ref.nvfp4_linear(a, packed, scale, global_scale.reshape(()), a.shape[1], bias, None, "none",
                                    "tensor").to(out_dtype)
        return ref.int4_linear(a, packed, scale, zero_point, group_size, 4, a.shape[1], bias, None, "none",
                               "tensor").to(out_dtype)

    def w8_gemm(a, a_scale, b, b_scale, b_block, bias, out_dtype, config=None):
        assert a_scale is None and not b_block
        calls.append(("w8", b, b_scale))
        return ref.int8_linear(a, b, b_scale, bias, None, "none", "tensor").to(out_dtype)

    def w4_prepare(a, a_scale, packed, scale, zero_point, group_size, global_scale, bias, out_dtype):
        return lambda a, a_scale, packed, scale, zero_point, global_scale, bias: w4_gemm(
            a, a_scale, packed, scale, zero_point, group_size, global_scale, bias, out_dtype)

    def w8_prepare(a, a_scale, b, b_scale, b_block, bias, out_dtype, quant_a=False):
        assert not quant_a
        return lambda a, a_scale, b, b_scale, bias: w8_gemm(a, a_scale, b, b_scale, b_block, bias, out_dtype)

    monkeypatch.setattr(launch, "w4_gemm", w4_gemm)
    monkeypatch.setattr(launch, "w8_gemm", w8_gemm)
    monkeypatch.setattr(launch, "w4_prepare", w4_prepare)
    monkeypatch.setattr(launch, "w8_prepare", w8_prepare)
    monkeypatch.setattr(dispatch, "PLAN_CACHE", True)
    dispatch.clear_plans()
    yield calls
    dispatch.clear_plans()


def _int4_args(n=24, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = numerics.quantize_int4(torch.randn(n, k, generator=g), 32)
    return [w.packed, w.scale, None, 32, 4, k, None, None, "none", "tensor"]


def test_plan_is_built_once_and_matches_the_reference(fake_device):
    args = _int4_args()
    x = torch.randn(2, 3, 64)
    before = dispatch.plan_stats()["builds"]
    for _ in range(3):
        out = dispatch.int4_linear(x, *args)
        torch.testing.assert_close(out, ref.int4_linear(x, *args), rtol=0, atol=0)
    assert dispatch.plan_stats()["builds"] == before + 1
    assert len(fake_device) == 3 and all(call[1] is args[0] for call in fake_device)
    dispatch.int4_linear(x.to(torch.float16), *args)  # another activation dtype: another plan
    assert dispatch.plan_stats()["builds"] == before + 2


def test_in_place_update_rebuilds_the_plan(fake_device):
    args = _int4_args()
    x = torch.randn(4, 64)
    dispatch.int4_linear(x, *args)
    builds = dispatch.plan_stats()["builds"]
    new = _int4_args(seed=1)
    args[0].copy_(new[0])  # new codes, same tensor
    args[1].copy_(new[1])
    out = dispatch.int4_linear(x, *args)
    assert dispatch.plan_stats()["builds"] == builds + 1
    torch.testing.assert_close(out, ref.int4_linear(x, *new), rtol=0, atol=0)


def test_replaced_storage_is_checked_again(fake_device):
    """`.data =` keeps the tensor object but changes what the coverage checks saw: a shape no kernel covers now
    goes to the reference, as `dispatch.plan` says."""
    w = numerics.quantize_int8(torch.randn(16, 32), "channel")
    weight, scale = w.q.clone(), w.scale.clone()
    x = torch.randn(3, 32)
    dispatch.int8_linear(x, weight, scale, None, None, "none", "tensor")
    assert len(fake_device) == 1
    weight.data = torch.zeros(16, 48, dtype=torch.int8)  # K no longer matches x's
    assert dispatch.plan("int8_linear", x, weight, scale, None, None, "none", "tensor").startswith("reference")
    with pytest.raises(Exception):  # the reference's own shape check
        dispatch.int8_linear(x, weight, scale, None, None, "none", "tensor")
    assert len(fake_device) == 1


def test_inference_tensors_have_plans(fake_device):
    """Weights made under inference_mode keep no version counter: their plans key on identity and address."""
    with torch.inference_mode():
        args = _int4_args()
        x = torch.randn(2, 64)
        for _ in range(2):
            torch.testing.assert_close(dispatch.int4_linear(x, *args), ref.int4_linear(x, *args), rtol=0, atol=0)
    assert dispatch.plan_stats()["plans"] == 1


def test_plans_go_with_their_weights(fake_device):
    args = _int4_args()
    dispatch.int4_linear(torch.randn(1, 64), *args)
    assert dispatch.plan_stats()["plans"] == 1
    fake_device.clear()  # the recorded calls hold the weight too
    del args
    gc.collect()
    assert dispatch.plan_stats()["plans"] == 0


@pytest.mark.parametrize("cache", [True, False])
def test_plans_take_the_paths_plan_names(fake_device, monkeypatch, cache):
    """With and without the cache, each call takes the path `dispatch.plan` names: the launcher, or the reference."""
    monkeypatch.setattr(dispatch, "PLAN_CACHE", cache)
    w4 = _int4_args()
    nv = numerics.quantize_nvfp4(torch.randn(24, 64))
    i8 = numerics.quantize_int8(torch.randn(24, 64), "channel")
    cases = [
        ("int4_linear", (torch.randn(2, 64), *w4)),
        ("int4_linear", (torch.randn(2, 64), *w4[:3], 24, *w4[4:])),  # group size that does not divide K
        ("int4_linear", (torch.randn(2, 64).to(torch.int32), *w4)),  # an activation dtype no kernel takes
        ("nvfp4_linear", (torch.randn(2, 64), nv.packed, nv.block_scale, nv.global_scale, 64, None, None, "none",
                          "tensor")),
        ("int8_linear", (torch.randn(2, 64), i8.q, i8.scale, None, None, "none", "tensor")),
        ("int8_linear", (torch.randn(2, 64), i8.q, i8.scale, torch.zeros(23), None, "none", "tensor")),  # bad bias
    ]
    for name, args in cases:
        path = dispatch.plan(name, *args)
        launched = len(fake_device)
        for _ in range(2):
            try:
                getattr(dispatch, name)(*args)
            except Exception:
                assert path.startswith("reference")  # the reference refuses what no kernel covers
        assert (len(fake_device) > launched) == path.startswith("triton"), (name, path)


_INTERPRETED_CHECK = """
import torch
from qcompile import numerics
from qcompile.lowering.triton import dispatch, launch
assert launch.interpreting()
torch.manual_seed(0)
n, k = 40, 96
w = torch.randn(n, k)
t4, tn = numerics.quantize_int4(w, 32), numerics.quantize_nvfp4(w)
i8, f8 = numerics.quantize_int8(w, "channel"), numerics.quantize_fp8(w, "channel")
bias = torch.randn(n)
for m in (1, 3, 20):
    x = torch.randn(m, k, dtype=torch.float16)
    for name, args in {
        "int4_linear": (x, t4.packed, t4.scale, None, 32, 4, k, bias, None, "none", "tensor"),
        "nvfp4_linear": (x, tn.packed, tn.block_scale, tn.global_scale, k, bias, None, "none", "tensor"),
        "int8_linear": (x, i8.q, i8.scale, bias, None, "int8", "token"),
        "fp8_linear": (x, f8.q, f8.scale, 0, bias, None, "fp8_e4m3", "token"),
    }.items():
        assert dispatch.plan(name, *args).startswith("triton"), name
        outs = []
        for cache in (False, True, True):
            dispatch.PLAN_CACHE = cache
            outs.append(getattr(dispatch, name)(*args))
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), (name, m)
assert dispatch.plan_stats()["builds"] == 4, dispatch.plan_stats()
print("same")
"""


def test_plans_change_no_result_of_the_kernels():
    """On Triton's interpreter (its own process), each op gives the same bits with and without launch plans, for
    decode and prefill row counts; one plan per op serves every M."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _INTERPRETED_CHECK], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0 and "same" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]


# ---------------------------------------------------------------------------------- backend and CUDA graphs


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.norm = nn.LayerNorm(64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 50)
        self.register_buffer("shift", torch.linspace(-1, 1, 64), persistent=False)  # a buffer: static too

    def forward(self, ids):
        return self.down(torch.relu(self.up(self.norm(self.emb(ids) + self.shift.to(self.emb.weight.dtype)))))


@pytest.fixture
def small():
    torch.manual_seed(0)
    return _Small().eval(), torch.randint(0, 50, (2, 7))


def _compiled(model, ids, **kwargs):
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="quant", **kwargs)(ids)
    torch._dynamo.reset()
    return out


def test_reduce_overhead_is_accepted_on_the_cpu(small, recwarn):
    model, ids = small
    expected = _compiled(model, ids, options={"recipe": "int8_dynamic"})
    via_option = _compiled(model, ids, options={"recipe": "int8_dynamic", "mode": "reduce-overhead"})
    torch.testing.assert_close(via_option, expected, rtol=0, atol=0)
    default_recipe = _compiled(model, ids)
    via_mode = _compiled(model, ids, mode="reduce-overhead")
    torch.testing.assert_close(via_mode, default_recipe, rtol=0, atol=0)
    assert not [w for w in recwarn if "ignores mode" in str(w.message)]
    with pytest.raises(Exception, match="unknown mode"):
        _compiled(model, ids, options={"mode": "max-speed"})


def test_cudagraph_compile_keeps_the_results(small, monkeypatch):
    """The CUDA-graph compilation (parameters made graph attributes, dynamo's inputs less the parameters) run on
    the CPU, where inductor leaves CUDA graphs out: the same outputs as the plain compilation, on repeated calls."""
    from qcompile import backend

    model, ids = small
    expected = _compiled(model, ids, options={"recipe": "int8_dynamic"})
    monkeypatch.setattr(backend, "_on_cuda", lambda gm, example_inputs: True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="quant", options={"recipe": "int8_dynamic", "mode": "reduce-overhead"})
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled(ids), expected, rtol=0, atol=0)
        other = torch.randint(0, 50, (2, 7))
        torch.testing.assert_close(compiled(other), _compiled(model, other, options={"recipe": "int8_dynamic"}),
                                   rtol=0, atol=0)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ host benchmark


def test_host_overhead_benchmark_runs():
    """benchmarks/host_overhead.py (its own process: it replaces the CPU kernels) measures every op and path."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--calls", "20",
                             "--repeats", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("op "))
    for path in ("before", "public op", "twin", "dispatch, plan", "dispatch, no plan"):
        assert path in header
    for op in ("int4_linear", "nvfp4_linear", "fp8_linear", "int8_linear"):
        row = next(line for line in lines if line.startswith(op))
        assert row.count(" us") == 5


# ------------------------------------------------------------------------------------------------ on a GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_backend_graph_calls_the_twins():
    from qcompile import backend

    graphs = []

    def recording(gm, example_inputs, **kwargs):
        result = backend.quant_backend(gm, example_inputs, **kwargs)
        graphs.append(result)
        return result

    torch.manual_seed(0)
    model = _Small().cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 50, (2, 7), device="cuda")
    with torch.no_grad():
        out = torch.compile(model, backend=recording, options={"recipe": "nvfp4_weight_only", "compiler": "eager"})(ids)
    targets = {n.target for g in graphs for n in g.gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.qcompile.cuda_nvfp4_linear.default in targets
    assert torch.ops.qcompile.nvfp4_linear.default not in targets
    assert torch.isfinite(out).all()
    torch._dynamo.reset()


@cuda
def test_cuda_reduce_overhead_uses_cuda_graphs_with_static_weights():
    """backend="quant" with mode="reduce-overhead": inductor's CUDA graphs run (none skipped), the weights are
    static inputs (only the token ids are copied on replay), and the outputs equal the graph-free compilation's."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = _Small().cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 50, (2, 7), device="cuda")
    options = {"recipe": "nvfp4_weight_only"}
    expected = _compiled(model, ids, options=options)
    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="quant", options={**options, "mode": "reduce-overhead"})
    with torch.no_grad():
        outs = [compiled(ids).clone() for _ in range(3)]
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] == 1
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch._dynamo.reset()


@cuda
def test_cuda_quantized_model_reduce_overhead():
    """torch.compile(qm, mode="reduce-overhead") on a QuantizedModel: inductor's CUDA graphs, the same logits."""
    import qcompile
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = _Small().cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 50, (2, 7), device="cuda")
    qm = qcompile.quantize(model, "nvfp4_weight_only", example_inputs=(ids,), progress=False)
    with torch.no_grad():
        expected = qm(ids)
        counters.clear()
        torch._dynamo.reset()
        compiled = torch.compile(qm, mode="reduce-overhead")
        outs = [compiled(ids).clone() for _ in range(3)]
    assert counters["inductor"]["cudagraph_skips"] == 0
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------ QuantizedModel on CUDA


def test_quantized_model_calls_the_cuda_twins(small, monkeypatch):
    """No-grad calls of a QuantizedModel whose weights are CUDA tensors run a copy of its graph on the CUDA twins,
    and its QuantizedLinear layers pick them too. Checked on the CPU by calling every tensor a CUDA one: off CUDA
    the twins run the public op, so the outputs stay the CPU graph's."""
    import qcompile as qc
    from qcompile.model import cuda_eager_graph
    from qcompile.quantized_modules import QuantizedLinear

    model, ids = small
    qm = qc.quantize(model, "int8_dynamic", example_inputs=(ids,), progress=False)
    public = torch.ops.qcompile.int8_linear.default
    assert cuda_eager_graph(qm.graph_module, qm._graph_copy) is None  # CPU weights: no CUDA variant
    cpu_calls = [n.target for n in qm.graph_module.graph.nodes if n.op == "call_function"]
    monkeypatch.setattr(triton_lowering, "on_cuda", lambda t: isinstance(t, torch.Tensor))
    eager = cuda_eager_graph(qm.graph_module, qm._graph_copy)
    calls = [n.target for n in eager.graph.nodes if n.op == "call_function"]
    assert public in cpu_calls and public not in calls
    assert calls.count(torch.ops.qcompile.cuda_int8_linear.default) == cpu_calls.count(public) == 2
    assert [n.target for n in qm.graph_module.graph.nodes if n.op == "call_function"] == cpu_calls  # a copy
    with torch.no_grad():
        torch.testing.assert_close(eager(ids), qm.graph_module(ids), rtol=0, atol=0)
    layers = [m for m in qm._tree.modules() if isinstance(m, QuantizedLinear)] if qm._tree is not None else []
    assert layers
    for layer in layers:
        assert layer._twin("cuda") is torch.ops.qcompile.cuda_int8_linear.default
        assert layer._twin("cpu") is torch.ops.qcompile.cpu_int8_linear.default
        assert layer._twin("meta") is layer.op is public
        x = torch.randn(3, layer.in_features)
        args = [layer.constants[n] if n in layer.constants else getattr(layer, n) for n in layer.argument_names]
        with torch.no_grad():
            torch.testing.assert_close(layer(x), public(x, *args), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ prepared launches


class _StubKernel:
    """A Triton kernel whose launches are recorded; `kernel[grid](...)` returns a stand-in for the compiled kernel
    (whose launcher records too), as JITFunction.run does on a GPU."""

    def __init__(self, kernel):
        self.params = kernel.params
        self.names = [p.name for p in kernel.params]
        self.launches, self.direct = [], []
        stub = self

        class Compiled:
            function = packed_metadata = None

            @staticmethod
            def run(gx, gy, gz, stream, function, metadata, launch_metadata, enter, leave, *args):
                stub.direct.append(((gx, gy, gz), dict(zip(stub.names, args, strict=True))))

        self.compiled = Compiled()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, {**dict(zip(self.names, args)), **kwargs}))
            return self.compiled

        return launch


def test_prepared_launch_takes_the_tuned_configuration(monkeypatch):
    """Off the interpreter a prepared launch has no configuration until the general launcher has tuned one for
    its key (on the first call); later calls launch that one, with its grid, and nothing is timed again."""
    from qcompile.lowering.triton import kernels

    stub = _StubKernel(kernels.w8_gemm_kernel)
    monkeypatch.setattr(kernels, "w8_gemm_kernel", stub)
    monkeypatch.setattr(launch, "_BEST", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    chosen = launch.W8_DECODE[2]
    timed = []
    monkeypatch.setattr(launch, "time_cuda",
                        lambda fn, iters=10: timed.append(fn.args[0]) or (1.0 if fn.args[0] == chosen else 2.0))
    w = numerics.quantize_int8(torch.randn(96, 256), "channel")
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    gemm = launch.w8_prepare(x, None, w.q, w.scale, 0, None, x.dtype, quant_a=True)
    gemm(x, None, w.q, w.scale, None)
    assert len(timed) == len(launch.W8_DECODE) and list(launch.tuned_configs().values()) == [chosen]
    stub.launches.clear()
    for _ in range(2):
        out = gemm(x, None, w.q, w.scale, None)
    assert out.shape == (3, 96) and out.dtype == x.dtype and len(timed) == len(launch.W8_DECODE)
    grid = (launch.ceil_div(3, chosen.BLOCK_M) * launch.ceil_div(96, chosen.BLOCK_N), chosen.SPLIT_K)
    assert [g for g, _ in stub.launches] == [grid, grid]
    args = stub.launches[0][1]
    assert (args["BLOCK_N"], args["BLOCK_K"], args["SPLIT_K"], args["QUANT_A"]) == \
        (chosen.BLOCK_N, chosen.BLOCK_K, chosen.SPLIT_K, True)
    assert args["a_ptr"] is x and args["b_ptr"] is w.q and (args["M"], args["N"], args["K"]) == (3, 96, 256)
    assert stub.direct == []  # CPU tensors: never the direct launch


def test_direct_launch_reuses_the_compiled_kernel(monkeypatch):
    """After the first launch the compiled kernel's launcher is called directly with the arguments JITFunction.run
    would pass (every parameter in order, constexprs and defaults included), while the activation specializes
    the same way; a differently aligned activation goes through `kernel[grid]` again."""
    from qcompile.lowering.triton import kernels

    stub = _StubKernel(kernels.w8_gemm_kernel)
    monkeypatch.setattr(kernels, "w8_gemm_kernel", stub)
    monkeypatch.setattr(launch, "_BEST", {})
    monkeypatch.setattr(launch, "_a_guard", lambda a: (a.data_ptr() & 15, a.stride(0)))  # as for CUDA tensors
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)
    cfg = launch.W8_DECODE[0]
    w = numerics.quantize_int8(torch.randn(64, 128), "channel")
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    key = ("w8", "decode", 2, 64, 128, x.dtype, torch.int8, x.dtype, None, 1,
           False, False, 0, False, True, "tf32", True)
    launch._BEST[key] = cfg
    gemm = launch.w8_prepare(x, None, w.q, w.scale, 0, None, x.dtype, quant_a=True)
    gemm(x, None, w.q, w.scale, None)
    y = torch.randn(2, 128, dtype=torch.bfloat16)
    gemm(y, None, w.q, w.scale, None)
    assert len(stub.launches) == 1 and len(stub.direct) == 1
    (grid, first), (g3, direct) = stub.launches[0], stub.direct[0]
    assert g3 == (*grid, 1) and list(direct) == stub.names
    assert direct["a_ptr"] is y and all(direct[n] is first[n] or direct[n] == first[n]
                                        for n in stub.names if n not in ("a_ptr", "a_scale_ptr", "out_ptr"))
    assert direct["QUANT_A"] is True and direct["BLOCK_N"] == cfg.BLOCK_N
    unaligned = torch.randn(2, 129, dtype=torch.bfloat16)[:, 1:]  # 2-byte offset, rows 129 apart
    gemm(unaligned, None, w.q, w.scale, None)
    assert len(stub.launches) == 2 and len(stub.direct) == 1
    gemm(y, None, w.q, w.scale, None)  # the first specialization still launches directly
    assert len(stub.direct) == 2


@pytest.mark.parametrize("kind", ["int4", "nvfp4", "int8"])
def test_prepared_launches_hold_no_tensor(kind):
    """A prepared launch lives in a plan, which must let its weights go (the plan is dropped when they are)."""
    import weakref

    x = torch.randn(1, 256, dtype=torch.bfloat16)
    if kind == "int8":
        w = numerics.quantize_int8(torch.randn(32, 256), "channel")
        tensors = (w.q, w.scale)
        fn = launch.w8_prepare(x, None, w.q, w.scale, 0, None, x.dtype, quant_a=True)
    elif kind == "int4":
        w = numerics.quantize_int4(torch.randn(32, 256), 128)
        tensors = (w.packed, w.scale)
        fn = launch.w4_prepare(x, None, w.packed, w.scale, None, 128, None, None, x.dtype)
    else:
        w = numerics.quantize_nvfp4(torch.randn(32, 256))
        tensors = (w.packed, w.block_scale, w.global_scale)
        fn = launch.w4_prepare(x, None, w.packed, w.block_scale, None, 16, w.global_scale, None, x.dtype)
    refs = [weakref.ref(t) for t in tensors]
    del w, tensors
    gc.collect()
    assert callable(fn) and all(r() is None for r in refs)
