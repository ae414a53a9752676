"""The Triton kernels compile for an H100 (sm_90) without a GPU: Triton lowers them to PTX and runs ptxas.

This catches what the CPU interpreter cannot: operations the NVIDIA backend rejects (dot operand types, FP8
conversions, minimum dot sizes), shared-memory overflows, and loops the software pipeliner leaves unpipelined.
Shapes are specialised as at run time for aligned tensors (pointers, N, K and row strides divisible by 16).
Representative variants only; every configuration is exercised on a GPU by the launchers' tuning.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from qcompile.lowering.triton import kernels, launch  # noqa: E402

if launch.interpreting():  # interpreted kernels cannot be compiled (see tests/test_triton_kernels.py)
    pytest.skip("Triton runs in interpreter mode in this process", allow_module_level=True)

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _PTXAS = triton.knobs.nvidia.ptxas.path
except Exception as error:  # pragma: no cover - depends on the Triton build
    pytest.skip(f"Triton's NVIDIA backend is not usable here: {error}", allow_module_level=True)

SM90 = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # H100: dynamic shared memory per block
_ALIGNED_INTS = {"N", "K", "KP2", "stride_xm", "stride_qm", "stride_om", "stride_am", "stride_bn", "stride_bsn",
                 "stride_wn", "stride_sn", "stride_zn"}


def compile_sm90(kernel, pointers: dict[str, str], constexprs: dict, num_warps=4, num_stages=3):
    names = kernel.arg_names
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in _ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True}
    return triton.compile(src, target=SM90, options=options)


def _gemm_consts(cfg: launch.Cfg) -> dict:
    return {"BLOCK_M": cfg.BLOCK_M, "BLOCK_N": cfg.BLOCK_N, "BLOCK_K": cfg.BLOCK_K, "GROUP_M": cfg.GROUP_M,
            "SPLIT_K": cfg.SPLIT_K}


def _check(compiled, pipelined: bool):
    assert compiled.metadata.shared <= SMEM_LIMIT
    if pipelined:  # multi-stage asynchronous copies of the K tiles
        assert compiled.asm["ttgir"].count("async_copy_global_to_local") >= 2


@pytest.mark.parametrize("is_fp8,static", [(True, False), (False, True)])
def test_quant_rows(is_fp8, static):
    out = "fp8e4nv" if is_fp8 else "i8"
    compile_sm90(kernels.quant_rows_kernel, {"x_ptr": "bf16", "q_ptr": out},
                 {"IS_FP8": is_fp8, "STATIC": static, "BLOCK": 4096}, num_warps=8)


@pytest.mark.parametrize("packed", [True, False])
def test_quant_nvfp4(packed):
    compile_sm90(kernels.quant_nvfp4_kernel,
                 {"x_ptr": "bf16", "out_ptr": "u8" if packed else "bf16", "bscale_ptr": "u8" if packed else "bf16"},
                 {"PACKED": packed, "BLOCKS": 64})


W8_CASES = {
    "fp8xfp8-prefill": ("fp8e4nv", "fp8e4nv", 0, launch.W8_PREFILL[0]),
    "int8xint8-prefill": ("i8", "i8", 0, launch.W8_PREFILL[1]),
    "int8xint8-decode-splitk": ("i8", "i8", 0, launch.W8_DECODE[2]),
    "bf16xfp8-block128": ("bf16", "fp8e4nv", 128, launch.W8_PREFILL[3]),
}


@pytest.mark.parametrize("case", list(W8_CASES))
def test_w8_gemm(case):
    a, b, block, cfg = W8_CASES[case]
    a_float = a == "bf16"
    out = "fp32" if cfg.SPLIT_K > 1 else "bf16"
    consts = dict(A_FLOAT=a_float, HAS_A_SCALE=not a_float, B_BLOCK=block, HAS_BIAS=True, ACC_INT=a == "i8",
                  DOT_PRECISION="tf32", **_gemm_consts(cfg))
    compiled = compile_sm90(kernels.w8_gemm_kernel, {"a_ptr": a, "b_ptr": b, "bias_ptr": "bf16", "out_ptr": out},
                            consts, cfg.num_warps, cfg.num_stages)
    _check(compiled, pipelined=cfg.num_stages > 1)


W4_CASES = {
    "int4-bf16-decode-splitk": ("bf16", False, False, True, launch.W4_DECODE[5]),
    "int4-asym-bf16-prefill": ("bf16", False, True, True, launch.W4_PREFILL[1]),
    "int4-dequant-first": ("fp16", False, True, False, launch.W4_PREFILL[2]),
    "int4-int8-activations": ("i8", False, False, True, launch.W4_PREFILL[0]),
    "int4-fp8-activations": ("fp8e4nv", False, False, True, launch.W4_PREFILL[0]),
    "nvfp4-bf16-decode": ("bf16", True, False, False, launch.W4_DECODE[0]),
    "nvfp4-bf16-prefill": ("bf16", True, False, False, launch.W4_PREFILL[4]),
}


@pytest.mark.parametrize("case", list(W4_CASES))
def test_w4_gemm(case):
    a, is_nvfp4, zp, after_dot, cfg = W4_CASES[case]
    a_kind = {"i8": 1, "fp8e4nv": 2}.get(a, 0)
    out = "fp32" if cfg.SPLIT_K > 1 else "bf16"
    consts = dict(IS_NVFP4=is_nvfp4, HAS_ZP=zp, GROUP=16 if is_nvfp4 else (128 if after_dot else 24),
                  SCALE_AFTER_DOT=after_dot, A_KIND=a_kind, HAS_A_SCALE=a_kind > 0, HAS_BIAS=True,
                  DOT_PRECISION="tf32", **_gemm_consts(cfg))
    pointers = {"a_ptr": a, "w_ptr": "u8", "s_ptr": "u8" if is_nvfp4 else "fp32", "zp_ptr": "u8", "bias_ptr": "bf16",
                "out_ptr": out}
    compiled = compile_sm90(kernels.w4_gemm_kernel, pointers, consts, cfg.num_warps, cfg.num_stages)
    _check(compiled, pipelined=True)


@pytest.mark.parametrize("weights", ["int4", "int4-asym", "nvfp4"])
def test_w4_gemv(weights):
    """Every GEMV configuration compiles, for one token and four rows of A, with 16-byte weight loads and no
    int-to-float conversion instructions (a quarter of the float rate; the nibbles are decoded by bit operations)."""
    is_nvfp4 = weights == "nvfp4"
    for m in (1, 4):
        for cfg in launch._gemv_configs(m, 128, is_nvfp4):
            pointers = {"a_ptr": "bf16", "w_ptr": "u8", "s_ptr": "u8" if is_nvfp4 else "fp32", "zp_ptr": "u8",
                        "bias_ptr": "bf16", "out_ptr": "fp32" if cfg.SPLIT_K > 1 else "bf16"}
            consts = dict(IS_NVFP4=is_nvfp4, HAS_ZP=weights == "int4-asym", GROUP=16 if is_nvfp4 else 128,
                          HAS_BIAS=True, BLOCK_M=m, BLOCK_N=cfg.BLOCK_N, BLOCK_KB=cfg.BLOCK_KB, SPLIT_K=cfg.SPLIT_K)
            ptx = compile_sm90(kernels.w4_gemv_kernel, pointers, consts, cfg.num_warps, cfg.num_stages).asm["ptx"]
            assert "ld.global.v4.b32" in ptx, (m, cfg)
            assert "cvt.rn.f32.s32" not in ptx and "cvt.rn.f32.u32" not in ptx, (m, cfg)
