"""Weight conversions: a stored `qcompile` buffer becomes the ONNX-typed, `[K, N]`-laid-out initializer its
DequantizeLinear reads (INT8/UINT8, FLOAT8E4M3FN, and INT4/UINT4/FLOAT4E2M1 packed along the flattened tensor), so
no transpose is left in the graph."""

from __future__ import annotations

import torch


def _as_torch(tensor) -> torch.Tensor:
    import numpy as np

    raw = getattr(tensor, "raw", None)
    if isinstance(raw, torch.Tensor):
        return raw.detach().cpu()
    return torch.from_numpy(np.array(tensor.numpy()))


def _initializer_value(tensor, name: str):
    import onnx_ir as ir

    return ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)


def _int8_weight(w: torch.Tensor):
    import onnx_ir as ir

    return ir.tensor(w.t().contiguous().numpy())


def _uint8_weight(w: torch.Tensor):
    """INT8 codes as uint8 at zero point 128 (the same integers), `[K, N]`."""
    import onnx_ir as ir

    return ir.tensor((w.t().to(torch.int16) + 128).to(torch.uint8).contiguous().numpy())


def _uint8_zero_point(s: torch.Tensor):
    """128 in uint8, shaped like `_channel_scale(s)`."""
    import onnx_ir as ir

    shape = () if s.numel() == 1 else (s.numel(),)
    return ir.tensor(torch.full(shape, 128, dtype=torch.uint8).numpy())


def _int8_zero_point(s: torch.Tensor):
    """0 in int8, shaped like `_channel_scale(s)`."""
    import onnx_ir as ir

    shape = () if s.numel() == 1 else (s.numel(),)
    return ir.tensor(torch.zeros(shape, dtype=torch.int8).numpy())


def _channel_scale(s: torch.Tensor):
    """Per-tensor scales stay scalars; per-channel `[N, 1]` scales become `[N]` (axis 1 of the `[K, N]` weight)."""
    import onnx_ir as ir

    s = s.float()
    if s.numel() == 1:
        return ir.tensor(s.reshape(()).numpy())
    return ir.tensor(s.reshape(-1).contiguous().numpy())


def _fp8_weight(w: torch.Tensor, k: int | None = None):
    """FP8 codes `[K, N]`; with `k` past the stored K, zero codes pad the rows up to `k`."""
    import ml_dtypes
    import onnx_ir as ir

    codes = w.view(torch.uint8)
    if k is not None and k > codes.shape[1]:
        codes = torch.nn.functional.pad(codes, (0, k - codes.shape[1]))
    return ir.tensor(codes.t().contiguous().numpy().view(ml_dtypes.float8_e4m3fn))


def _fp8_block_scale(s: torch.Tensor, block: int, n: int):
    """`[ceil(N/b), ceil(K/b)]` tile scales as `[ceil(K/b), N]` block scales along K (each repeated over its rows)."""
    import onnx_ir as ir

    expanded = s.float().t().repeat_interleave(block, dim=1)[:, :n]
    return ir.tensor(expanded.contiguous().numpy())


def _pack_flat(codes: torch.Tensor):
    """4-bit codes of a tensor packed in ONNX order: flattened row-major, element 2i in the low nibble."""
    flat = codes.reshape(-1).to(torch.uint8) & 0xF
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).numpy()


def _codes_kn(packed: torch.Tensor, k: int) -> torch.Tensor:
    from qcompile.numerics import unpack_nibbles

    return unpack_nibbles(packed)[:, :k].t().contiguous()


def _int4_weight(packed: torch.Tensor, k: int, symmetric: bool):
    import onnx_ir as ir

    codes = _codes_kn(packed, k)
    dtype = ir.DataType.INT4 if symmetric else ir.DataType.UINT4
    return ir.PackedTensor(_pack_flat(codes), dtype, shape=ir.Shape(list(codes.shape)))


def _group_scale(s: torch.Tensor, k: int, group: int):
    import onnx_ir as ir

    return ir.tensor(s.float().t()[: -(-k // group)].contiguous().numpy())


def _int4_zero_point(z: torch.Tensor, k: int, group: int):
    import onnx_ir as ir

    z = z.t()[: -(-k // group)].contiguous()
    return ir.PackedTensor(_pack_flat(z), ir.DataType.UINT4, shape=ir.Shape(list(z.shape)))


def _fp8_group_scale(s: torch.Tensor, k: int, group: int):
    import ml_dtypes
    import onnx_ir as ir

    s = s.t()[: -(-k // group)].contiguous()
    return ir.tensor(s.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn))


def _fp4_weight_nk(packed: torch.Tensor, k: int):
    """FLOAT4E2M1 codes as stored, `[N, k]` (blocks of 16 along the last axis; `k` at most the padded K)."""
    import onnx_ir as ir

    from qcompile.numerics import unpack_nibbles

    codes = unpack_nibbles(packed)[:, :k].contiguous()
    return ir.PackedTensor(_pack_flat(codes), ir.DataType.FLOAT4E2M1, shape=ir.Shape(list(codes.shape)))


def _fp8_block_scale_nk(s: torch.Tensor, k: int, group: int):
    """FP8 block scales as stored, `[N, ceil(k/group)]`."""
    import ml_dtypes
    import onnx_ir as ir

    s = s[:, : -(-k // group)].contiguous()
    return ir.tensor(s.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn))


def _fp4_weight(packed: torch.Tensor, k: int):
    import onnx_ir as ir

    codes = _codes_kn(packed, k)  # E2M1 codes are the FLOAT4E2M1 bit patterns
    return ir.PackedTensor(_pack_flat(codes), ir.DataType.FLOAT4E2M1, shape=ir.Shape(list(codes.shape)))
