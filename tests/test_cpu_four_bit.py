"""4-bit weights on the CPU (qcompile.lowering.cpu.four_bit): `native`'s 4-bit kernel is the reference, caches its
view of each weight, falls back to the reference without a C compiler, and runs from compiled graphs, with the
quantized inputs of W4A8 and NVFP4 rounded outside the kernel call.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from cpu_helpers import REL_TOL, calibration_batches, compiled_code, mlp, needs_native, reference_kernels, rel
import qcompile as qc
from qcompile import numerics
from qcompile.lowering import native
from qcompile.lowering import torch_reference as ref
from qcompile.lowering.cpu import four_bit as cpu_four_bit
from qcompile.lowering.cpu import weight_cache


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
    assert native_calls == ["linear" if rows <= cpu_four_bit.SMALL_BATCH else "dequantize"]
    assert got.shape == want.shape == (*shape[:-1], n)
    assert rel(got, want) <= REL_TOL


@needs_native
@pytest.mark.parametrize("fmt", ["int4", "int4_asym", "int3", "nvfp4"])
def test_weight_only_dequantize_is_exact(fmt):
    # weights over six orders of magnitude, K = 300 (not a multiple of any group)
    w = torch.randn(37, 300, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 3, 300)
    library = native.load()
    if fmt == "nvfp4":
        t = numerics.quantize_nvfp4(w)
        weight, want = cpu_four_bit.nvfp4_weight(t.packed, t.block_scale, t.global_scale, 300), numerics.dequantize_nvfp4(t)
    else:
        t = numerics.quantize_int4(w, 64, symmetric=fmt != "int4_asym", bits=3 if fmt == "int3" else 4)
        weight = cpu_four_bit.int4_weight(t.packed, t.scale, t.zero_point, 64, 300)
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
    assert rel(first, want(weight)) <= REL_TOL
    cached = dict(weight_cache._WEIGHTS)
    assert rel(run(weight), first) == 0 and weight_cache._WEIGHTS.keys() == cached.keys()  # built once
    weight[0].bitwise_xor_(0x11)  # the codes change in place: the next call sees them
    assert rel(run(weight), want(weight)) <= REL_TOL and rel(run(weight), first) > 0.01
    weight[2].mul_(2.0)  # and the global scale
    assert rel(run(weight), want(weight)) <= REL_TOL
    # the cache keeps no weight alive, and a new weight (likely at the freed addresses) is not served the old view
    alive = weakref.ref(weight[0])
    del weight
    gc.collect()
    assert alive() is None
    for _ in range(3):
        other = layer()
        assert rel(run(other), want(other)) <= REL_TOL
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
    assert rel(got, ref.int4_linear(x, *weight, None, None, "none", "tensor")) == 0.0  # the reference itself


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
    model = mlp()
    qm = qc.quantize(model, recipe, calib=calibration_batches(), progress=False)
    compiled = torch.compile(qm)
    x = torch.randn(1, 1, 64)  # a decode-sized batch
    with torch.no_grad():
        got = compiled(x)
    assert native_calls.count("linear") >= 2  # both layers, from inside the compiled graph
    native_calls.clear()
    with torch.no_grad(), reference_kernels():
        want = qm(x)
    assert not native_calls
    assert rel(got, want) <= 1e-4  # the second layer's input went through GELU compiled two ways


def _max_calibrated(name: str) -> qc.Recipe:
    return dataclasses.replace(qc.RECIPES[name], algorithm="max")


@pytest.mark.parametrize("recipe", ["w4a8_awq", "nvfp4"])
def test_compiled_4bit_layers_quantize_their_input_outside_the_kernel_call(recipe):
    qm = qc.quantize(mlp(), _max_calibrated(recipe), calib=calibration_batches(), progress=False)
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(qm)
    out, code = compiled_code(compiled, x)
    calls = re.findall(r"torch\.ops\.qcompile\.cpu_(?:int4|nvfp4)_linear\.default\(([^\n]*)", code)
    assert len(calls) == 2 and all("'none'" in call for call in calls), calls  # inputs come in as float32
    assert re.search(r"(convert|static_cast)<(at::|c10::)?Float8_e4m3fn>", code) is None
    with torch.no_grad():
        # the eager model quantizes inside the kernel call: the same values into the same kernel
        assert torch.equal(out, qm(x))
        x[1, 2, 3] = float("nan")
        with pytest.raises(ValueError, match="NaN or inf"):
            compiled(x)
