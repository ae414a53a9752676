"""The CPU's own C kernels, compiled on first use for the machine they run on.

- `lut4_linear.c`: PyTorch's CPU kernels for packed 4-bit weights (`_weight_int4pack_mm_for_cpu`) are fast only
  with bfloat16 activations and have no NVFP4 at all, so the weight-only formats get a small C kernel: a table
  lookup per code (one AVX-512 permute per 16 codes) and a fused multiply-add, reading the packed bytes once per
  output row.
- `int8_gemm.c`: INT8 × INT8 layers on x86 CPUs with AVX2 but no INT8 dot-product instruction, where oneDNN's
  integer kernels saturate and `torch._int_mm` crawls: byte multiply-adds, exact in int32, the few activation codes
  whose int16 sums could overflow multiplied apart (`Int8Weight`).

It is compiled with the system C compiler (`cc`, or `$CC`) with `-O3 -march=native -fopenmp` into
`$QCOMPILE_CACHE_DIR` (default `~/.cache/qcompile`), keyed by a hash of the source, the flags and the CPU, written
to a temporary file and renamed so that concurrent processes never load a half-written library. OpenMP comes
from the runtime torch already loaded (same soname), so the kernel shares torch's thread pool. When no compiler
works, `load()` returns None after one warning and the ops keep the plain-PyTorch reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCES = (Path(__file__).with_name("lut4_linear.c"), Path(__file__).with_name("int8_gemm.c"))
# no contraction of a*b+c into FMAs: the INT8 kernel scales its outputs in the reference's order, rounding twice
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=c99")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failed = False


def cache_dir() -> Path:
    return Path(os.environ.get("QCOMPILE_CACHE_DIR") or Path.home() / ".cache" / "qcompile")


def _cpu_fingerprint() -> str:
    # -march=native bakes in this CPU's instruction set: a library built elsewhere must not be reused here
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _build(compiler: str) -> Path:
    sources = [path.read_bytes() for path in SOURCES]
    key = hashlib.sha256(b"\0".join([*sources, " ".join(FLAGS).encode(), compiler.encode(),
                                     _cpu_fingerprint().encode()])).hexdigest()[:16]
    target = cache_dir() / f"qcompile_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.qc_lut4_linear.argtypes = [p, i64, i64, p, i64, i64, i64, p, p, p, p, p, p, c_int]
    library.qc_lut4_linear.restype = c_int
    library.qc_lut4_dequantize.argtypes = [p, i64, i64, i64, i64, p, p, p, p, p, c_int]
    library.qc_lut4_dequantize.restype = None
    library.qc_int8_available.argtypes = []
    library.qc_int8_available.restype = c_int
    library.qc_int8_packed_bytes.argtypes = [i64, i64]
    library.qc_int8_packed_bytes.restype = i64
    library.qc_int8_pack_weight.argtypes = [p, i64, i64, p, c_int]
    library.qc_int8_pack_weight.restype = None
    library.qc_int8_linear.argtypes = [p, i64, i64, p, p, i64, p, p, c_int, p, c_int]
    library.qc_int8_linear.restype = c_int
    library.qc_int8_linear_many.argtypes = [p, i64, i64, p, c_int, p, p, p, p, p, p, c_int]
    library.qc_int8_linear_many.restype = c_int
    library.has_int8_gemm = bool(library.qc_int8_available())
    return library


def load() -> ctypes.CDLL | None:
    """The compiled kernels, building them on the first call; None (after one warning) when that fails."""
    global _library, _failed
    if _library is not None or _failed:
        return _library
    with _lock:
        if _library is not None or _failed:
            return _library
        if os.environ.get("QCOMPILE_NATIVE", "1") == "0":
            _failed = True
            return None
        try:
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C compiler found (set $CC)")
            _library = _bind(ctypes.CDLL(str(_build(compiler))))
        except (OSError, RuntimeError) as error:
            _failed = True
            warnings.warn(f"qcompile: the CPU kernels are unavailable ({error}); INT4/NVFP4 weight-only layers, and "
                          "INT8 layers on CPUs without VNNI, fall back to the slower plain-PyTorch reference",
                          stacklevel=2)
    return _library


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class Lut4Weight:
    """A 4-bit weight as the kernel reads it: packed [N, KP/2] codes, a 16-entry value table, group scales
    (float32, or uint8 codes through a 256-entry table), optional uint8 zero points.

    It holds its value tables and any copy it had to make; of the stored codes, scales and zero points it keeps only
    the addresses, so a cached one never keeps a model's weights alive. The caller keeps those alive while the
    weight is in use (`qcompile.lowering.cpu.weight_cache` checks that they are the very tensors it was built from)."""

    def __init__(self, packed: Tensor, in_features: int, group: int, lut16: Tensor, scale: Tensor,
                 scale_lut: Tensor | None = None, zero: Tensor | None = None):
        made = []

        def keep(original: Tensor | None, converted: Tensor | None) -> int | None:
            if converted is not None and converted is not original:
                made.append(converted)
            return _ptr(converted)

        self.out_features, self.padded_in, self.in_features = packed.shape[0], 2 * packed.shape[1], in_features
        lut16_f = lut16.to(torch.float32).contiguous()
        scale_c = scale.contiguous()
        groups = self.padded_in // group
        if (group % 2 or self.padded_in % group or scale_c.numel() != self.out_features * groups
                or lut16_f.numel() != 16):
            raise ValueError("inconsistent 4-bit weight layout for the CPU kernel")
        scale_lut_f = None if scale_lut is None else scale_lut.to(torch.float32).contiguous()
        zero_c = None if zero is None else zero.contiguous()
        # the kernel's arguments after x and M, fixed for the life of the weight (a decode step calls it per layer)
        self.arguments = (in_features, keep(packed, packed.contiguous()), self.out_features, self.padded_in, group,
                          lut16_f.data_ptr(), keep(scale, scale_c), _ptr(scale_lut_f), keep(zero, zero_c))
        self._tables = (lut16_f, scale_lut_f, *made)  # the value tables are the weight's own: always kept


def linear(library: ctypes.CDLL, x2d: Tensor, weight: Lut4Weight, bias: Tensor | None) -> Tensor:
    """x2d [M, K] float32 contiguous -> [M, N] float32, straight from the packed codes."""
    m = x2d.shape[0]
    y = torch.empty((m, weight.out_features), dtype=torch.float32)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    status = library.qc_lut4_linear(
        x2d.data_ptr(), m, *weight.arguments, _ptr(bias), y.data_ptr(), torch.get_num_threads()
    )
    if status != 0:
        raise MemoryError("qc_lut4_linear could not allocate its activation buffers")
    return y


def dequantize(library: ctypes.CDLL, weight: Lut4Weight) -> Tensor:
    """The float32 [N, K] weight, exactly as qcompile.numerics dequantizes it."""
    w = torch.empty((weight.out_features, weight.in_features), dtype=torch.float32)
    k, packed, n, padded_in, group, lut16, scale, scale_lut, zero = weight.arguments
    library.qc_lut4_dequantize(packed, n, padded_in, k, group, lut16, scale, scale_lut, zero, w.data_ptr(),
                               torch.get_num_threads())
    return w


# The most input features the INT8 kernel takes: its int32 sums hold K products of up to 127 · 255 exactly.
INT8_KERNEL_MAX_K = 65536


class Int8Weight:
    """An [N, K] INT8 weight as `int8_gemm.c` reads it: panels of 16 output columns by four k, each code stored as
    the unsigned byte code + 128 (its own 64-byte aligned copy, the INT8 bytes padded to whole panels), and float32
    scales per output column. It keeps nothing of the tensors it was built from."""

    def __init__(self, library: ctypes.CDLL, weight: Tensor, weight_scale: Tensor):
        n, k = weight.shape
        scale = weight_scale.detach().to(torch.float32).reshape(-1)
        if weight.dtype != torch.int8 or scale.numel() not in (1, n):
            raise ValueError("the INT8 CPU kernel takes an int8 [N, K] weight with one scale per tensor or row")
        if k > INT8_KERNEL_MAX_K:
            raise ValueError(f"the INT8 CPU kernel takes at most {INT8_KERNEL_MAX_K} input features, not {k}")
        self.out_features, self.in_features = n, k
        self.scale = scale.expand(n).clone()
        codes = weight.detach().contiguous()
        self._buffer = torch.empty(library.qc_int8_packed_bytes(n, k) + 64, dtype=torch.uint8)
        self.packed = self._buffer.data_ptr() + (-self._buffer.data_ptr()) % 64
        library.qc_int8_pack_weight(codes.data_ptr(), n, k, self.packed, torch.get_num_threads())


# The activations the INT8 kernel applies to its outputs before storing them (its `activation` codes).
INT8_ACTIVATIONS = {"none": 0, "gelu": 1, "silu": 2}


def _float32_bias(bias: Tensor | None) -> Tensor | None:
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    return bias


def _raise_for(status: int, function: str) -> None:
    if status == 2:
        raise ValueError("input to a quantized linear layer contains NaN or inf")
    if status == 4:
        raise ValueError("static int8 input scale must be finite and non-negative")
    if status == 6:
        raise ValueError(f"the INT8 CPU kernel takes at most {INT8_KERNEL_MAX_K} input features")
    if status == 1:
        raise MemoryError(f"{function} could not allocate its buffers")
    if status != 0:
        raise RuntimeError("the INT8 CPU kernel was built without AVX2")


def _activation_code(activation: str) -> int:
    if activation not in INT8_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; the INT8 kernel applies {sorted(INT8_ACTIVATIONS)}")
    return INT8_ACTIVATIONS[activation]


def int8_linear(library: ctypes.CDLL, x2d: Tensor, weight: Int8Weight, bias: Tensor | None,
                static_scale: Tensor | None, activation: str = "none") -> Tensor:
    """x2d [M, K] float32 contiguous -> [M, N] float32: quantized per row (amax / 127), or with `static_scale` (a
    float32 scalar; finite and non-negative, else ValueError; 0 means 1), multiplied exactly in integers, scaled as
    `acc · s_w · s_x + bias`, then `activation` (a key of INT8_ACTIVATIONS: GELU is the erf form)."""
    code = _activation_code(activation)
    m = x2d.shape[0]
    y = torch.empty((m, weight.out_features), dtype=torch.float32)
    bias = _float32_bias(bias)
    status = library.qc_int8_linear(
        x2d.data_ptr(), m, weight.in_features, _ptr(static_scale), weight.packed, weight.out_features,
        weight.scale.data_ptr(), _ptr(bias), code, y.data_ptr(), torch.get_num_threads(),
    )
    _raise_for(status, "qc_int8_linear")
    return y


def int8_linear_many(library: ctypes.CDLL, x2d: Tensor, weights: list[Int8Weight], biases: list[Tensor | None],
                     static_scale: Tensor | None, activations: list[str] | None = None) -> list[Tensor]:
    """`int8_linear` of one input against several weights (the layers that read one tensor: q/k/v, gate/up), each
    with its own activation ("none" by default), the input quantized once for all of them; the same outputs as
    separate calls, bit for bit."""
    count, m = len(weights), x2d.shape[0]
    activations = ["none"] * count if activations is None else list(activations)
    if count != len(biases) or count != len(activations) or any(w.in_features != x2d.shape[1] for w in weights):
        raise ValueError("int8_linear_many takes one bias (or None) and one activation per weight, every weight over "
                         "x's features")
    codes = [_activation_code(a) for a in activations]
    outputs = [torch.empty((m, w.out_features), dtype=torch.float32) for w in weights]
    biases = [_float32_bias(b) for b in biases]

    def array(kind, values):
        return (kind * count)(*values)

    status = library.qc_int8_linear_many(
        x2d.data_ptr(), m, x2d.shape[1], _ptr(static_scale), count,
        array(ctypes.c_void_p, [w.packed for w in weights]),
        array(ctypes.c_int64, [w.out_features for w in weights]),
        array(ctypes.c_void_p, [w.scale.data_ptr() for w in weights]),
        array(ctypes.c_void_p, [_ptr(b) for b in biases]),
        array(ctypes.c_int, codes),
        array(ctypes.c_void_p, [y.data_ptr() for y in outputs]),
        torch.get_num_threads(),
    )
    _raise_for(status, "qc_int8_linear_many")
    return outputs


def has_int8_gemm() -> bool:
    """Whether the INT8 kernel of `int8_gemm.c` is built and usable on this CPU (x86 with AVX2)."""
    library = load()
    return library is not None and library.has_int8_gemm


__all__ = ["INT8_ACTIVATIONS", "INT8_KERNEL_MAX_K", "Int8Weight", "Lut4Weight", "cache_dir", "dequantize",
           "has_int8_gemm", "int8_linear", "int8_linear_many", "linear", "load"]
