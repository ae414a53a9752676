"""The CPU's weight-only kernels (`lut4_linear.c`), compiled on first use for the machine they run on.

PyTorch's CPU kernels for packed 4-bit weights (`_weight_int4pack_mm_for_cpu`) are fast only with bfloat16
activations and have no NVFP4 at all, so the weight-only formats get a small C kernel: a table lookup per code
(one AVX-512 permute per 16 codes) and a fused multiply-add, reading the packed bytes once per output row.

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

SOURCE = Path(__file__).with_name("lut4_linear.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99")

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
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(),
                                     _cpu_fingerprint().encode()])).hexdigest()[:16]
    target = cache_dir() / f"lut4_linear-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
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
            warnings.warn(f"qcompile: the CPU weight-only kernel is unavailable ({error}); INT4/NVFP4 weight-only "
                          "layers fall back to the slower plain-PyTorch reference", stacklevel=2)
    return _library


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class Lut4Weight:
    """A 4-bit weight as the kernel reads it: packed [N, KP/2] codes, a 16-entry value table, group scales
    (float32, or uint8 codes through a 256-entry table), optional uint8 zero points.

    It holds its value tables and any copy it had to make; of the stored codes, scales and zero points it keeps only
    the addresses, so a cached one never keeps a model's weights alive. The caller keeps those alive while the
    weight is in use (`qcompile.lowering.cpu` checks that they are the very tensors it was built from)."""

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


__all__ = ["Lut4Weight", "cache_dir", "dequantize", "linear", "load"]
