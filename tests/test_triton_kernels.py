"""Triton kernels (qcompile.lowering.triton) against the plain-PyTorch reference lowering and qcompile.numerics.

CPU: the kernels run on Triton's interpreter. Its mode is fixed when Triton is first imported (Triton's own
`@triton.jit` library functions are decorated then), and tests/conftest.py already imports Triton through
torch._dynamo, so setting TRITON_INTERPRET=1 in this module would come too late. Instead, in a normal process
`test_interpreter_suite` runs this file again in a subprocess started with TRITON_INTERPRET=1; there the class
`TestInterpreter` is collected and runs. Nothing in this process changes Triton's mode or the environment.
Run the interpreter tests directly with `TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py`.

The interpreter computes `tl.dot` on bf16 wrongly, so GEMMs are checked with fp16 and fp32 activations there
(the activation-quantization kernels, which have no dot, are checked with bf16 inputs too).

Exactness: activation quantization must match `qcompile.numerics` bit for bit. A GEMM differs from the reference
(dequantize, then multiply in float32) only in float32 accumulation order and the final rounding to the output
dtype, so each output element must lie within one output ulp plus a float32 summation bound of
sum_k |a_k| |w_k| (`assert_matches`).

CUDA: the GPU tests at the bottom run the registered CUDA implementation at full size; they are skipped without
a CUDA device (and inside the interpreter subprocess).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from qcompile import numerics  # noqa: E402
from qcompile.lowering import torch_reference as ref  # noqa: E402
from qcompile.lowering import triton as triton_lowering  # noqa: E402
from qcompile.lowering.triton import dispatch, launch  # noqa: E402

INTERPRETED = launch.interpreting()
HAS_CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]

_EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}
_TINY = {torch.float16: 2.0**-24, torch.bfloat16: 1e-38, torch.float32: 1e-38}


# ------------------------------------------------------------------------------------------------ helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_x(m: int, k: int, dtype=torch.float16, seed: int = 0, scale: float = 1.0, device="cpu") -> torch.Tensor:
    """Random activations with an all-zero token (row 1) and a token 100x larger than the rest (row 2)."""
    x = torch.randn(m, k, generator=_gen(seed)) * scale
    if m > 2:
        x[1] = 0.0
        x[2] *= 100.0 if dtype != torch.float16 else 10.0
    return x.to(device=device, dtype=dtype)


def make_w(n: int, k: int, seed: int = 1, device="cpu") -> torch.Tensor:
    """Random weights with all-zero groups/blocks (rows 0-1, the first 128 inputs), a tiny and a large row."""
    w = torch.randn(n, k, generator=_gen(seed))
    w[:2, :128] = 0.0
    if n > 4:
        w[3] *= 1e-4
        w[4] *= 30.0
    return w.to(device)


def assert_matches(out, expected, a_deq, w_deq, bias=None, weight_rounding: float = 0.0):
    """`out` equals `expected` up to float32 accumulation order and the final rounding (see module docstring).

    weight_rounding: relative error of weights rounded to the activation dtype in-kernel (dequantize-first path).
    """
    assert out.shape == expected.shape and out.dtype == expected.dtype
    o, e = out.double(), expected.double()
    assert torch.equal(o.isnan(), e.isnan()), "NaN positions differ"
    assert torch.equal(o.isinf(), e.isinf()) and torch.equal(o[o.isinf()], e[e.isinf()]), "inf positions differ"
    a2 = a_deq.double().to(o.device).reshape(-1, a_deq.shape[-1])
    bound = (a2.abs() @ w_deq.double().to(o.device).abs().T).reshape(e.shape)
    if bias is not None:
        bound = bound + bias.double().to(o.device).abs()
    k = a_deq.shape[-1]
    dtype = out.dtype
    tol = 1.01 * _EPS[dtype] * e.abs() + (4 * k * 2.0**-24 + weight_rounding) * bound + _TINY[dtype]
    fin = e.isfinite()
    excess = ((o - e).abs() - tol)[fin]
    assert excess.numel() == 0 or excess.max() <= 0, (
        f"max |out - ref| beyond tolerance by {excess.max().item():.3g} "
        f"(max |ref| {e[fin].abs().max().item():.3g})"
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def fp8_midpoints(scale: float = 1.0) -> torch.Tensor:
    """Every midpoint between neighbouring non-negative E4M3 values (and their negatives): ties to even."""
    vals = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (vals[:-1] + vals[1:]) / 2
    return torch.cat([mids, -mids, vals, -vals]) * scale


# ------------------------------------------------------------------------------------ the CPU interpreter


def test_interpreter_suite():
    """Run TestInterpreter in a subprocess whose Triton starts in interpreter mode (see module docstring)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider",
           "--durations=8", "-k", "TestInterpreter"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]


test_interpreter_suite.__test__ = not INTERPRETED


def _gemv_id(value) -> str:
    if isinstance(value, launch.GemvCfg):
        return f"n{value.BLOCK_N}-kb{value.BLOCK_KB}-split{value.SPLIT_K}"
    return str(value).replace("torch.", "")


class TestInterpreter:
    __test__ = INTERPRETED

    # ------------------------------------------------------------------ activation quantization, bit for bit

    @pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    def test_quant_rows_dynamic_per_token(self, fmt, dtype):
        x = torch.cat([make_x(5, 300, torch.float32, seed=2), torch.zeros(1, 300)])
        x[3, :10] = torch.tensor([1e-30, -1e-35, 3e-39, -1e-40, 0.0, -0.0, 2.5, -2.5, 1e-20, 7.0])  # tiny, subnormal
        x[4] *= 1e3 if dtype == torch.float16 else 1e30
        x = x.to(dtype)
        q, s = launch.quantize_rows(x, fmt)
        quant = numerics.quantize_int8 if fmt == "int8" else numerics.quantize_fp8
        r = quant(x, "token")
        assert torch.equal(_bits(q), _bits(r.q))
        assert torch.equal(s, r.scale.reshape(-1))

    @pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
    def test_quant_rows_long_rows_and_single_element(self, fmt):
        quant = numerics.quantize_int8 if fmt == "int8" else numerics.quantize_fp8
        for m, k in ((3, 5000), (4, 1)):  # 5000 > the kernel's 4096-wide chunk: two passes over the row
            x = make_x(m, k, torch.float32, seed=k)
            q, s = launch.quantize_rows(x, fmt)
            r = quant(x, "token")
            assert torch.equal(_bits(q), _bits(r.q)) and torch.equal(s, r.scale.reshape(-1))

    def test_quant_rows_ties_round_to_even(self):
        # FP8: every midpoint of the E4M3 grid, normal and subnormal, with a static scale of 1 (no rescaling).
        x = fp8_midpoints().reshape(2, -1)
        one = torch.tensor(1.0)
        q, _ = launch.quantize_rows(x, "fp8_e4m3", one)
        assert torch.equal(_bits(q), _bits(numerics.quantize_fp8(x, "tensor", scale=one).q))
        # INT8: half-integers.
        x = (torch.arange(-127, 127, dtype=torch.float32) + 0.5).reshape(2, -1)
        q, _ = launch.quantize_rows(x, "int8", one)
        assert torch.equal(q, numerics.quantize_int8(x, "tensor", scale=one).q)

    @pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
    @pytest.mark.parametrize("static", [0.05, 1e-6, 0.0])
    def test_quant_rows_static_scale(self, fmt, static):
        x = make_x(6, 77, torch.float32, seed=3)  # saturates for the small scales
        s_in = torch.tensor(static)
        q, s = launch.quantize_rows(x, fmt, s_in)
        quant = numerics.quantize_int8 if fmt == "int8" else numerics.quantize_fp8
        r = quant(x, "tensor", scale=s_in)
        assert torch.equal(_bits(q), _bits(r.q))
        assert torch.equal(s, r.scale.expand(6))

    @pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
    @pytest.mark.parametrize("static", [False, True])
    def test_quant_rows_nonfinite_rows_get_nan_scale(self, fmt, static):
        x = make_x(5, 40, torch.float32, seed=4)
        x[0, 7] = float("nan")
        x[3, 0] = float("-inf")
        s_in = torch.tensor(0.02) if static else None
        q, s = launch.quantize_rows(x, fmt, s_in)
        assert s[[0, 3]].isnan().all() and not s[[1, 2, 4]].isnan().any()
        quant = numerics.quantize_int8 if fmt == "int8" else numerics.quantize_fp8
        good = x[[1, 2, 4]]
        r = quant(good, "tensor" if static else "token", scale=s_in)
        assert torch.equal(_bits(q[[1, 2, 4]]), _bits(r.q))

    @pytest.mark.parametrize("k", [16, 37, 300])
    @pytest.mark.parametrize("gs_kind", ["amax", "small", "large", "subnormal"])
    def test_quant_nvfp4_matches_numerics(self, k, gs_kind):
        x = make_x(5, k, torch.float32, seed=k)
        x[3, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.0, 0.0, -5.0, 6.0, 7.0, -1e-3,
                                  0.5, 1.0]) * 0.01  # E2M1 ties, scaled by a block scale
        x[4, : min(k, 32)] = 0.0  # all-zero blocks
        amax = x.abs().amax() / (6 * 448)
        # saturating block scales / FP8-subnormal block scales (2**-9 .. 2**-6) / block scales that underflow to 0
        gs = {"amax": amax, "small": amax * 1e-4, "subnormal": amax * 448 / 0.01, "large": amax * 1e6}[gs_kind]
        packed, bscale = launch.quantize_nvfp4(x, gs)
        r = numerics.quantize_nvfp4(x, global_scale=gs)
        assert torch.equal(packed, r.packed)
        assert torch.equal(_bits(bscale), _bits(r.block_scale))
        # The unpacked form: E2M1 value * block scale, exactly.
        values = launch.quantize_nvfp4(x, gs, packed=False, out_dtype=torch.float32)
        codes = numerics.e2m1_decode(numerics.unpack_nibbles(r.packed))[:, :k]
        expected = codes * r.block_scale.float().repeat_interleave(16, dim=1)[:, :k]
        assert torch.equal(values, expected)
        assert torch.equal(launch.quantize_nvfp4(x.half(), gs, packed=False), expected.half())

    def test_quant_nvfp4_e2m1_ties(self):
        """With global scale 1 and a block amax of 6 the block scale is 1: the values reach the encoder unscaled."""
        ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5,
                             -5.0, -0.0])
        near = torch.tensor([0.2499, 0.7501, 1.2501, 1.7499, 2.5001, 3.4999, 5.0001, -6.0, 0.1, -0.1, 1.0, 1.5, 2.0,
                             3.0, 4.0, 0.0])
        x = torch.stack([ties, near])
        one = torch.tensor(1.0)
        packed, bscale = launch.quantize_nvfp4(x, one)
        r = numerics.quantize_nvfp4(x, global_scale=one)
        assert torch.equal(bscale.float(), torch.ones(2, 1))
        assert torch.equal(packed, r.packed)

    def test_quant_nvfp4_nonfinite_block(self):
        x = make_x(3, 64, torch.float32, seed=9)
        x[1, 20] = float("nan")
        x[2, 63] = float("inf")
        gs = torch.tensor(0.001)
        packed, bscale = launch.quantize_nvfp4(x, gs)
        bs = bscale.float()
        assert bs[1, 1].isnan() and bs[2, 3].isnan() and bs.isnan().sum() == 2
        r = numerics.quantize_nvfp4(x[:1], global_scale=gs)
        assert torch.equal(packed[:1], r.packed)
        values = launch.quantize_nvfp4(x, gs, packed=False, out_dtype=torch.float32)
        assert values[1, 16:32].isnan().all() and values[2, 48:].isnan().all()
        assert not values[0].isnan().any()

    # --------------------------------------------------------------------------------------- INT8 GEMM

    @pytest.mark.parametrize("m", [1, 37])
    @pytest.mark.parametrize(
        "fmt,gran,static", [("none", "tensor", None), ("int8", "token", None), ("int8", "tensor", None),
                            ("int8", "tensor", 0.03)]
    )
    def test_int8_linear(self, m, fmt, gran, static):
        x, w = make_x(m, 200, seed=m), make_w(72, 200)
        t = numerics.quantize_int8(w, "channel")
        bias = torch.randn(72, generator=_gen(5))
        scale = None if static is None else torch.tensor(static)
        args = (x, t.q, t.scale, bias, scale, fmt, gran)
        assert dispatch.plan("int8_linear", *args).startswith("triton")
        assert_matches(dispatch.int8_linear(*args), ref.int8_linear(*args),
                       ref.quantize_input(x, fmt, gran, scale), numerics.dequantize_int8(t), bias)

    def test_int8_per_tensor_weight_fp32_activations(self):
        x, w = make_x(20, 96, torch.float32, seed=6, scale=1e3), make_w(40, 96)
        t = numerics.quantize_int8(w, "tensor")
        args = (x, t.q, t.scale, None, None, "int8", "token")
        assert_matches(dispatch.int8_linear(*args), ref.int8_linear(*args),
                       ref.quantize_input(x, "int8", "token", None), numerics.dequantize_int8(t))

    # ---------------------------------------------------------------------------------------- FP8 GEMM

    @pytest.mark.parametrize("m", [3, 37])
    @pytest.mark.parametrize("wgran", ["tensor", "channel", "block"])
    @pytest.mark.parametrize("fmt,gran,static", [("none", "tensor", None), ("fp8_e4m3", "token", None),
                                                 ("fp8_e4m3", "tensor", 0.01)])
    def test_fp8_linear(self, m, wgran, fmt, gran, static):
        x, w = make_x(m, 200, seed=m + 10), make_w(72, 200)
        t = numerics.quantize_fp8(w, wgran, block_size=128)
        block = 128 if wgran == "block" else 0
        bias = torch.randn(72, generator=_gen(6)) if m == 37 else None
        scale = None if static is None else torch.tensor(static)
        args = (x, t.q, t.scale, block, bias, scale, fmt, gran)
        assert dispatch.plan("fp8_linear", *args).startswith("triton")
        assert_matches(dispatch.fp8_linear(*args), ref.fp8_linear(*args),
                       ref.quantize_input(x, fmt, gran, scale), numerics.dequantize_fp8(t), bias)

    def test_fp8_block_weights_small_block_and_fp32(self):
        x, w = make_x(9, 100, torch.float32, seed=11), make_w(50, 100)
        t = numerics.quantize_fp8(w, "block", block_size=32)
        args = (x, t.q, t.scale, 32, None, None, "none", "tensor")
        assert_matches(dispatch.fp8_linear(*args), ref.fp8_linear(*args), x, numerics.dequantize_fp8(t))

    # ----------------------------------------------------------------------------------- INT4/INT3 GEMM

    @pytest.mark.parametrize("m", [1, 37])
    @pytest.mark.parametrize(
        "bits,sym,group",
        [(4, True, 128), (4, False, 128), (3, True, 32), (4, False, 48), (4, True, 24), (3, False, 25)],
    )
    def test_int4_weight_only(self, m, bits, sym, group):
        x, w = make_x(m, 200, seed=m + 20), make_w(72, 200)
        t = numerics.quantize_int4(w, group, symmetric=sym, bits=bits)
        bias = torch.randn(72, generator=_gen(7))
        args = (x, t.packed, t.scale, t.zero_point, group, bits, 200, bias, None, "none", "tensor")
        assert dispatch.plan("int4_linear", *args).startswith("triton")
        # A group with no power-of-two K tile (24, or the odd 25 whose groups split byte pairs) dequantizes each
        # weight to fp16 in registers.
        rounding = 0.0 if launch.w4_after_dot(group, x.dtype) else 2.0**-11
        assert_matches(dispatch.int4_linear(*args), ref.int4_linear(*args), x, numerics.dequantize_int4(t), bias,
                       weight_rounding=rounding)

    @pytest.mark.parametrize("m", [2, 37])
    @pytest.mark.parametrize("fmt,gran,static", [("int8", "token", None), ("fp8_e4m3", "tensor", 0.02),
                                                 ("nvfp4", "block", 0.002), ("nvfp4", "block", None)])
    def test_int4_quantized_activations(self, m, fmt, gran, static):
        x, w = make_x(m, 200, seed=m + 30), make_w(64, 200)
        t = numerics.quantize_int4(w, 128, symmetric=m == 2)
        scale = None if static is None else torch.tensor(static)
        args = (x, t.packed, t.scale, t.zero_point, 128, 4, 200, None, scale, fmt, gran)
        plan = dispatch.plan("int4_linear", *args)
        assert plan.startswith("triton") and (fmt != "nvfp4" or "EMULATED" in plan)
        assert_matches(dispatch.int4_linear(*args), ref.int4_linear(*args),
                       ref.quantize_input(x, fmt, gran, scale), numerics.dequantize_int4(t))

    def test_int4_fp32_large_and_tiny_magnitudes(self):
        w = make_w(48, 160)
        t = numerics.quantize_int4(w * 1e-20, 32)
        for scale in (1e25, 1e-15):
            x = make_x(17, 160, torch.float32, seed=40, scale=scale)
            args = (x, t.packed, t.scale, None, 32, 4, 160, None, None, "none", "tensor")
            assert_matches(dispatch.int4_linear(*args), ref.int4_linear(*args), x, numerics.dequantize_int4(t))

    # -------------------------------------------------------------------------------------- NVFP4 GEMM

    @pytest.mark.parametrize("m", [1, 37])
    @pytest.mark.parametrize("fmt,static", [("none", None), ("nvfp4", 0.003), ("nvfp4", None)])
    def test_nvfp4_linear(self, m, fmt, static):
        x, w = make_x(m, 200, seed=m + 50), make_w(72, 200)
        t = numerics.quantize_nvfp4(w)
        bias = torch.randn(72, generator=_gen(8)) if m == 37 else None
        scale = None if static is None else torch.tensor(static)
        args = (x, t.packed, t.block_scale, t.global_scale, 200, bias, scale, fmt, "block")
        plan = dispatch.plan("nvfp4_linear", *args)
        assert plan.startswith("triton") and ("EMULATED" in plan) == (fmt == "nvfp4")
        assert_matches(dispatch.nvfp4_linear(*args), ref.nvfp4_linear(*args),
                       ref.quantize_input(x, fmt, "block", scale), numerics.dequantize_nvfp4(t), bias)

    def test_nvfp4_fp32_3d_input(self):
        x = make_x(2 * 9, 48, torch.float32, seed=60, scale=1e4).reshape(2, 9, 48)
        t = numerics.quantize_nvfp4(make_w(24, 48) * 1e-5)
        args = (x, t.packed, t.block_scale, t.global_scale, 48, None, None, "none", "block")
        out = dispatch.nvfp4_linear(*args)
        assert out.shape == (2, 9, 24)
        assert_matches(out, ref.nvfp4_linear(*args), x, numerics.dequantize_nvfp4(t))

    # --------------------------------------------------------------------- tiles, split-K, configurations

    @pytest.mark.parametrize(
        "cfg", [launch.Cfg(16, 16, 32, 1, 1), launch.Cfg(16, 64, 128, 3, 1), launch.Cfg(64, 32, 64, 1, 4),
                launch.Cfg(32, 16, 256, 2, 2)]
    )
    def test_configurations_agree(self, cfg):
        """Tile shapes that do not divide M, N or K, split-K with uneven splits, grouped tile order."""
        x, w = make_x(21, 330, seed=70), make_w(40, 330)
        t4 = numerics.quantize_int4(w, 64, symmetric=False)
        t8 = numerics.quantize_int8(w, "channel")
        a, sa = launch.quantize_rows(x, "int8")
        out4 = launch.w4_gemm(x, None, t4.packed, t4.scale, t4.zero_point, 64, None, None, x.dtype, config=cfg)
        assert_matches(out4, ref.int4_linear(x, t4.packed, t4.scale, t4.zero_point, 64, 4, 330, None, None, "none",
                                             "tensor"), x, numerics.dequantize_int4(t4))
        out8 = launch.w8_gemm(a, sa, t8.q, t8.scale, 0, None, x.dtype, config=cfg)
        assert_matches(out8, ref.int8_linear(x, t8.q, t8.scale, None, None, "int8", "token"),
                       ref.quantize_input(x, "int8", "token", None), numerics.dequantize_int8(t8))

    # Every configuration with one and several rows, every activation dtype at least once (the interpreter runs a
    # configuration with small chunks slowly: the full cross product took half of this class's time)
    @pytest.mark.parametrize("cfg,m,dtype", [
        (launch.GemvCfg(4, 16, 1), 1, torch.bfloat16), (launch.GemvCfg(4, 16, 1), 4, torch.float32),
        (launch.GemvCfg(8, 32, 3), 3, torch.float16), (launch.GemvCfg(8, 32, 3), 1, torch.float32),
        (launch.GemvCfg(16, 16, 2), 4, torch.float32), (launch.GemvCfg(16, 16, 2), 1, torch.bfloat16),
    ], ids=_gemv_id)
    def test_gemv_configurations_agree(self, cfg, m, dtype):
        """The CUDA-core GEMV of decode steps: N and K that no chunk divides, uneven split-K, bias, both weights."""
        x, w = make_x(m, 330, dtype, seed=75 + m), make_w(37, 330)
        bias = torch.randn(37, generator=_gen(9))
        for sym in (True, False):
            t = numerics.quantize_int4(w, 64, symmetric=sym)
            out = launch.w4_gemm(x, None, t.packed, t.scale, t.zero_point, 64, None, bias, x.dtype, config=cfg)
            want = ref.int4_linear(x, t.packed, t.scale, t.zero_point, 64, 4, 330, bias, None, "none", "tensor")
            assert_matches(out, want, x, numerics.dequantize_int4(t), bias)
        t = numerics.quantize_nvfp4(w)
        out = launch.w4_gemm(x, None, t.packed, t.block_scale, None, 16, t.global_scale.reshape(1).float(), bias,
                             x.dtype, config=cfg)
        want = ref.nvfp4_linear(x, t.packed, t.block_scale, t.global_scale, 330, bias, None, "none", "block")
        assert_matches(out, want, x, numerics.dequantize_nvfp4(t), bias)

    def test_gemv_is_the_decode_path_and_rejects_what_it_cannot_run(self):
        x, w = make_x(2, 256, seed=78), make_w(16, 256)
        t = numerics.quantize_int4(w, 128)
        assert isinstance(launch._gemv_configs(2, 128, False)[0], launch.GemvCfg)
        assert launch._gemv_configs(launch.GEMV_MAX_M + 1, 128, False) == ()
        assert launch._gemv_configs(1, 24, False) == ()  # no 32-element chunk lies inside a group of 24
        x[0, 5], x[1, 7], x[1, 9] = float("nan"), float("inf"), float("-inf")
        for bias in (None, torch.randn(16, generator=_gen(10))):  # NaN and inf propagate as in the reference
            out = launch.w4_gemm(x, None, t.packed, t.scale, None, 128, None, bias, x.dtype)
            want = ref.int4_linear(x, t.packed, t.scale, None, 128, 4, 256, bias, None, "none", "tensor")
            assert out.isnan().any() and out.isnan().all(dim=1).tolist() == want.isnan().all(dim=1).tolist()
            assert_matches(out, want, x.nan_to_num(0, 0, 0), numerics.dequantize_int4(t), bias)
        a, sa = launch.quantize_rows(x.nan_to_num(0, 0, 0), "int8")
        with pytest.raises(ValueError, match="float activations"):
            launch.w4_gemm(a, sa, t.packed, t.scale, None, 128, None, None, x.dtype, config=launch.GemvCfg(8, 16))
        with pytest.raises(ValueError, match="inside a group"):  # 128-element chunks would straddle groups of 64
            t64 = numerics.quantize_int4(w, 64)
            launch.w4_gemm(x, None, t64.packed, t64.scale, None, 64, None, None, x.dtype, config=launch.GemvCfg(8, 64))

    def test_empty_batch(self):
        x = torch.zeros(0, 64, dtype=torch.float16)
        t = numerics.quantize_int4(make_w(16, 64), 32)
        bias = torch.randn(16)
        args = (x, t.packed, t.scale, None, 32, 4, 64, bias, None, "none", "tensor")
        assert dispatch.int4_linear(*args).shape == (0, 16)
        t8 = numerics.quantize_int8(make_w(16, 64), "channel")
        assert dispatch.int8_linear(x, t8.q, t8.scale, bias, None, "int8", "token").shape == (0, 16)

    # ------------------------------------------------------------------------------------ NaN and inf

    def test_weight_only_propagates_nan_and_inf_like_the_reference(self):
        x = make_x(6, 64, torch.float32, seed=80)
        x[0, 3] = float("nan")
        x[2, 10] = float("inf")
        x[4, 11] = float("-inf")
        t = numerics.quantize_int4(make_w(20, 64), 32)
        args = (x, t.packed, t.scale, None, 32, 4, 64, None, None, "none", "tensor")
        assert_matches(dispatch.int4_linear(*args), ref.int4_linear(*args), x.nan_to_num(0, 0, 0),
                       numerics.dequantize_int4(t))
        n = numerics.quantize_nvfp4(make_w(20, 64))
        args = (x.half(), n.packed, n.block_scale, n.global_scale, 64, None, None, "none", "block")
        assert_matches(dispatch.nvfp4_linear(*args), ref.nvfp4_linear(*args), x.nan_to_num(0, 0, 0),
                       numerics.dequantize_nvfp4(n))

    @pytest.mark.parametrize("op", ["int8", "fp8", "nvfp4"])
    def test_quantized_input_nonfinite(self, op, monkeypatch):
        """Default: the offending token's output row is NaN, the others exact. CHECK_FINITE: the reference's error."""
        x = make_x(5, 64, torch.float32, seed=81)
        x[1, 5] = float("nan")
        x[3, 0] = float("inf")
        w = make_w(24, 64)
        if op == "int8":
            t = numerics.quantize_int8(w, "channel")
            make_args = lambda x: (x, t.q, t.scale, None, None, "int8", "token")  # noqa: E731
            fn, reference = dispatch.int8_linear, ref.int8_linear
        elif op == "fp8":
            t = numerics.quantize_fp8(w, "channel")
            make_args = lambda x: (x, t.q, t.scale, 0, None, torch.tensor(0.01), "fp8_e4m3", "tensor")  # noqa: E731
            fn, reference = dispatch.fp8_linear, ref.fp8_linear
        else:
            t = numerics.quantize_nvfp4(w)
            make_args = lambda x: (x, t.packed, t.block_scale, t.global_scale, 64, None, torch.tensor(0.001),  # noqa: E731
                                   "nvfp4", "block")
            fn, reference = dispatch.nvfp4_linear, ref.nvfp4_linear
        out = fn(*make_args(x))
        assert out[[1, 3]].isnan().all() and not out[[0, 2, 4]].isnan().any()
        good = x[[0, 2, 4]]
        assert torch.allclose(out[[0, 2, 4]], reference(*make_args(good)), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError) as expected:
            reference(*make_args(x))
        monkeypatch.setattr(dispatch, "CHECK_FINITE", True)
        with pytest.raises(ValueError, match=str(expected.value)):
            fn(*make_args(x))

    # -------------------------------------------------------------------------------- dispatch/fallback

    def test_uncovered_combinations_fall_back_to_the_reference(self):
        x, w = make_x(4, 64, seed=90), make_w(16, 64)
        t8 = numerics.quantize_int8(w, "channel")
        args = (x, t8.q, t8.scale, None, None, "fp8_e4m3", "token")  # fp8 activations on int8 weights
        assert dispatch.plan("int8_linear", *args).startswith("reference")
        assert torch.equal(dispatch.int8_linear(*args), ref.int8_linear(*args))
        t4 = numerics.quantize_int4(w, 24)
        args = (x, t4.packed, t4.scale, None, 24, 4, 64, None, None, "int8", "token")  # no K tile fits the group
        assert dispatch.plan("int4_linear", *args).startswith("reference")
        assert torch.equal(dispatch.int4_linear(*args), ref.int4_linear(*args))

    def test_registered_wrapper_forwards_to_dispatch(self):
        x, w = make_x(3, 64, seed=91), make_w(16, 64)
        t = numerics.quantize_nvfp4(w)
        args = (x, t.packed, t.block_scale, t.global_scale, 64, None, None, "none", "block")
        impl = triton_lowering._cuda_impl("nvfp4_linear")
        assert torch.equal(impl(*args), dispatch.nvfp4_linear(*args))


# ------------------------------------------------------------------------------------------ registration


def test_register_attaches_cuda_kernels():
    assert triton_lowering.available()
    assert triton_lowering.register() is True
    assert triton_lowering.register() is True  # idempotent
    for name in triton_lowering.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qcompile::{name}", "CUDA")
    # CPU tensors still run the CPU lowering (the integer GEMM; the reference's function up to float32 rounding).
    from qcompile.lowering.cpu import int8 as cpu_int8

    x, w = make_x(2, 32, torch.float32), make_w(8, 32)
    t = numerics.quantize_int8(w, "channel")
    args = (x, t.q, t.scale, None, None, "int8", "token")
    got = torch.ops.qcompile.int8_linear(*args)
    assert torch.equal(got, cpu_int8.int8_linear(*args))
    want = ref.int8_linear(*args)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


test_register_attaches_cuda_kernels.__test__ = not INTERPRETED


# ------------------------------------------------------------------------------------------------- CUDA


@pytest.fixture
def cuda():
    if INTERPRETED or not HAS_CUDA:
        pytest.skip("needs a CUDA device (and Triton in compiled mode)")
    triton_lowering.register()
    return torch.device("cuda")


def _cuda_cases():
    """(op, weight maker, input format, granularity, static scale) covering every recipe's combination."""
    return [
        ("int8_linear", "int8", "int8", "token", None),
        ("int8_linear", "int8", "int8", "tensor", 0.02),
        ("fp8_linear", "fp8_channel", "fp8_e4m3", "token", None),
        ("fp8_linear", "fp8_tensor", "fp8_e4m3", "tensor", 0.01),
        ("fp8_linear", "fp8_block", "none", "tensor", None),
        ("int4_linear", "int4", "none", "tensor", None),
        ("int4_linear", "int4_asym", "none", "tensor", None),
        ("int4_linear", "int4", "fp8_e4m3", "tensor", 0.01),
        ("nvfp4_linear", "nvfp4", "none", "block", None),
        ("nvfp4_linear", "nvfp4", "nvfp4", "block", 0.002),
    ]


def _weight_args(kind: str, w: torch.Tensor):
    if kind == "int8":
        t = numerics.quantize_int8(w, "channel")
        return (t.q, t.scale), numerics.dequantize_int8(t)
    if kind.startswith("fp8"):
        gran = kind.split("_")[1]
        t = numerics.quantize_fp8(w, gran, block_size=128)
        return (t.q, t.scale, 128 if gran == "block" else 0), numerics.dequantize_fp8(t)
    if kind.startswith("int4"):
        t = numerics.quantize_int4(w, 128, symmetric=kind == "int4")
        return (t.packed, t.scale, t.zero_point, 128, 4, w.shape[1]), numerics.dequantize_int4(t)
    t = numerics.quantize_nvfp4(w)
    return (t.packed, t.block_scale, t.global_scale, w.shape[1]), numerics.dequantize_nvfp4(t)


@pytest.mark.parametrize("case", _cuda_cases(), ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
@pytest.mark.parametrize("m", [1, 16, 300])
def test_cuda_full_size(cuda, case, m):
    op, kind, fmt, gran, static = case
    if ("fp8" in kind or fmt == "fp8_e4m3") and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    n, k = 4096, 4096 + 64  # K not a multiple of the 128-wide tiles either
    for dtype in (torch.bfloat16, torch.float16):
        x = make_x(m, k, dtype, seed=m, device=cuda)
        w = make_w(n, k, device=cuda)
        wargs, w_deq = _weight_args(kind, w)
        bias = torch.randn(n, device=cuda)
        scale = None if static is None else torch.tensor(static, device=cuda)
        args = (x, *wargs, bias, scale, fmt, gran)
        assert dispatch.plan(op, *args).startswith("triton"), dispatch.plan(op, *args)
        out = getattr(torch.ops.qcompile, op)(*args)  # the registered CUDA implementation
        expected = getattr(ref, op)(*args)
        assert_matches(out, expected, ref.quantize_input(x, fmt, gran, scale), w_deq, bias)


@pytest.mark.parametrize("weights", ["int4", "int4_asym", "nvfp4"])
def test_cuda_gemv_every_configuration(cuda, weights):
    """Tuning keeps the fastest kernel without checking it: here every GEMV configuration is checked on hardware."""
    n, k = 4096 + 48, 4096 + 64
    w = make_w(n, k, device=cuda)
    wargs, w_deq = _weight_args(weights, w)
    bias = torch.randn(n, device=cuda)
    for m, dtype in ((1, torch.bfloat16), (3, torch.float16)):
        x = make_x(m, k, dtype, seed=m + 5, device=cuda)
        if weights == "nvfp4":
            packed, bscale, gs, _ = wargs
            expected = ref.nvfp4_linear(x, *wargs, bias, None, "none", "block")
            run = functools.partial(launch.w4_gemm, x, None, packed, bscale, None, 16, gs.reshape(1), bias, dtype)
        else:
            packed, scale, zp, group = wargs[:4]
            expected = ref.int4_linear(x, *wargs, bias, None, "none", "tensor")
            run = functools.partial(launch.w4_gemm, x, None, packed, scale, zp, group, None, bias, dtype)
        configs = launch._gemv_configs(m, 16 if weights == "nvfp4" else 128, weights == "nvfp4")
        assert len(configs) >= 4
        for cfg in configs:
            out = run(config=cfg)
            assert_matches(out, expected, x, w_deq, bias)


def test_cuda_activation_quantization_bitwise(cuda):
    x = make_x(64, 5000, torch.bfloat16, device=cuda)
    for fmt, quant in (("int8", numerics.quantize_int8), ("fp8_e4m3", numerics.quantize_fp8)):
        q, s = launch.quantize_rows(x, fmt)
        r = quant(x, "token")
        assert torch.equal(s, r.scale.reshape(-1)), (fmt, (s - r.scale.reshape(-1)).abs().max())
        differ = (_bits(q) != _bits(r.q)).nonzero()[:8]
        assert differ.numel() == 0, [(fmt, tuple(i.tolist()), float(x[tuple(i)]), float(x[tuple(i)].float() / s[i[0]]),
                                      int(_bits(q)[tuple(i)]), int(_bits(r.q)[tuple(i)])) for i in differ]
    gs = x.float().abs().amax() / 2688
    packed, bscale = launch.quantize_nvfp4(x, gs)
    r = numerics.quantize_nvfp4(x, global_scale=gs)
    assert torch.equal(packed, r.packed) and torch.equal(_bits(bscale), _bits(r.block_scale))


def test_cuda_torch_compile_uses_the_kernels(cuda):
    lin = torch.nn.Linear(1024, 512).to(cuda, torch.bfloat16)
    t = numerics.quantize_int4(lin.weight.detach(), 128)

    def f(x):
        return torch.ops.qcompile.int4_linear(x, t.packed, t.scale, None, 128, 4, 1024, lin.bias, None, "none",
                                              "tensor")

    x = torch.randn(3, 1024, device=cuda, dtype=torch.bfloat16)
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x), dispatch.int4_linear(x, t.packed, t.scale, None, 128, 4, 1024, lin.bias,
                                                                 None, "none", "tensor"))
