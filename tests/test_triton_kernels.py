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
        return f"n{value.BLOCK_N}-c{value.BLOCK_C}-w{value.num_warps}"
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

    # ------------------------------------------------------------------------------ CUDA-core GEMV (M <= 4)
    # lowering/triton/gemv.py has no tl.dot, so bf16 activations are checked in the interpreter as well.

    @staticmethod
    def _gemv_case(weights: str, n: int, k: int, seed: int, group: int = 64):
        """(weight args for launch.w4_gemm, dequantized weight, quantized tensor) for random weights (rows of varied
        magnitude) with all-zero groups/blocks (rows 0-1, and one block in the middle of row 5)."""
        w = torch.randn(n, k, generator=_gen(seed)) * torch.rand(n, 1, generator=_gen(seed + 1)) * 3
        w[:2, :128] = 0.0
        w[5, 160:176] = 0.0
        if weights == "nvfp4":
            t = numerics.quantize_nvfp4(w)
            args = (t.packed, t.block_scale, None, 16, t.global_scale.reshape(1).float())
            return args, numerics.dequantize_nvfp4(t), t
        bits = 3 if weights == "int3" else 4
        t = numerics.quantize_int4(w, group, symmetric=weights != "int4_asym", bits=bits)
        return (t.packed, t.scale, t.zero_point, group, None), numerics.dequantize_int4(t), t

    @staticmethod
    def _gemv_reference(weights: str, t, x, bias):
        if weights == "nvfp4":
            return ref.nvfp4_linear(x, t.packed, t.block_scale, t.global_scale, x.shape[1], bias, None, "none",
                                    "block")
        return ref.int4_linear(x, t.packed, t.scale, t.zero_point, t.group_size, t.bits, x.shape[1], bias, None,
                               "none", "tensor")

    @pytest.mark.parametrize("weights", ["int4", "int4_asym", "int3", "nvfp4"])
    @pytest.mark.parametrize("m,dtype", [(1, torch.bfloat16), (2, torch.float16), (3, torch.float32),
                                         (4, torch.bfloat16)], ids=_gemv_id)
    def test_gemv_matches_reference(self, weights, m, dtype):
        """Every row count of the GEMV, each activation dtype, every 4-bit weight kind, against the reference.

        N = 37 is no multiple of BLOCK_N; K = 330 (INT, groups of 64: K is no multiple of the group or of the
        32-element chunk, the padded row holds 12 chunks) or 350 (NVFP4: 11 chunks, so the last iteration of
        BLOCK_C = 4 re-reads a chunk past the row's end). Bias on odd M; a NaN in the last row (M > 1) must
        make that output row NaN, as in the reference, and leave the others exact."""
        n, k = 37, (350 if weights == "nvfp4" else 330)
        seed = 100 * m + len(weights) + (7 if dtype == torch.float32 else 0)
        wargs, w_deq, t = self._gemv_case(weights, n, k, seed)
        x = (torch.randn(m, k, generator=_gen(seed + 2)) * 2).to(dtype)
        if m > 1:
            x[-1, 7] = float("nan")
        bias = torch.randn(n, generator=_gen(seed + 3)) if m % 2 else None
        packed, scale, zp, group, gs = wargs
        out = launch.w4_gemm(x, None, packed, scale, zp, group, gs, bias, dtype, config=launch.INTERPRET_GEMV)
        want = self._gemv_reference(weights, t, x, bias)
        assert out.isnan().all(dim=1).tolist() == [m > 1 and i == m - 1 for i in range(m)]
        assert_matches(out, want, x.nan_to_num(0.0), w_deq, bias)

    @pytest.mark.parametrize("cfg,m,dtype", [
        (launch.GemvCfg(4, 4, 1), 1, torch.float16), (launch.GemvCfg(8, 8, 2), 4, torch.float32),
        (launch.GemvCfg(2, 16, 1), 3, torch.bfloat16), (launch.GemvCfg(16, 2, 1), 2, torch.float16),
    ], ids=_gemv_id)
    def test_gemv_configurations_agree(self, cfg, m, dtype):
        """Other GEMV tiles: chunk counts that BLOCK_C does not divide (the last iteration re-reads chunks), more
        rows per program than the last program has, and BLOCK_C below the thread count (one warp across rows)."""
        n = 37
        bias = torch.randn(n, generator=_gen(9))
        for weights in ("int4", "int4_asym", "nvfp4"):
            k = 350 if weights == "nvfp4" else 330
            x = make_x(m, k, dtype, seed=75 + m)
            (packed, scale, zp, group, gs), w_deq, t = self._gemv_case(weights, n, k, 31)
            out = launch.w4_gemm(x, None, packed, scale, zp, group, gs, bias, dtype, config=cfg)
            assert_matches(out, self._gemv_reference(weights, t, x, bias), x, w_deq, bias)

    # ------------------------------------------------------------------------- tensor-core GEMV (M <= 4)
    # Under the interpreter w4_gemv_mma_kernel runs its lane program with the MMA and the packed 16-bit decoding
    # written out in float32 (gemv.py); which lane loads which weights and activations, their pairing, the scales,
    # the split of K over warps and the final sum are the compiled kernel's.

    @pytest.mark.parametrize("weights", ["int4", "int4_asym", "int3", "nvfp4"])
    @pytest.mark.parametrize("m,dtype", [(1, torch.float16), (2, torch.bfloat16), (3, torch.float16),
                                         (4, torch.bfloat16)], ids=_gemv_id)
    def test_gemv_mma_matches_reference(self, weights, m, dtype):
        """Every row count and weight kind against the reference. N = 37: the second program's two row tiles are
        partly past N. K = 328 (INT, groups of 128: the last 128-element block holds 72 elements, the rest of
        the lanes' chunks masked) or 352 (NVFP4: 2.75 blocks, the last lane's chunk re-reads the row's last).
        Zero groups/blocks, a NaN in the last row (M > 1) that must leave the other rows exact, bias on odd M."""
        n, k = 37, (352 if weights == "nvfp4" else 328)
        seed = 100 * m + len(weights) + 3
        wargs, w_deq, t = self._gemv_case(weights, n, k, seed, group=128)
        x = (torch.randn(m, k, generator=_gen(seed + 2)) * 2).to(dtype)
        if m > 1:
            x[-1, 300] = float("nan")
        bias = torch.randn(n, generator=_gen(seed + 3)) if m % 2 else None
        packed, scale, zp, group, gs = wargs
        out = launch.w4_gemm(x, None, packed, scale, zp, group, gs, bias, dtype, config=launch.INTERPRET_GEMV_MMA)
        want = self._gemv_reference(weights, t, x, bias)
        assert out.isnan().all(dim=1).tolist() == [m > 1 and i == m - 1 for i in range(m)]
        assert_matches(out, want, x.nan_to_num(0.0), w_deq, bias)

    @pytest.mark.parametrize("cfg,m,dtype", [
        (launch.GemvCfg(16, 8, 2, True), 4, torch.float16), (launch.GemvCfg(32, 16, 4, True), 1, torch.bfloat16),
    ], ids=_gemv_id)
    def test_gemv_mma_configurations_agree(self, cfg, m, dtype):
        """One row tile per program, and warps splitting K: 2 or 4 warps over 6 blocks of 128 (K = 712, INT
        groups of 256; NVFP4 K = 736), so some warps run past the row in the last iteration."""
        n = 45
        bias = torch.randn(n, generator=_gen(19))
        for weights in ("int4", "int4_asym", "nvfp4"):
            k = 736 if weights == "nvfp4" else 712
            x = make_x(m, k, dtype, seed=85 + m)
            (packed, scale, zp, group, gs), w_deq, t = self._gemv_case(weights, n, k, 41, group=256)
            out = launch.w4_gemm(x, None, packed, scale, zp, group, gs, bias, dtype, config=cfg)
            assert_matches(out, self._gemv_reference(weights, t, x, bias), x, w_deq, bias)

    def test_gemv_mma_is_chosen_where_it_applies(self):
        """The tensor-core GEMV runs for fp16/bf16 activations with K a multiple of 8 and INT groups a multiple of
        128 (or NVFP4); float32 activations, groups of 64 and odd K keep the CUDA-core GEMV, and asking for it
        there is an error."""
        x = make_x(2, 256, seed=88)
        assert launch._gemv_mma(x, 128, False) and launch._gemv_mma(x.bfloat16(), 16, True)
        assert not launch._gemv_mma(x.float(), 128, False)
        assert not launch._gemv_mma(x, 64, False)
        assert not launch._gemv_mma(make_x(2, 250, seed=88), 16, True)
        assert launch._gemv_configs(2, 128, False, True) == (launch.INTERPRET_GEMV_MMA,)
        t = numerics.quantize_int4(make_w(16, 256), 64)
        with pytest.raises(ValueError, match="multiple of 128"):
            launch.w4_gemm(x, None, t.packed, t.scale, None, 64, None, None, x.dtype,
                           config=launch.INTERPRET_GEMV_MMA)
        calls = []
        kernel = launch.gemv.w4_gemv_mma_kernel
        t = numerics.quantize_int4(make_w(16, 256), 128)
        try:  # the default launch of an fp16 decode step takes the tensor-core kernel
            launch.gemv.w4_gemv_mma_kernel = _Recording(kernel, calls)
            out = launch.w4_gemm(x, None, t.packed, t.scale, None, 128, None, None, x.dtype)
        finally:
            launch.gemv.w4_gemv_mma_kernel = kernel
        assert calls
        want = ref.int4_linear(x, t.packed, t.scale, None, 128, 4, 256, None, None, "none", "tensor")
        assert_matches(out, want, x, numerics.dequantize_int4(t))

    def test_gemv_is_the_decode_path_and_rejects_what_it_cannot_run(self):
        x, w = make_x(2, 256, seed=78), make_w(16, 256)
        t = numerics.quantize_int4(w, 128)
        assert launch._gemv_configs(2, 128, False) == (launch.INTERPRET_GEMV,)
        assert launch._gemv_configs(launch.GEMV_MAX_M + 1, 128, False) == ()
        assert launch._gemv_configs(1, 48, False) == ()  # a 32-element chunk would straddle groups of 48
        x[0, 5], x[1, 7], x[1, 9] = float("nan"), float("inf"), float("-inf")
        for bias in (None, torch.randn(16, generator=_gen(10))):  # NaN and inf propagate as in the reference
            out = launch.w4_gemm(x, None, t.packed, t.scale, None, 128, None, bias, x.dtype)
            want = ref.int4_linear(x, t.packed, t.scale, None, 128, 4, 256, bias, None, "none", "tensor")
            assert out.isnan().any() and out.isnan().all(dim=1).tolist() == want.isnan().all(dim=1).tolist()
            assert_matches(out, want, x.nan_to_num(0, 0, 0), numerics.dequantize_int4(t), bias)
        a, sa = launch.quantize_rows(x.nan_to_num(0, 0, 0), "int8")
        with pytest.raises(ValueError, match="float activations"):
            launch.w4_gemm(a, sa, t.packed, t.scale, None, 128, None, None, x.dtype, config=launch.GemvCfg(8, 16))
        with pytest.raises(ValueError, match="multiple of 32"):
            t48 = numerics.quantize_int4(w, 48)
            launch.w4_gemm(x, None, t48.packed, t48.scale, None, 48, None, None, x.dtype, config=launch.GemvCfg(8, 4))
        # NVFP4 rows of 24 bytes (K = 40) are no whole number of 16-byte chunks: the tile kernel runs them.
        n4 = numerics.quantize_nvfp4(make_w(16, 40))
        x40 = make_x(2, 40, seed=79)
        gs = n4.global_scale.reshape(1).float()
        with pytest.raises(ValueError, match="16 bytes"):
            launch.w4_gemm(x40, None, n4.packed, n4.block_scale, None, 16, gs, None, x.dtype,
                           config=launch.GemvCfg(8, 4))
        out = launch.w4_gemm(x40, None, n4.packed, n4.block_scale, None, 16, gs, None, x.dtype)
        assert_matches(out, ref.nvfp4_linear(x40, n4.packed, n4.block_scale, n4.global_scale, 40, None, None, "none",
                                             "block"), x40, numerics.dequantize_nvfp4(n4))

    @pytest.mark.parametrize("case", ["int4_gemv", "int4_asym_tile", "int4_a8", "nvfp4_gemv", "nvfp4_tile",
                                      "int8_prologue", "int8_static", "fp8_block", "fp8_token_prefill"])
    def test_plan_launches_match_the_launchers_bitwise(self, case):
        """A plan fixes the configuration, flags and strides of its launch at the first call for an M
        (`launch.w4_prepare` / `w8_prepare`); every call, with new activations of any row stride, gives the bits of
        the general launchers."""
        n, k = 24, 256
        w, bias = make_w(n, k), torch.randn(n, generator=_gen(5))
        m = {"int4_asym_tile": 7, "nvfp4_tile": 20, "fp8_token_prefill": 20, "int8_static": 5}.get(case, 2)
        if case.startswith("int4"):
            t = numerics.quantize_int4(w, 128, symmetric=case != "int4_asym_tile")
            fmt = "int8" if case == "int4_a8" else "none"
            args = (t.packed, t.scale, t.zero_point, 128, 4, k, bias, None, fmt, "token")
            op = dispatch.int4_linear

            def want(x):
                a, sa = dispatch.quantize_activation(x, fmt, "token", None)
                return launch.w4_gemm(a, sa, t.packed, t.scale, t.zero_point, 128, None, bias, x.dtype)
        elif case.startswith("nvfp4"):
            t = numerics.quantize_nvfp4(w)
            args = (t.packed, t.block_scale, t.global_scale, k, bias, None, "none", "block")
            op = dispatch.nvfp4_linear

            def want(x):
                return launch.w4_gemm(x, None, t.packed, t.block_scale, None, 16, t.global_scale.reshape(1).float(),
                                      bias, x.dtype)
        else:
            fp8 = case.startswith("fp8")
            block = 128 if case == "fp8_block" else 0
            t = numerics.quantize_fp8(w, "block" if block else "channel", block_size=128) if fp8 else \
                numerics.quantize_int8(w, "channel")
            fmt = "none" if block else ("fp8_e4m3" if fp8 else "int8")
            static = torch.tensor(0.02) if case == "int8_static" else None
            gran = "tensor" if static is not None else "token"
            args = ((t.q, t.scale, block) if fp8 else (t.q, t.scale)) + (bias, static, fmt, gran)
            op = dispatch.fp8_linear if fp8 else dispatch.int8_linear

            def want(x):
                if dispatch.prologue_quant(m, fmt, gran, static):
                    return launch.w8_gemm(x, None, t.q, t.scale, 0, bias, x.dtype, quant_a=True)
                a, sa = dispatch.quantize_activation(x, fmt, gran, static)
                return launch.w8_gemm(a, sa, t.q, t.scale, block, bias, x.dtype)
        builds = dispatch.plan_stats()["builds"]
        for seed in range(3):
            x = make_x(m, k, torch.bfloat16, seed=40 + seed)
            if seed == 2:  # rows further apart than K
                x = torch.cat([x, x], dim=1)[:, :k]
            assert _same_bits(op(x, *args), want(x)), seed
        if dispatch.PLAN_CACHE:
            assert dispatch.plan_stats()["builds"] == builds + 1

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
        plan = dispatch.plan(op, *args)
        assert plan.startswith("triton"), plan
        out = getattr(torch.ops.qcompile, op)(*args)  # the registered CUDA implementation
        expected = getattr(ref, op)(*args)
        # the prefill path rounds INT weights (and the float32 bias) once to the activation dtype
        rounding = _EPS[dtype] / 2 if "dequantize kernel" in plan else 0.0
        assert_matches(out, expected, ref.quantize_input(x, fmt, gran, scale), w_deq, bias, weight_rounding=rounding)


class _Recording:
    """A kernel that records its launches."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]


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
        configs = launch._gemv_configs(m, 16 if weights == "nvfp4" else 128, weights == "nvfp4", True)
        assert len(configs) >= 8 and any(cfg.MMA for cfg in configs)
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


# ------------------------------------------------------------------ PyTorch's GEMMs and the fused prologue

from qcompile.lowering.triton import dequant  # noqa: E402


def _same_bits(out: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit-for-bit equality, NaN matching NaN of any payload."""
    if out.shape != want.shape or out.dtype != want.dtype:
        return False
    nan = out.isnan()
    if not torch.equal(nan, want.isnan()):
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[out.element_size()]
    return torch.equal(out[~nan].view(ints), want[~nan].view(ints))


_DEQUANT_WEIGHTS = [(4, True, 128), (4, False, 128), (3, True, 32), (3, False, 32), (4, True, 16), (4, False, 48),
                    (4, True, 24), (3, False, 25)]


class TestInterpreterTorchPaths:
    """The dequantize + cuBLAS prefill path (dequant.py) and the GEMM that quantizes its own activations."""

    __test__ = INTERPRETED

    @pytest.mark.parametrize("bits,sym,group", _DEQUANT_WEIGHTS)
    def test_dequant_kernel_matches_reference_bitwise(self, bits, sym, group):
        """K = 200 is no multiple of most groups (the last group is partial, in_features < Kp); huge weights
        overflow fp16 to inf as the reference's cast does, tiny ones become subnormal or zero alike."""
        w = make_w(21, 200, seed=bits + group)
        w[5] *= 1e30
        w[6] *= 1e-30
        w[7, 100:] *= 3e4
        t = numerics.quantize_int4(w, group, symmetric=sym, bits=bits)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            want = numerics.dequantize_int4(t, dtype)
            for block_kb in (16, 64):  # tiles inside one group, and groups inside one tile (or gathered scales)
                out = dequant.dequantize_w4(t.packed, t.scale, t.zero_point, group, False, 200, dtype,
                                            block_n=4, block_kb=block_kb)
                assert _same_bits(out, want), (dtype, block_kb)

    def test_dequant_kernel_rounding_ties_and_overflow(self):
        """Products that fall exactly halfway between two bf16/fp16 values round to the even one, and those past
        the dtype's range become inf, as the reference's cast does."""
        t = numerics.quantize_int4(make_w(8, 64, seed=5), 16, symmetric=False)
        fmax = torch.finfo(torch.float32).max
        ties = torch.tensor([1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-11, 1 + 3 * 2.0**-11])  # bf16 / fp16 midpoints
        t.scale[0] = ties
        t.scale[1] = -ties
        t.scale[2] = torch.tensor([fmax / 15, 65504.0 / 15, 65520.0 / 15, 3.3e38 / 15])
        t.zero_point[:3] = 0
        # codes 1 (the scales themselves: the ties), 3 and 15 (the largest products) in every group of rows 0-2
        t.packed[:3] = torch.tensor([0x1F, 0x3F, 0xF1, 0x13], dtype=torch.uint8).repeat(8)
        for dtype in (torch.bfloat16, torch.float16):
            want = numerics.dequantize_int4(t, dtype)
            exact = numerics.dequantize_int4(t)
            assert want.isinf().any() and (want[:2].float() != exact[:2]).any()  # overflow and rounding happen
            out = dequant.dequantize_w4(t.packed, t.scale, t.zero_point, 16, False, 64, dtype)
            assert _same_bits(out, want), dtype

    def test_dequant_kernel_nvfp4_bitwise(self):
        """E2M1 value times block scale, without the global scale: exact in fp16/bf16, -0.0 codes and NaN block
        scales included."""
        w = make_w(13, 200, seed=3) * 1e30  # a huge global scale stays out of the buffer
        w[2, :40] = -1e-35  # negative values that round to -0.0 (code 8)
        w[3, :16] = 0.0
        t = numerics.quantize_nvfp4(w)
        bscale = t.block_scale.clone()
        bscale.view(torch.uint8)[4, 2] = 0x7F  # a NaN block scale
        codes = numerics.unpack_nibbles(t.packed)
        exact = (numerics.e2m1_decode(codes) * bscale.float().repeat_interleave(16, dim=1))[:, :200]
        assert exact[2, 0].item() == 0 and exact[2, 0].signbit() and exact[4, 32:48].isnan().all()
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            out = dequant.dequantize_w4(t.packed, bscale, None, 16, True, 200, dtype)
            assert _same_bits(out, exact.to(dtype)), dtype
            assert _same_bits(out.float(), exact)  # nothing was rounded

    @pytest.mark.parametrize("bits,sym,group", [(4, True, 128), (4, False, 128), (3, False, 32), (4, True, 24),
                                                (3, False, 25)])
    def test_prefill_int_matches_reference(self, bits, sym, group):
        x, w = make_x(70, 200, seed=group), make_w(40, 200)
        t = numerics.quantize_int4(w, group, symmetric=sym, bits=bits)
        bias = torch.randn(40, generator=_gen(11))  # float32: rounded to fp16 for the addmm
        args = (x, t.packed, t.scale, t.zero_point, group, bits, 200, bias, None, "none", "tensor")
        assert "dequantize kernel to float16 + torch.addmm" in dispatch.plan("int4_linear", *args)
        # each weight (and the bias) rounded once to fp16: relative error up to 2**-11
        assert_matches(dispatch.int4_linear(*args), ref.int4_linear(*args), x, numerics.dequantize_int4(t), bias,
                       weight_rounding=2.0**-11)

    def test_prefill_nvfp4_is_exact_up_to_summation(self):
        """Buffer exact, global scale as the GEMM's alpha, fp16 bias: no rounding but the output's."""
        x = make_x(2 * 40, 200, seed=12).reshape(2, 40, 200)
        t = numerics.quantize_nvfp4(make_w(24, 200) * 1e-3)
        bias = torch.randn(24, generator=_gen(12)).half()
        for b in (bias, None):
            args = (x, t.packed, t.block_scale, t.global_scale, 200, b, None, "none", "block")
            assert "dequantize kernel" in dispatch.plan("nvfp4_linear", *args)
            out = dispatch.nvfp4_linear(*args)
            assert out.shape == (2, 40, 24)
            assert_matches(out, ref.nvfp4_linear(*args), x, numerics.dequantize_nvfp4(t), b)

    def test_prefill_bf16_activations(self):
        """bf16 runs here too (the product is torch's, not the interpreter's dot)."""
        x, w = make_x(64, 160, torch.bfloat16, seed=13), make_w(32, 160)
        t = numerics.quantize_int4(w * 1e20, 32, symmetric=False)  # beyond fp16, fine in bf16
        args = (x, t.packed, t.scale, t.zero_point, 32, 4, 160, None, None, "none", "tensor")
        assert "dequantize kernel to bfloat16" in dispatch.plan("int4_linear", *args)
        assert_matches(dispatch.int4_linear(*args), ref.int4_linear(*args), x, numerics.dequantize_int4(t),
                       weight_rounding=2.0**-8)

    def test_prefill_threshold_switch_and_overflow_guard(self, monkeypatch):
        w = make_w(32, 128)
        t = numerics.quantize_int4(w, 64)
        small = make_x(dequant.PREFILL_DEQUANT_MIN_M - 1, 128, seed=14)
        large = make_x(dequant.PREFILL_DEQUANT_MIN_M, 128, seed=14)
        make = lambda x, t: (x, t.packed, t.scale, t.zero_point, 64, 4, 128, None, None, "none", "tensor")  # noqa: E731
        assert "in-kernel dequantization" in dispatch.plan("int4_linear", *make(small, t))
        assert "dequantize kernel" in dispatch.plan("int4_linear", *make(large, t))
        assert "in-kernel dequantization" in dispatch.plan("int4_linear", *make(large.float(), t))  # fp32: Triton
        # weights beyond fp16's range: the buffer would overflow, so fp16 keeps the Triton GEMM (exact here)
        big = numerics.quantize_int4(w * 1e5, 64)
        x = large * 1e-4
        assert "in-kernel dequantization" in dispatch.plan("int4_linear", *make(x, big))
        assert_matches(dispatch.int4_linear(*make(x, big)), ref.int4_linear(*make(x, big)), x,
                       numerics.dequantize_int4(big))
        assert "dequantize kernel" in dispatch.plan("int4_linear", *make(x.bfloat16(), big))
        monkeypatch.setattr(dequant, "W4_PREFILL", "triton")
        args = make(large, t)
        assert "in-kernel dequantization" in dispatch.plan("int4_linear", *args)
        assert_matches(launch.w4_gemm(large, None, t.packed, t.scale, None, 64, None, None, large.dtype),
                       ref.int4_linear(*args), large, numerics.dequantize_int4(t))

    # ------------------------------------------------------------- activation quantization in the GEMM prologue

    @staticmethod
    def _activations(fmt: str, dtype) -> torch.Tensor:
        """Rows: random, all zero, NaN, inf, exact ties (scale 1: amax 127 / 448), tiny, huge."""
        x = make_x(9, 200, torch.float32, seed=15)
        x[1] = 0.0
        x[2, 17] = float("nan")
        x[3, 0] = float("-inf")
        qmax = 127.0 if fmt == "int8" else 448.0
        if fmt == "int8":
            ties = torch.arange(-99, 101, dtype=torch.float32) + 0.5
        else:
            ties = fp8_midpoints()[:200]
        x[4] = ties
        x[4, 0] = qmax  # amax = qmax: scale exactly 1, the ties reach the rounding unscaled
        x[5] *= 1e-30 if dtype != torch.float16 else 1e-4
        x[6] *= 1e30 if dtype != torch.float16 else 1e2
        return x.to(dtype)

    @pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
    def test_prologue_quant_equals_two_kernels_bitwise(self, fmt, dtype):
        x = self._activations(fmt, dtype)
        w = make_w(40, 200)
        t = numerics.quantize_int8(w, "channel") if fmt == "int8" else numerics.quantize_fp8(w, "channel")
        bias = torch.randn(40, generator=_gen(16))
        a, sa = launch.quantize_rows(x, fmt)
        r = (numerics.quantize_int8 if fmt == "int8" else numerics.quantize_fp8)(x[[0, 1, 4, 5, 6, 7, 8]], "token")
        assert torch.equal(_bits(a[[0, 1, 4, 5, 6, 7, 8]]), _bits(r.q))  # the two-kernel path is the reference's
        for cfg in (launch.Cfg(16, 16, 32, 1, 1), launch.Cfg(16, 32, 64, 3, 1), launch.Cfg(16, 64, 128, 2, 1)):
            two = launch.w8_gemm(a, sa, t.q, t.scale, 0, bias, dtype, config=cfg)
            one = launch.w8_gemm(x, None, t.q, t.scale, 0, bias, dtype, config=cfg, quant_a=True)
            assert _same_bits(one, two), cfg
            assert one[[2, 3]].isnan().all() and not one[[0, 1, 4, 5, 6, 7, 8]].isnan().any()

    @pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
    def test_prologue_quant_through_dispatch(self, fmt, monkeypatch):
        x = self._activations(fmt, torch.float16)
        good = [0, 1, 4, 5, 6, 7, 8]
        w = make_w(48, 200)
        bias = torch.randn(48, generator=_gen(17))
        if fmt == "int8":
            t = numerics.quantize_int8(w, "channel")
            make = lambda x: (x, t.q, t.scale, bias, None, "int8", "token")  # noqa: E731
            op, w_deq = "int8_linear", numerics.dequantize_int8(t)
        else:
            t = numerics.quantize_fp8(w, "block", block_size=64)
            make = lambda x: (x, t.q, t.scale, 64, bias, None, "fp8_e4m3", "token")  # noqa: E731
            op, w_deq = "fp8_linear", numerics.dequantize_fp8(t)
        assert "prologue" in dispatch.plan(op, *make(x))
        out = getattr(dispatch, op)(*make(x))
        assert out[[2, 3]].isnan().all()
        xg = x[good]
        assert_matches(out[good], getattr(ref, op)(*make(xg)), ref.quantize_input(xg, fmt, "token", None), w_deq,
                       bias)
        longer = torch.cat([xg, xg, xg])  # 21 rows: past decode, the separate quantization kernel again
        assert "prologue" not in dispatch.plan(op, *make(longer))
        assert_matches(getattr(dispatch, op)(*make(longer)), getattr(ref, op)(*make(longer)),
                       ref.quantize_input(longer, fmt, "token", None), w_deq, bias)
        monkeypatch.setattr(dispatch, "CHECK_FINITE", True)
        with pytest.raises(ValueError, match="NaN or inf"):
            getattr(dispatch, op)(*make(x))


# ------------------------------------------------------------------------ choice logic and caches (any mode)


def test_weight_cache_follows_the_tensor():
    cache = dequant.WeightCache()
    calls = []

    def make(t):
        calls.append(1)
        return float(t.sum())

    t = torch.ones(4)
    assert cache.get(t, make) == 4.0 and cache.get(t, make) == 4.0 and len(calls) == 1
    assert cache.get(t.reshape(4), make) == 4.0 and len(calls) == 1  # a view of the same tensor hits
    t.mul_(2)  # an in-place update is a new version
    assert cache.get(t, make) == 8.0 and len(calls) == 2
    assert len(cache) == 1
    del t
    assert len(cache) == 0  # freed with its tensor: a later tensor at the same address starts afresh


def test_tinygemm_operands_reproduce_the_weight():
    """tinygemm's weight is (u - 8) * scale + zero per group, with scales-and-zeros [K/g, N, 2]: the conversion is
    exact in float32 for symmetric groups and within float32 rounding for asymmetric ones."""
    for sym in (True, False):
        t = numerics.quantize_int4(make_w(16, 256, seed=20), 64, symmetric=sym)
        u, sz = dequant.tinygemm_operands(t.packed, t.scale, t.zero_point, torch.float32)
        assert u.dtype == torch.int32 and int(u.min()) >= 0 and int(u.max()) <= 15 and sz.shape == (4, 16, 2)
        groups = (u.float() - 8).reshape(16, 4, 64)  # float32, as the reference computes code * scale
        w = groups * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]
        want = numerics.dequantize_int4(t)
        err = (w.reshape(16, 256) - want).abs()
        assert float(err.max()) <= (0.0 if sym else 2.0**-22 * float(want.abs().max()))
        # the uint8 layout _convert_weight_to_int4pack takes: the even element in the high nibble
        hi_first = dequant._pack_high_first(u)
        assert torch.equal(hi_first >> 4, u[:, 0::2].to(torch.uint8))
        assert torch.equal(hi_first & 0xF, u[:, 1::2].to(torch.uint8))


@pytest.mark.skipif(not hasattr(torch, "_weight_int4pack_mm_for_cpu"), reason="no CPU tinygemm in this torch")
def test_tinygemm_layout_through_the_cpu_kernel():
    """The CPU twin of tinygemm takes the same scales-and-zeros: a check of that layout and of the bf16 rounding
    this path documents (not bit-exact)."""
    for sym in (True, False):
        t = numerics.quantize_int4(make_w(32, 256, seed=21), 128, symmetric=sym)
        u, sz = dequant.tinygemm_operands(t.packed, t.scale, t.zero_point)
        x = make_x(5, 256, torch.bfloat16, seed=22)
        out = torch._weight_int4pack_mm_for_cpu(x, torch._convert_weight_to_int4pack_for_cpu(u, 2), 128, sz)
        want = ref.int4_linear(x, t.packed, t.scale, t.zero_point, 128, 4, 256, None, None, "none", "tensor")
        bound = x.double().abs() @ numerics.dequantize_int4(t).double().abs().T
        excess = (out.double() - want.double()).abs() - 2.0**-6 * bound - 2.0**-7 * want.double().abs()
        assert float(excess.max()) <= 0


def test_tinygemm_is_opt_in_and_cuda_only(monkeypatch):
    t = numerics.quantize_int4(make_w(16, 256), 128)
    x = make_x(2, 256, torch.bfloat16)
    assert not dequant.tinygemm_applies(x, False, t.packed, None, 128, False)  # default backend: Triton
    monkeypatch.setattr(dequant, "INT4_BACKEND", "tinygemm")
    assert not dequant.tinygemm_applies(x, False, t.packed, None, 128, False)  # CPU tensors never
    assert not dequant.tinygemm_applies(x, False, t.packed, None, 24, False)


def test_fp8_backend_choice_is_timed_once_per_shape(monkeypatch):
    """`auto` keeps the faster of the Triton GEMM and torch._scaled_mm per (M bucket, N, K, bias, fused)."""
    timings = {"run_triton": 2.0, "run_cublas": 1.0}
    timed = []
    monkeypatch.setattr(launch, "scaled_mm_supported", lambda a, b, out_dtype: True)
    monkeypatch.setattr(launch, "time_cuda", lambda fn, iters=10: timed.append(fn.__name__) or timings[fn.__name__])
    monkeypatch.setattr(dispatch, "_FP8_CHOICE", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(dispatch, "FP8_GEMM", "auto")
    x = torch.zeros(3, 64)
    w = torch.zeros(32, 64)
    assert dispatch._fp8_backend(x, None, w, None, None, torch.bfloat16, fused=True) == "scaled_mm"
    assert dispatch._fp8_backend(x, None, w, None, None, torch.bfloat16, fused=True) == "scaled_mm"
    assert timed == ["run_triton", "run_cublas"]
    timings["run_triton"] = 0.5  # unfused decode rows of the same shape are a separate choice
    assert dispatch._fp8_backend(x, None, w, None, None, torch.bfloat16) == "triton"
    assert dispatch.fp8_choices() == {(4, 32, 64, False, True): "scaled_mm", (4, 32, 64, False, False): "triton"}
    monkeypatch.setattr(dispatch, "FP8_GEMM", "triton")
    assert dispatch._fp8_backend(x, None, w, None, None, torch.bfloat16, fused=True) == "triton"


def test_prologue_quant_choice():
    assert dispatch.prologue_quant(1, "int8", "token", None)
    assert dispatch.prologue_quant(launch.DECODE_MAX_M, "fp8_e4m3", "token", None)
    assert not dispatch.prologue_quant(launch.DECODE_MAX_M + 1, "int8", "token", None)
    assert not dispatch.prologue_quant(4, "int8", "tensor", None)  # one scale for the whole call
    assert not dispatch.prologue_quant(4, "int8", "token", torch.tensor(0.1))  # static scale
    assert not dispatch.prologue_quant(0, "int8", "token", None)
    assert not dispatch.prologue_quant(4, "none", "token", None)


# ------------------------------------------------------------------------------------------ CUDA, new paths


@pytest.mark.parametrize("weights", ["int4", "int4_asym", "nvfp4"])
def test_cuda_prefill_dequant(cuda, weights):
    n, k = 4096 + 48, 4096 + 64
    w = make_w(n, k, device=cuda)
    wargs, w_deq = _weight_args(weights, w)
    for dtype in (torch.bfloat16, torch.float16):
        x = make_x(300, k, dtype, seed=31, device=cuda)
        bias = torch.randn(n, device=cuda).to(dtype)
        op, rest = ("nvfp4_linear", ("none", "block")) if weights == "nvfp4" else ("int4_linear", ("none", "tensor"))
        args = (x, *wargs, bias, None, *rest)
        assert "dequantize kernel" in dispatch.plan(op, *args)
        # INT: each weight rounded once to the activation dtype; NVFP4: exact buffer
        rounding = 0.0 if weights == "nvfp4" else _EPS[dtype] / 2
        assert_matches(getattr(dispatch, op)(*args), getattr(ref, op)(*args), x, w_deq, bias,
                       weight_rounding=rounding)
        if weights != "nvfp4":
            packed, scale, zp, group = wargs[:4]
            got = dequant.dequantize_w4(packed, scale, zp, group, False, k, dtype)
            assert _same_bits(got, w_deq.to(dtype))


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_cuda_prologue_quant(cuda, fmt):
    if fmt == "fp8_e4m3" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    n, k = 4096, 4096 + 64
    w = make_w(n, k, device=cuda)
    t = numerics.quantize_int8(w, "channel") if fmt == "int8" else numerics.quantize_fp8(w, "channel")
    bias = torch.randn(n, device=cuda)
    for m in (1, 16):
        x = make_x(m, k, torch.bfloat16, seed=m, device=cuda)
        a, sa = launch.quantize_rows(x, fmt)
        cfg = launch.Cfg(16, 64, 128, 1, 1)  # no split-K: float atomics would reorder the sums
        two = launch.w8_gemm(a, sa, t.q, t.scale, 0, bias, x.dtype, config=cfg)
        one = launch.w8_gemm(x, None, t.q, t.scale, 0, bias, x.dtype, config=cfg, quant_a=True)
        assert _same_bits(one, two)
        tuned = launch.w8_gemm(x, None, t.q, t.scale, 0, bias, x.dtype, quant_a=True)
        assert_matches(tuned, ref.int8_linear(x, t.q, t.scale, bias, None, "int8", "token") if fmt == "int8" else
                       ref.fp8_linear(x, t.q, t.scale, 0, bias, None, "fp8_e4m3", "token"),
                       ref.quantize_input(x, fmt, "token", None),
                       (numerics.dequantize_int8 if fmt == "int8" else numerics.dequantize_fp8)(t), bias)


@pytest.mark.parametrize("m", [1, 16, 300])
def test_cuda_scaled_mm_rowwise(cuda, m, monkeypatch):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("row-wise torch._scaled_mm needs sm_90")
    monkeypatch.setattr(dispatch, "FP8_GEMM", "scaled_mm")
    n, k = 4096, 4096
    w = make_w(n, k, device=cuda)
    t = numerics.quantize_fp8(w, "channel")
    x = make_x(m, k, torch.bfloat16, seed=m, device=cuda)
    bias = torch.randn(n, device=cuda).bfloat16()
    args = (x, t.q, t.scale, 0, bias, None, "fp8_e4m3", "token")
    # the bf16 result of _scaled_mm and then the bias: two roundings of the output
    assert_matches(dispatch.fp8_linear(*args), ref.fp8_linear(*args), ref.quantize_input(x, "fp8_e4m3", "token", None),
                   numerics.dequantize_fp8(t), bias, weight_rounding=2.0**-8)


@pytest.mark.parametrize("sym", [True, False])
def test_cuda_tinygemm(cuda, sym, monkeypatch):
    if not dequant.tinygemm_available():
        pytest.skip("this torch has no torch._weight_int4pack_mm")
    monkeypatch.setattr(dequant, "INT4_BACKEND", "tinygemm")
    n, k = 4096, 4096
    t = numerics.quantize_int4(make_w(n, k, device=cuda), 128, symmetric=sym)
    dequant._TINYGEMM.clear()
    for m in (1, 16):
        x = make_x(m, k, torch.bfloat16, seed=m, device=cuda)
        args = (x, t.packed, t.scale, t.zero_point, 128, 4, k, None, None, "none", "tensor")
        assert "tinygemm" in dispatch.plan("int4_linear", *args)
        out = dispatch.int4_linear(*args)
        # bf16 scales and zeros: not bit-exact, a relative weight error of a few bf16 ulps
        assert_matches(out, ref.int4_linear(*args), x, numerics.dequantize_int4(t), weight_rounding=2.0**-6)
    assert len(dequant._TINYGEMM) == 1  # repacked once for both calls
