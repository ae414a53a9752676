"""The CPU kernels as registered (qcompile.lowering.cpu): compiled graphs and eager calls without autograd take the
ops' autograd-free twins, and inductor calls the op where a decomposition declines.
"""

from __future__ import annotations

import pytest
import torch

from cpu_helpers import (  # noqa: F401  (fixtures)
    REL_TOL,
    calibration_batches,
    compiled_code,
    int8_weight,
    integer_gemm_on_any_cpu,
    mlp,
    needs_native,
    rel,
)
import qcompile as qc
from qcompile import numerics


@needs_native
@pytest.mark.parametrize("recipe,op", [("int4_awq", "int4_linear"), ("nvfp4_weight_only", "nvfp4_linear")])
def test_compiled_graphs_call_the_kernel_twin_without_autograd(recipe, op):
    """Inductor calls `qcompile::cpu_<op>` (same schema and kernel, no autograd layer), and the twin computes what
    the public op computes."""
    qm = qc.quantize(mlp(), recipe, calib=calibration_batches(), progress=False)
    x = torch.randn(1, 1, 64)
    out, code = compiled_code(torch.compile(qm), x)
    assert f"torch.ops.qcompile.cpu_{op}.default(" in code and f"torch.ops.qcompile.{op}.default(" not in code
    with torch.no_grad():
        assert rel(out, qm(x)) <= 1e-4
    public, twin = getattr(torch.ops.qcompile, op).default, getattr(torch.ops.qcompile, f"cpu_{op}").default
    assert str(twin._schema).replace(f"cpu_{op}", op) == str(public._schema)
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(twin.name(), "Autograd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(public.name(), "Autograd")


def _ops_called(fn, *args) -> set:
    """Names of the `qcompile::` linear ops that one call of `fn` dispatches (from the profiler's events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*args)
    return {event.name for event in prof.events() if event.name.startswith("qcompile::") and "linear" in event.name}


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
@pytest.mark.parametrize("recipe,op", [("int8_dynamic", "int8_linear"), ("int4_awq", "int4_linear"),
                                       ("nvfp4_weight_only", "nvfp4_linear")])
def test_eager_calls_without_autograd_take_the_twins(recipe, op):
    """Eager calls under no_grad / inference_mode run the twins (no autograd layer), the same values bit for bit;
    with autograd on, the public ops (gradients flow); off the CPU, no twin graph at all."""
    qm = qc.quantize(mlp(), recipe, calib=calibration_batches(), progress=False)
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


@pytest.mark.usefixtures("integer_gemm_on_any_cpu")
def test_compiled_layers_the_decompositions_decline_run_the_op():
    """Weight-only INT8, K = 1 and block-wise FP8 are not decomposed: inductor calls the op's own CPU kernel."""
    w, ws = int8_weight(8, 32, "channel", 12)
    k1, k1_scale = int8_weight(8, 1, "channel", 13)
    fp8 = numerics.quantize_fp8(torch.randn(256, 128), "block", block_size=128)

    def layers(x):
        weight_only = torch.ops.qcompile.int8_linear(x, w, ws, None, None, "none", "tensor")
        k_of_one = torch.ops.qcompile.int8_linear(x[..., :1], k1, k1_scale, None, None, "int8", "token")
        blocks = torch.ops.qcompile.fp8_linear(torch.cat([x] * 4, -1), fp8.q, fp8.scale, 128, None, None,
                                               "fp8_e4m3", "token")
        return weight_only + k_of_one, blocks

    x = torch.randn(3, 5, 32)
    with torch._inductor.config.patch(fx_graph_cache=False):
        (got, got_blocks), code = compiled_code(torch.compile(layers), x)
    want, want_blocks = layers(x)
    # the INT8 kernel through its twin without autograd (qcompile::cpu_int8_linear), FP8 through the op itself
    assert "torch.ops.qcompile.cpu_int8_linear.default(" in code and "torch.ops.qcompile.fp8_linear.default(" in code
    assert rel(got, want) <= REL_TOL and rel(got_blocks, want_blocks) <= REL_TOL
