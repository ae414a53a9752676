"""FP8 layers on the CPU and the FP8/E2M1 rounding in plain ops (qcompile.lowering.cpu.fp8): the rounding and
decoding are the casts and the encoder bit for bit, the decomposition and the input round trips are the reference.
"""

from __future__ import annotations

import re

import pytest
import torch

from cpu_helpers import REL_TOL, calibration_batches, compiled_code, mlp, rel
import qcompile as qc
from qcompile import numerics
from qcompile.lowering import torch_reference as ref
from qcompile.lowering.cpu import fp8 as cpu_fp8


@pytest.mark.parametrize("recipe", ["fp8_dynamic", "fp8"])
def test_compiled_fp8_is_decomposed_and_matches_the_reference(recipe):
    qm = qc.quantize(mlp(), recipe, calib=calibration_batches(), progress=False)
    x = torch.randn(2, 7, 64)
    out, code = compiled_code(torch.compile(qm), x)
    assert "torch.ops.qcompile.fp8_linear" not in code  # fused aten ops, not the opaque reference op
    # the FP8 rounding is integer and float arithmetic, not a conversion to FP8 (scalar per element in the C++)
    assert re.search(r"(convert|static_cast)<(at::|c10::)?Float8_e4m3fn>", code) is None
    with torch.no_grad():
        # eager = the reference; two layers (see test_backend_runs_the_integer_kernel). Without the FP8 round trip
        # of the activations the error would be FP8's, ~1e-2.
        assert rel(out, qm(x)) <= 1e-4


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
    assert _same_bits(cpu_fp8.round_to_fp8_e4m3(v), want)  # signed zeros too
    assert _same_bits(torch.compile(cpu_fp8.round_to_fp8_e4m3)(v), want)  # as inductor generates it
    # hand-checked ties, which go to the even code: 1 + 1/16 between 1 and 1.125, 1 + 3/16 between 1.125 and 1.25;
    # in subnormal steps of 2^-9: 0.5, 1.5 and -4.5 steps
    ties = torch.tensor([1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, -(2.0**-7 + 2.0**-10)])
    assert cpu_fp8.round_to_fp8_e4m3(ties).tolist() == [1.0, 1.25, 0.0, 2.0**-8, -(2.0**-7)]


def test_fp8_decoding_in_arithmetic_is_the_cast():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    want = codes.to(torch.float32)
    for decode in (cpu_fp8.fp8_e4m3_to_float32, torch.compile(cpu_fp8.fp8_e4m3_to_float32)):
        got = decode(codes)
        assert torch.equal(got.isnan(), want.isnan()) and want.isnan().sum() == 2  # S.1111.111
        finite = ~want.isnan()
        assert _same_bits(got[finite], want[finite])
    assert cpu_fp8.fp8_e4m3_to_float32(codes[[0x01, 0x08, 0x38, 0x7E, 0x80, 0xB9]]).tolist() == \
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
    got = cpu_fp8.decompose_fp8_linear(*args)
    assert rel(got, ref.fp8_linear(*args)) <= REL_TOL
    assert cpu_fp8.decompose_fp8_linear(x, w.q, w.scale, 128, bias, scale, "fp8_e4m3", granularity) \
        is NotImplemented  # 128x128 block scales stay on the reference


def test_compiled_fp8_rejects_non_finite_input():
    compiled = torch.compile(qc.quantize(mlp(), "fp8_dynamic", calib=calibration_batches(), progress=False))
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        compiled(x)
        x[0, 1, 2] = float("inf")
        with pytest.raises(ValueError, match="NaN or inf"):
            compiled(x)


def test_compiled_fp8_takes_an_empty_batch():
    """A static per-tensor scale: the decomposition's amax check has nothing to reduce."""
    qm = qc.quantize(mlp(), "fp8", calib=calibration_batches(), progress=False)
    compiled = torch.compile(qm)
    with torch.no_grad():
        compiled(torch.randn(2, 5, 64))
        out = compiled(torch.empty(2, 0, 64))
    assert out.shape == (2, 0, 32)


def test_e2m1_rounding_in_arithmetic_is_the_encoder():
    grid = torch.tensor(numerics.E2M1_VALUES)
    points = torch.cat([grid, (grid[:-1] + grid[1:]) / 2, torch.tensor([5.5, 6.5, 7.0, 1e30, float("inf")])])
    up = torch.nextafter(points, torch.tensor(float("inf")))
    down = torch.nextafter(points, torch.tensor(0.0))
    sweep = torch.arange(0, 0x7F800000, 4099, dtype=torch.int32).view(torch.float32)  # every binade, ~520k values
    v = torch.cat([points, up, down, sweep])
    v = torch.cat([v, -v])
    want = numerics.e2m1_decode(numerics.e2m1_encode(v))
    assert _same_bits(cpu_fp8.round_to_e2m1(v), want)  # -0.0 where the encoder gives code 8
    assert _same_bits(torch.compile(cpu_fp8.round_to_e2m1)(v), want)
    # hand-checked ties to the even code: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0001, -0.1])
    assert cpu_fp8.round_to_e2m1(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -6.0, -0.0]


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
    for fn in (cpu_fp8.fake_quantize_nvfp4_input, torch.compile(cpu_fp8.fake_quantize_nvfp4_input)):
        got = fn(x, gs)
        assert got.shape == want.shape and _same_bits(got, want)
    assert (want == 0).float().mean() < 0.9 and want.abs().max() > 0  # not all flushed: the check has teeth


@pytest.mark.parametrize("granularity,static", [("tensor", 0.05), ("tensor", None), ("token", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_input_round_trip_is_the_reference(granularity, static, dtype):
    x = _awkward_activation(5, 48, seed=3).to(dtype).reshape(5, 2, 24)
    scale = None if static is None else torch.tensor(static)
    got = cpu_fp8.fake_quantize_input(x, scale, "fp8_e4m3", granularity)
    assert got.dtype == torch.float32 and _same_bits(got, ref.quantize_input(x, "fp8_e4m3", granularity, scale))
