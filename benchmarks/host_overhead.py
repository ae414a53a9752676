"""Host (Python) time per quantized-linear call on the CUDA path, measured on the CPU with the kernels stubbed.

    python benchmarks/host_overhead.py                  # table to stdout
    python benchmarks/host_overhead.py --json out/host_overhead.json --calls 3000
    python benchmarks/host_overhead.py --batched        # activations [1, 1, K], as a decoder's layers see them

A decode step at batch 1 launches each quantized linear's kernels faster than the GPU runs them only if the host
work per call stays small: this script measures that work without a GPU. It pretends the device path in its own
process:

- every `@triton.jit` kernel of the `qcompile.lowering.triton` modules is replaced by a stub whose
  `kernel[grid](...)` does nothing and returns a stand-in for Triton's `CompiledKernel` whose launcher (`run`)
  does nothing either: the steady path launches through that launcher directly (`launch._KernelCall`), as on a
  GPU, so each side is stubbed at the level it launches at. The tuner's timing (`launch.time_cuda`) returns a
  constant, so the first configuration wins (the GEMV at M = 1 for 4-bit weights);
- the activation counts as a CUDA tensor for the direct launch's guard, and the current device and stream are
  constants;
- `launch._device_ok` accepts CPU tensors and `launch.capability` answers sm_90, so the coverage checks pass as on
  an H100/H200 (the torch._scaled_mm path is not taken: it needs CUDA tensors);
- the CUDA implementation of each op (`qcompile.lowering.triton`) is registered as its CPU implementation, once
  through `torch.library.register_kernel` (how the ops were registered before launch plans: custom_op's Python
  wrapper per call) and once directly with the dispatcher (as `triton.register()` does now).

Rows, per op (the four presets' argument forms: int4_awq's INT4 g128, nvfp4_weight_only, fp8_dynamic, int8_dynamic):
- `before`: public op (autograd layer) -> register_kernel wrapper -> dispatch with the plan cache off;
- `public op`: public op (autograd layer, grad mode off) -> direct registration -> dispatch with launch plans;
- `twin`: the autograd-free `qcompile::cuda_*` op that inference graphs call -> dispatch with launch plans;
- `dispatch, no plan` / `dispatch, plan`: the dispatch function called directly.

Included: the dispatcher, the autograd layer, the coverage checks or the plan lookup, activation-buffer and output
allocation on the CPU (`torch.empty` of a few bytes; on CUDA the caching allocator costs about the same), the
launcher's Python up to the launch: the call of the compiled kernel's launcher in the steady state (the
launchers keep the kernel Triton returned at the first launch), `kernel[grid](...)` where that does not apply.
Not included: the launcher itself (a C function: argument extraction and the driver call), Triton's
`JITFunction.run` on the calls that still take it (argument binding, specialization, the cache lookup: Python,
skipped by the direct launch, so the steady path's saving on a GPU is larger than these numbers show), CUDA-side
allocation and any GPU work; benchmarks/gpu_check.sh measures the host time per quantized linear of the eager
decode step on a GPU. `dispatch, no plan` (QCOMPILE_PLAN_CACHE=0) runs the general launchers, which decide
everything on each call. Each number is the fastest of `--repeats` loops (other processes only ever add time):
compare rows of one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

OPS = ("int4_linear", "nvfp4_linear", "fp8_linear", "int8_linear")


def _stub_kernels() -> None:
    """Replace every Triton kernel with one whose launch does nothing, and make tuning deterministic."""
    from triton.runtime.jit import KernelInterface

    from qcompile.lowering.triton import launch

    class _Compiled:
        """What `kernel[grid](...)` returns on a GPU (a `CompiledKernel`): its launcher, stubbed."""

        function = packed_metadata = None

        @staticmethod
        def run(*args):
            return None

    compiled = _Compiled()

    class _Stub:
        def __init__(self, kernel):
            self.params = kernel.params  # read by the direct launch to order the bound arguments

        def __getitem__(self, grid):
            return _launch

    def _launch(*args, **kwargs):
        return compiled

    # every module of the lowering that holds kernels (kernels.py, and any the launchers import them from)
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("qcompile.lowering.triton"):
            continue
        for name in dir(module):
            if isinstance(getattr(module, name), KernelInterface):
                setattr(module, name, _Stub(getattr(module, name)))
    launch.time_cuda = lambda fn, iters=10: (fn(), 1.0)[1]
    launch._device_ok = lambda t: True
    launch.capability = lambda index=0: (9, 0)
    torch.cuda.is_current_stream_capturing = lambda: False
    # CUDA's side of the direct launch: the activation's specialization (as for a CUDA tensor), the current
    # device and stream (C calls on CUDA builds, about as cheap as these)
    launch._a_guard = lambda a: (a.data_ptr() & 15, a.stride(0))
    torch._C._cuda_getDevice = lambda: 0
    torch._C._cuda_getCurrentRawStream = lambda device: 0


def _arguments(n: int = 256, k: int = 512, m: int = 1, batched: bool = False) -> dict[str, tuple]:
    """Each op's arguments as the four presets store them (small shapes: host time does not depend on them).
    batched: x is [1, m, K], as a decoder's layers see it, instead of [m, K]."""
    from qcompile import numerics

    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    x = torch.randn(1, m, k, dtype=torch.bfloat16) if batched else torch.randn(m, k, dtype=torch.bfloat16)
    t4 = numerics.quantize_int4(w, 128)
    tn = numerics.quantize_nvfp4(w)
    f8 = numerics.quantize_fp8(w, "channel")
    i8 = numerics.quantize_int8(w, "channel")
    return {
        "int4_linear": (x, t4.packed, t4.scale, t4.zero_point, 128, 4, k, None, None, "none", "tensor"),
        "nvfp4_linear": (x, tn.packed, tn.block_scale, tn.global_scale, k, None, None, "none", "tensor"),
        "fp8_linear": (x, f8.q, f8.scale, 0, None, None, "fp8_e4m3", "token"),
        "int8_linear": (x, i8.q, i8.scale, None, None, "int8", "token"),
    }


def _time_us(fn, calls: int, repeats: int) -> float:
    for _ in range(min(200, calls)):
        fn()
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
    return min(per_call)  # the least disturbed loop: the machine may be shared


def measure(calls: int = 2000, repeats: int = 5, batched: bool = False) -> list[dict]:
    from qcompile.lowering import ensure_registered
    from qcompile.lowering import triton as triton_lowering
    from qcompile.lowering.triton import dispatch

    ensure_registered()
    _stub_kernels()
    args = _arguments(batched=batched)
    has_plans = hasattr(dispatch, "PLAN_CACHE")
    twins = triton_lowering.kernel_call_ops() if hasattr(triton_lowering, "kernel_call_ops") else {}
    rows = []

    def row(op, path, fn, plans):
        if has_plans:
            dispatch.PLAN_CACHE = plans
            dispatch.clear_plans()
        rows.append({"op": op, "path": path, "us_per_call": _time_us(fn, calls, repeats)})

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overriding the CPU kernels of the ops, in this process only
        for name in OPS:
            fn = getattr(dispatch, name)
            a = args[name]
            row(name, "dispatch, no plan", lambda: fn(*a), False)
            if has_plans:
                row(name, "dispatch, plan", lambda: fn(*a), True)
        public = {name: getattr(torch.ops.qcompile, name).default for name in OPS}
        for name in OPS:
            torch.library.register_kernel(f"qcompile::{name}", "cpu", triton_lowering._cuda_impl(name))
        for name in OPS:
            a = args[name]
            row(name, "before", lambda: public[name](*a), False)
        library = torch.library.Library("qcompile", "IMPL")  # direct registration, as triton.register() does
        for name in OPS:
            library.impl(name, triton_lowering._cuda_impl(name), "CPU")
        for name in OPS:
            a = args[name]
            row(name, "public op", lambda: public[name](*a), True)
        if twins:
            twin_library = torch.library.Library("qcompile", "IMPL")
            for name in OPS:
                twin_library.impl(f"cuda_{name}", triton_lowering._cuda_impl(name), "CPU")
            for name in OPS:
                a, twin = args[name], twins[public[name]]
                row(name, "twin", lambda: twin(*a), True)
    return rows


def format_table(rows: list[dict]) -> str:
    paths = list(dict.fromkeys(r["path"] for r in rows))
    by = {(r["op"], r["path"]): r["us_per_call"] for r in rows}
    head = f"{'op':<14}" + "".join(f"{p:>20}" for p in paths)
    lines = [head, "-" * len(head)]
    for op in dict.fromkeys(r["op"] for r in rows):
        lines.append(f"{op:<14}" + "".join(
            f"{by[(op, p)]:>17.1f} us" if (op, p) in by else f"{'-':>20}" for p in paths))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json", default=None)
    p.add_argument("--batched", action="store_true", help="activations [1, 1, K] (a decoder's) instead of [1, K]")
    args = p.parse_args(argv)
    rows = measure(args.calls, args.repeats, args.batched)
    print("host microseconds per call, kernels stubbed (CPU tensors standing in for CUDA ones), x "
          + ("[1, 1, K]" if args.batched else "[1, K]"))
    print(format_table(rows))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
