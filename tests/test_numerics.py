"""Tests for qcompile.numerics against independent references.

Expected values come from hand-written tables or from float64/numpy re-derivations of docs/formats.md written
here, never from the code under test. Where a format computes in float32, the numpy references round the
float64 result of that one operation to float32 (`_f32`), which is exactly what an IEEE float32 operation does.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcompile.numerics import (
    FP8Tensor,
    Int4Tensor,
    Int8Tensor,
    NVFP4Tensor,
    check_finite,
    dequantize_fp8,
    dequantize_int4,
    dequantize_int8,
    dequantize_nvfp4,
    e2m1_decode,
    e2m1_encode,
    fake_quantize,
    pack_nibbles,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    quantize_nvfp4,
    unpack_nibbles,
)

SETTINGS = settings(max_examples=50, deadline=None)

# ------------------------------------------------------------------------------ independent references

E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _f32(a):
    """Round float64 values to the nearest float32 (what one float32 IEEE operation does)."""
    return np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float64)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).numpy()


def e4m3_ref(v):
    """float8_e4m3fn rounding in float64: 3 mantissa bits, min normal 2^-6, RNE, saturated at 448."""
    v = np.clip(np.asarray(v, dtype=np.float64), -448.0, 448.0)
    a = np.abs(v)
    _, e = np.frexp(a)  # a = m * 2**e with m in [0.5, 1)
    exp = np.maximum(e - 1, -6)  # below 2^-6 the spacing stays that of the subnormals
    step = np.ldexp(1.0, exp - 3)
    r = np.round(a / step) * step  # np.round is half-to-even
    return np.copysign(r, v)


def e2m1_ref(v):
    """E2M1 code by brute-force nearest-grid search; ties go to the even grid index; saturate at 6."""
    v = np.asarray(v, dtype=np.float64)
    a = np.minimum(np.abs(v), 6.0)
    d = np.abs(a[..., None] - E2M1_GRID)
    cand = d == d.min(axis=-1, keepdims=True)
    even = cand & (np.arange(8) % 2 == 0)
    idx = np.where(even.any(axis=-1), even.argmax(axis=-1), cand.argmax(axis=-1))
    return idx + 8 * np.signbit(v).astype(np.int64)


def e2m1_value_ref(codes):
    codes = np.asarray(codes, dtype=np.int64)
    mag = E2M1_GRID[codes & 7]
    return np.where(codes & 8, -mag, mag)


def pack_ref(codes):
    codes = np.asarray(codes, dtype=np.int64)
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def padded_len(k, g):
    kp = -(-k // g) * g
    return kp + g if kp % 2 else kp


def amax_ref(x, granularity):
    a = np.abs(x)
    if granularity == "tensor":
        return np.array(a.max() if a.size else 0.0)
    if granularity == "channel":
        return a.max(axis=tuple(range(1, x.ndim)), keepdims=True)
    return a.max(axis=-1, keepdims=True)


def int8_ref(x, granularity):
    scale = _f32(amax_ref(x, granularity) / 127.0)
    scale = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.round(_f32(x / scale)), -127, 127)
    return q, scale, _f32(q * scale)


def fp8_ref(x, granularity):
    scale = _f32(amax_ref(x, granularity) / 448.0)
    scale = np.where(scale == 0, 1.0, scale)
    q = e4m3_ref(_f32(x / scale))
    return q, scale, _f32(q * scale)


def fp8_block_ref(x, bs):
    n, k = x.shape
    nb, kb = math.ceil(n / bs), math.ceil(k / bs)
    scale = np.ones((nb, kb))
    full = np.empty_like(x)
    for i in range(nb):
        for j in range(kb):
            blk = x[i * bs : (i + 1) * bs, j * bs : (j + 1) * bs]
            s = _f32(np.abs(blk).max() / 448.0)
            scale[i, j] = 1.0 if s == 0 else s
            full[i * bs : (i + 1) * bs, j * bs : (j + 1) * bs] = scale[i, j]
    q = e4m3_ref(_f32(x / full))
    return q, scale, _f32(q * full)


def int4_ref(w, g, symmetric, bits):
    k = w.shape[-1]
    kp = padded_len(k, g)
    wp = np.concatenate([w, np.zeros(w.shape[:-1] + (kp - k,))], axis=-1)
    grp = wp.reshape(w.shape[:-1] + (kp // g, g))
    if symmetric:
        qmax = 7 if bits == 4 else 3
        scale = _f32(np.abs(grp).max(axis=-1) / qmax)
        scale = np.where(scale == 0, 1.0, scale)
        q = np.clip(np.round(_f32(grp / scale[..., None])), -qmax - 1, qmax)
        codes = q.astype(np.int64) & 0xF
        deq = _f32(q * scale[..., None])
        zp = None
    else:
        levels = 15 if bits == 4 else 7
        lo = np.minimum(grp.min(axis=-1), 0.0)
        hi = np.maximum(grp.max(axis=-1), 0.0)
        scale = _f32(_f32(hi - lo) / levels)
        scale = np.where(scale == 0, 1.0, scale)
        zp = np.clip(np.round(_f32(-lo / scale)), 0, levels)
        q = np.clip(np.round(_f32(grp / scale[..., None])) + zp[..., None], 0, levels)
        codes = q.astype(np.int64)
        deq = _f32((q - zp[..., None]) * scale[..., None])
    packed = pack_ref(codes.reshape(wp.shape))
    return packed, scale, zp, deq.reshape(wp.shape)[..., :k]


def nvfp4_ref(w, bs=16, global_scale=None):
    k = w.shape[-1]
    kp = padded_len(k, bs)
    if global_scale is None:
        amax = np.abs(w).max() if w.size else 0.0
        gs = _f32(amax / (6 * 448))
        gs = 1.0 if gs == 0 else float(gs)
    else:
        gs = float(global_scale)
    wp = np.concatenate([w, np.zeros(w.shape[:-1] + (kp - k,))], axis=-1)
    blk = wp.reshape(w.shape[:-1] + (kp // bs, bs))
    s = _f32(np.abs(blk).max(axis=-1) / _f32(6.0 * gs))
    s = np.where(s == 0, 1.0, s)
    bscale = e4m3_ref(np.minimum(s, 448.0))
    denom = _f32(bscale * gs)[..., None]
    under = np.broadcast_to(denom == 0, blk.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = _f32(blk / denom)
    codes = np.where(under, 0, e2m1_ref(np.where(under, 0.0, scaled)))
    deq = _f32(e2m1_value_ref(codes) * denom)
    return {
        "gs": gs,
        "block_scale": bscale,
        "denom": denom,
        "scaled": scaled,
        "codes": codes.reshape(wp.shape),
        "packed": pack_ref(codes.reshape(wp.shape)),
        "deq": deq.reshape(wp.shape)[..., :k],
    }


def f32_arrays(shape, lim=1e4):
    return hnp.arrays(
        np.float32,
        shape,
        elements=st.floats(-lim, lim, width=32, allow_nan=False, allow_infinity=False),
    )


@st.composite
def arrays_2d(draw, k_choices=(1, 5, 16, 37, 130), lim=1e4):
    rows = draw(st.integers(1, 3))
    k = draw(st.sampled_from(k_choices))
    return draw(f32_arrays((rows, k), lim))


def assert_same(actual: torch.Tensor, expected) -> None:
    np.testing.assert_array_equal(_np(actual), np.asarray(expected, dtype=np.float64))


# --------------------------------------------------------------------------------------------------- E2M1

# Every midpoint between neighbouring E2M1 magnitudes, and where round-half-to-even sends it.
E2M1_TIES = [
    (0.25, 0.0, 0),
    (0.75, 1.0, 2),
    (1.25, 1.0, 2),
    (1.75, 2.0, 4),
    (2.5, 2.0, 4),
    (3.5, 4.0, 6),
    (5.0, 4.0, 6),
]


@pytest.mark.parametrize("value,decoded,code", E2M1_TIES)
def test_e2m1_ties_to_even(value, decoded, code):
    codes = e2m1_encode(torch.tensor([value, -value]))
    assert codes.tolist() == [code, code + 8]
    assert e2m1_decode(codes).tolist() == [decoded, -decoded]


@pytest.mark.parametrize(
    "value,code",
    [
        (0.0, 0),
        (-0.0, 8),
        (0.3, 1),
        (-0.1, 8),
        (0.5, 1),
        (1.0, 2),
        (1.5, 3),
        (2.0, 4),
        (3.0, 5),
        (4.0, 6),
        (6.0, 7),
        (7.0, 7),
        (1e30, 7),
        (-6.0, 15),
        (-2.9, 13),
        (0.2500001, 1),
        (0.7499999, 1),
        (5.0000005, 7),
        (4.9999995, 6),
        (-1e30, 15),
    ],
)
def test_e2m1_hand_checked(value, code):
    assert e2m1_encode(torch.tensor([value], dtype=torch.float32)).item() == code


def test_e2m1_decode_table():
    expected = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    out = e2m1_decode(torch.arange(16, dtype=torch.uint8))
    assert out.dtype == torch.float32
    assert out.tolist() == expected
    assert torch.signbit(out[8])  # code 8 is -0


@SETTINGS
@given(f32_arrays(st.integers(1, 64), lim=10.0))
def test_e2m1_encode_matches_bruteforce(v):
    assert_same(e2m1_encode(torch.from_numpy(v)), e2m1_ref(v.astype(np.float64)))


# ------------------------------------------------------------------------------------------------ packing


def test_pack_nibbles_hand_bytes():
    assert pack_nibbles(torch.tensor([1, 2], dtype=torch.uint8)).tolist() == [0x21]
    codes = torch.tensor([[0xF, 0x0, 0x3, 0xA], [0x8, 0x7, 0x0, 0x1]], dtype=torch.uint8)
    assert pack_nibbles(codes).tolist() == [[0x0F, 0xA3], [0x78, 0x10]]
    assert unpack_nibbles(torch.tensor([0x21, 0xA3], dtype=torch.uint8)).tolist() == [1, 2, 3, 0xA]


def test_unpack_pack_all_bytes():
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(4, 64)
    u = unpack_nibbles(b)
    assert u.shape == (4, 128) and u.dtype == torch.uint8
    assert torch.equal(pack_nibbles(u), b)


def test_pack_rejects_odd_length():
    with pytest.raises(ValueError):
        pack_nibbles(torch.zeros(3, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------------- INT8


def test_int8_round_half_to_even():
    # amax 127 gives a scale of exactly 1, so x/scale hits the .5 ties exactly.
    x = torch.tensor([127.0, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -127.0])
    t = quantize_int8(x)
    assert t.scale.item() == 1.0
    assert t.q.tolist() == [127, 2, 4, -2, -4, 0, 0, 2, 126, -127]
    assert t.q.dtype == torch.int8


@pytest.mark.parametrize(
    "granularity,shape,scale_shape",
    [("tensor", (4, 6), ()), ("channel", (4, 6), (4, 1)), ("channel", (4, 3, 2), (4, 1, 1)),
     ("token", (2, 3, 6), (2, 3, 1)), ("token", (5,), (1,))],
)
def test_int8_scale_shapes(granularity, shape, scale_shape):
    t = quantize_int8(torch.randn(shape), granularity)
    assert isinstance(t, Int8Tensor)
    assert tuple(t.scale.shape) == scale_shape and t.scale.dtype == torch.float32
    assert t.q.shape == shape


@SETTINGS
@given(arrays_2d(), st.sampled_from(["tensor", "channel", "token"]))
def test_int8_matches_float64_reference(x, granularity):
    t = quantize_int8(torch.from_numpy(x), granularity)
    q, scale, deq = int8_ref(x.astype(np.float64), granularity)
    assert_same(t.q, q)
    assert_same(t.scale, scale)
    assert_same(dequantize_int8(t), deq)


@SETTINGS
@given(arrays_2d(), st.sampled_from(["tensor", "channel", "token"]))
def test_int8_error_bound(x, granularity):
    t = quantize_int8(torch.from_numpy(x), granularity)
    err = np.abs(_np(dequantize_int8(t)) - x)
    scale = np.broadcast_to(_np(t.scale), x.shape)
    # amax/127 of a subnormal amax is itself rounded to a multiple of 2^-149: up to 127 codes times that rounding
    subnormal_scale = 127 * 2.0**-150
    assert np.all(err <= scale * (0.5 + 1e-5) + np.abs(x) * 2.0**-22 + subnormal_scale)
    assert _np(t.q).min() >= -127


@SETTINGS
@given(arrays_2d(lim=1e6), st.floats(1e-6, 10.0))
def test_int8_static_scale_saturates_and_never_uses_minus_128(x, s):
    t = quantize_int8(torch.from_numpy(x), scale=torch.tensor(s))
    expected = np.clip(np.round(_f32(x.astype(np.float64) / _f32(s))), -127, 127)
    assert_same(t.q, expected)
    assert int(t.q.min()) >= -127


def test_int8_static_scale_far_below_range():
    t = quantize_int8(torch.tensor([-1000.0, -127.6, 1000.0]), scale=1.0)
    assert t.q.tolist() == [-127, -127, 127]


# ---------------------------------------------------------------------------------------------------- FP8


@SETTINGS
@given(arrays_2d(), st.sampled_from(["tensor", "channel", "token"]))
def test_fp8_matches_float64_reference(x, granularity):
    t = quantize_fp8(torch.from_numpy(x), granularity)
    assert isinstance(t, FP8Tensor) and t.q.dtype == torch.float8_e4m3fn and t.block_size is None
    q, scale, deq = fp8_ref(x.astype(np.float64), granularity)
    assert_same(t.q.float(), q)
    assert_same(t.scale, scale)
    assert_same(dequantize_fp8(t), deq)


@SETTINGS
@given(arrays_2d(), st.sampled_from(["tensor", "channel", "token"]))
def test_fp8_relative_error_for_normal_values(x, granularity):
    t = quantize_fp8(torch.from_numpy(x), granularity)
    x64 = x.astype(np.float64)
    scale = np.broadcast_to(_np(t.scale), x.shape)
    normal = np.abs(x64 / scale) >= 2.0**-6
    err = np.abs(_np(dequantize_fp8(t)) - x64)
    assert np.all(err[normal] <= 2.0**-4 * np.abs(x64[normal]) * (1 + 1e-5))
    # Subnormal range: absolute error at most half the subnormal spacing 2^-9, in units of scale.
    assert np.all(err[~normal] <= 2.0**-10 * scale[~normal] * (1 + 1e-5))


@pytest.mark.parametrize("shape,bs,scale_shape", [((130, 37), 128, (2, 1)), ((37, 50), 16, (3, 4)),
                                                  ((1, 1), 128, (1, 1)), ((256, 128), 128, (2, 1))])
def test_fp8_block_matches_reference(shape, bs, scale_shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[1])
    t = quantize_fp8(x, "block", block_size=bs)
    assert t.block_size == bs and tuple(t.scale.shape) == scale_shape and t.q.shape == shape
    q, scale, deq = fp8_block_ref(x.double().numpy(), bs)
    assert_same(t.q.float(), q)
    assert_same(t.scale, scale)
    assert_same(dequantize_fp8(t), deq)


def test_fp8_block_zero_block_and_2d_only():
    x = torch.zeros(20, 20)
    x[:10, :10] = 3.0
    t = quantize_fp8(x, "block", block_size=10)
    assert t.scale[0, 0].item() == np.float32(np.float32(3.0) / np.float32(448.0))
    assert t.scale.flatten()[1:].tolist() == [1.0, 1.0, 1.0]
    assert not torch.isnan(dequantize_fp8(t)).any()
    with pytest.raises(ValueError):
        quantize_fp8(torch.ones(2, 3, 4), "block")


def test_fp8_static_scale_saturates():
    t = quantize_fp8(torch.tensor([1e6, -1e6, 448.0, 500.0, 1.0]), scale=1.0)
    assert t.q.float().tolist() == [448.0, -448.0, 448.0, 448.0, 1.0]
    assert not torch.isnan(t.q.float()).any()


# ----------------------------------------------------------------------------------------------- INT4/3


def test_int4_hand_packed_signed():
    # Group amax 7 -> scale exactly 1; -1 is stored as 0xF (two's complement nibble).
    t = quantize_int4(torch.tensor([[-1.0, 7.0, 2.5, -7.0]]), group_size=4)
    assert t.scale.tolist() == [[1.0]]
    assert t.packed.tolist() == [[0x7F, 0x92]]  # codes [0xF, 7, 2, 0x9]
    assert t.zero_point is None and t.bits == 4 and t.in_features == 4 and t.group_size == 4
    assert dequantize_int4(t).tolist() == [[-1.0, 7.0, 2.0, -7.0]]


def test_int3_hand_checked():
    # amax 3 -> scale 1, range [-4, 3]
    t = quantize_int4(torch.tensor([[3.0, -3.0, 0.5, 1.5]]), group_size=4, bits=3)
    assert t.scale.tolist() == [[1.0]]
    assert unpack_nibbles(t.packed).tolist() == [[3, 0xD, 0, 2]]
    assert dequantize_int4(t).tolist() == [[3.0, -3.0, 0.0, 2.0]]


def test_w4a8_weight_rounds_through_fp8_hand_checked():
    """W4A8 (docs/formats.md#w4a8): group A's max 7 sets the FP8 scale 7/448 = 1/64; in group B (scale 0.1) the
    codes 7, 3, 1 give 0.7, 0.3, 0.1, i.e. 44.8, 19.2, 6.4 in FP8 units, which round to the E4M3 values 44 (step 4
    in [32, 64)), 20 (step 2 in [16, 32)) and 6.5 (step 0.5 in [4, 8))."""
    w = torch.zeros(1, 256)
    w[0, 0] = 7.0
    w[0, 128], w[0, 129], w[0, 130] = 0.7, 0.3, 0.1
    t = quantize_int4(w, 128, fp8_scale=True)
    assert t.fp8_scale.item() == 1 / 64
    d = dequantize_int4(t)
    assert d[0, 0].item() == 7.0
    assert d[0, 128:131].tolist() == [44 / 64, 20 / 64, 6.5 / 64]
    plain = dequantize_int4(quantize_int4(w, 128))  # without the FP8 stage: code x scale
    assert torch.allclose(plain[0, 128:131], torch.tensor([0.7, 0.3, 0.1]))
    # a static scale too small saturates at +-448 FP8 units instead of overflowing
    small = dequantize_int4(quantize_int4(w, 128, fp8_scale=1 / 128))
    assert small[0, 0].item() == 448 / 128


def test_int4_asymmetric_hand_checked():
    # lo=-5, hi=10 -> scale 1, zero point 5; q = round(w) + 5
    t = quantize_int4(torch.tensor([[-5.0, 10.0, 0.0, 2.5]]), group_size=4, symmetric=False)
    assert t.scale.tolist() == [[1.0]]
    assert t.zero_point.tolist() == [[5]] and t.zero_point.dtype == torch.uint8
    assert unpack_nibbles(t.packed).tolist() == [[0, 15, 5, 7]]
    assert dequantize_int4(t).tolist() == [[-5.0, 10.0, 0.0, 2.0]]


@pytest.mark.parametrize(
    "k,g,kp", [(37, 16, 48), (130, 128, 256), (1, 128, 128), (128, 128, 128), (37, 5, 40), (3, 3, 6)]
)
def test_int4_padding_shapes(k, g, kp):
    w = torch.randn(3, k)
    t = quantize_int4(w, group_size=g)
    assert isinstance(t, Int4Tensor)
    assert t.packed.shape == (3, kp // 2) and t.packed.dtype == torch.uint8
    assert t.scale.shape == (3, kp // g) and t.scale.dtype == torch.float32
    assert t.in_features == k
    assert dequantize_int4(t).shape == (3, k)


@SETTINGS
@given(
    arrays_2d(),
    st.sampled_from([16, 32, 128]),
    st.booleans(),
    st.sampled_from([3, 4]),
)
def test_int4_matches_float64_reference(w, g, symmetric, bits):
    t = quantize_int4(torch.from_numpy(w), group_size=g, symmetric=symmetric, bits=bits)
    packed, scale, zp, deq = int4_ref(w.astype(np.float64), g, symmetric, bits)
    assert_same(t.packed, packed)
    assert_same(t.scale, scale)
    if symmetric:
        assert t.zero_point is None
    else:
        assert_same(t.zero_point, zp)
    assert_same(dequantize_int4(t), deq)


@SETTINGS
@given(arrays_2d(), st.sampled_from([16, 32, 128]), st.booleans(), st.sampled_from([3, 4]))
def test_int4_error_bound(w, g, symmetric, bits):
    t = quantize_int4(torch.from_numpy(w), group_size=g, symmetric=symmetric, bits=bits)
    k = w.shape[1]
    scale = np.repeat(_np(t.scale), g, axis=-1)[:, :k]
    err = np.abs(_np(dequantize_int4(t)) - w)
    assert np.all(err <= scale * (0.5 + 1e-5) + np.abs(w) * 2.0**-22)


def test_int4_3d_weight():
    w = torch.randn(2, 3, 37)
    t = quantize_int4(w, group_size=16)
    assert t.packed.shape == (2, 3, 24) and t.scale.shape == (2, 3, 3)
    packed, scale, _, deq = int4_ref(w.double().numpy(), 16, True, 4)
    assert_same(t.packed, packed)
    assert_same(dequantize_int4(t), deq)


# -------------------------------------------------------------------------------------------------- NVFP4


def test_nvfp4_hand_worked_row():
    # amax 2688 = 6*448 -> global scale exactly 1; block 0 amax 2688 -> block scale 448,
    # block 1 amax 1344 -> block scale 224 (both exact in E4M3).
    row = [2688.0, 112.0, 336.0, -560.0, 2240.0, -44.8, 1120.0, 1568.0] + [0.0] * 8
    row += [1344.0, -112.0, 336.0] + [0.0] * 13
    t = quantize_nvfp4(torch.tensor([row]))
    assert isinstance(t, NVFP4Tensor)
    assert t.global_scale.shape == () and t.global_scale.item() == 1.0
    assert t.block_scale.dtype == torch.float8_e4m3fn
    assert t.block_scale.float().tolist() == [[448.0, 224.0]]
    # block 0 scaled: 6, 0.25, 0.75, -1.25, 5, -0.1, 2.5, 3.5 -> codes 7, 0, 2, 10, 6, 8, 4, 6
    # block 1 scaled: 6, -0.5, 1.5 -> codes 7, 9, 3
    assert t.packed.tolist() == [[0x07, 0xA2, 0x86, 0x64, 0, 0, 0, 0, 0x97, 0x03, 0, 0, 0, 0, 0, 0]]
    deq = dequantize_nvfp4(t)
    assert deq[0, :8].tolist() == [2688.0, 0.0, 448.0, -448.0, 1792.0, -0.0, 896.0, 1792.0]
    assert deq[0, 16:19].tolist() == [1344.0, -112.0, 336.0]


@SETTINGS
@given(arrays_2d())
def test_nvfp4_matches_float64_reference(w):
    t = quantize_nvfp4(torch.from_numpy(w))
    ref = nvfp4_ref(w.astype(np.float64))
    assert t.global_scale.item() == ref["gs"]
    assert_same(t.block_scale.float(), ref["block_scale"])
    assert_same(t.packed, ref["packed"])
    assert_same(dequantize_nvfp4(t), ref["deq"])


@SETTINGS
@given(arrays_2d())
def test_nvfp4_error_bound_per_block(w):
    t = quantize_nvfp4(torch.from_numpy(w))
    k = w.shape[1]
    gs = t.global_scale.item()
    denom = _f32(_np(t.block_scale) * gs)  # [rows, nblocks]
    d = np.repeat(denom, 16, axis=-1)[:, :k]
    w64 = w.astype(np.float64)
    err = np.abs(_np(dequantize_nvfp4(t)) - w64)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(d > 0, np.abs(w64) / d, 0.0)
    # Half the spacing of the E2M1 grid around |v|; past 6 the value saturates.
    half_gap = np.where(v <= 2, 0.25, np.where(v <= 4, 0.5, 1.0))
    bound = np.where(v <= 6, half_gap * d, (v - 6) * d)
    bound = np.where(d > 0, bound, np.abs(w64))  # underflowed block: everything becomes 0
    assert np.all(err <= bound * (1 + 1e-5) + np.abs(w64) * 2.0**-22)
    # With a normal block scale, FP8 rounding of the scale can overshoot 6 by at most 2^-4 relative.
    blocks_amax = np.abs(np.concatenate([w64, np.zeros((w.shape[0], padded_len(k, 16) - k))], 1))
    blocks_amax = blocks_amax.reshape(w.shape[0], -1, 16).max(-1)
    # (only where the divisor is a normal float32: a subnormal global scale has too few bits for this bound)
    normal = (_np(t.block_scale) >= 2.0**-6) & (denom >= np.finfo(np.float32).tiny)
    assert np.all(blocks_amax[normal] / denom[normal] <= 6 / (1 - 2.0**-4) * (1 + 1e-5))


@pytest.mark.parametrize("k,kp", [(37, 48), (130, 144), (1, 16), (16, 16)])
def test_nvfp4_padding_shapes(k, kp):
    w = torch.randn(3, k)
    t = quantize_nvfp4(w)
    assert t.packed.shape == (3, kp // 2) and t.block_scale.shape == (3, kp // 16)
    assert t.in_features == k and t.block_size == 16
    assert dequantize_nvfp4(t).shape == (3, k)
    ref = nvfp4_ref(w.double().numpy())
    assert_same(t.packed, ref["packed"])
    assert_same(dequantize_nvfp4(t), ref["deq"])


def test_nvfp4_all_zero_tensor():
    t = quantize_nvfp4(torch.zeros(2, 37))
    assert t.global_scale.item() == 1.0 and t.global_scale.dtype == torch.float32
    assert torch.all(t.block_scale.float() == 1.0)
    assert torch.all(t.packed == 0)
    out = dequantize_nvfp4(t)
    assert torch.all(out == 0) and not torch.isnan(out).any()


def test_nvfp4_all_zero_block():
    w = torch.zeros(1, 32)
    w[0, :16] = torch.linspace(-3, 5, 16)
    t = quantize_nvfp4(w)
    assert t.block_scale.float()[0, 1].item() == 1.0
    assert torch.all(t.packed[0, 8:] == 0)
    assert torch.all(dequantize_nvfp4(t)[0, 16:] == 0)


def test_nvfp4_block_scale_underflow_gives_zeros():
    w = torch.zeros(1, 32)
    w[0, :16] = 1.0
    w[0, 16:] = torch.tensor([1e-8, -1e-8] * 8)
    t = quantize_nvfp4(w)
    # s = 1e-8 / (6 * (1/2688)) ~ 4.5e-6, far below half the smallest E4M3 subnormal (2^-10)
    assert t.block_scale.float()[0, 1].item() == 0.0
    assert torch.all(t.packed[0, 8:] == 0)  # +0 codes, also for the negative inputs
    out = dequantize_nvfp4(t)
    assert not torch.isnan(out).any()
    assert torch.all(out[0, 16:] == 0)
    assert torch.all(out[0, :16] == 1.0)


def test_nvfp4_static_global_scale():
    w = torch.tensor([[100.0, -100.0, 50.0] + [0.0] * 13])
    # Too small a static scale: the block scale saturates at 448 and the values at +-6.
    t = quantize_nvfp4(w, global_scale=torch.tensor(1e-3))
    assert t.global_scale.item() == np.float32(1e-3)
    assert t.block_scale.float().tolist() == [[448.0]]
    assert unpack_nibbles(t.packed)[0, :3].tolist() == [7, 15, 7]
    # A matching static scale reproduces the dynamic result.
    gs = torch.tensor(100.0) / (6 * 448)
    assert torch.equal(quantize_nvfp4(w, global_scale=gs).packed, quantize_nvfp4(w).packed)


@SETTINGS
@given(arrays_2d(), st.floats(2.0**-20, 10.0, width=32))
def test_nvfp4_static_global_scale_matches_reference(w, gs):
    t = quantize_nvfp4(torch.from_numpy(w), global_scale=torch.tensor(gs))
    ref = nvfp4_ref(w.astype(np.float64), global_scale=gs)
    assert_same(t.block_scale.float(), ref["block_scale"])
    assert_same(t.packed, ref["packed"])
    out = dequantize_nvfp4(t)
    assert not torch.isnan(out).any()
    assert_same(out, ref["deq"])


# ------------------------------------------------------------------------------------ shared behaviour

QUANTIZERS = {
    "int8_tensor": lambda x: quantize_int8(x),
    "int8_channel": lambda x: quantize_int8(x, "channel"),
    "int8_token": lambda x: quantize_int8(x, "token"),
    "fp8_tensor": lambda x: quantize_fp8(x),
    "fp8_channel": lambda x: quantize_fp8(x, "channel"),
    "fp8_token": lambda x: quantize_fp8(x, "token"),
    "fp8_block": lambda x: quantize_fp8(x, "block"),
    "int4_sym": lambda x: quantize_int4(x, 16),
    "int4_asym": lambda x: quantize_int4(x, 16, symmetric=False),
    "int3": lambda x: quantize_int4(x, 16, bits=3),
    "nvfp4": lambda x: quantize_nvfp4(x),
}

DEQUANTIZE = {Int8Tensor: dequantize_int8, FP8Tensor: dequantize_fp8, Int4Tensor: dequantize_int4,
              NVFP4Tensor: dequantize_nvfp4}


def _deq(t, dtype=torch.float32):
    return DEQUANTIZE[type(t)](t, dtype)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_raise(name, bad):
    x = torch.ones(2, 20)
    x[1, 7] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        QUANTIZERS[name](x)
    with pytest.raises(ValueError, match="NaN or inf"):
        QUANTIZERS[name](x.to(torch.bfloat16))


def test_non_finite_static_scales_raise():
    x = torch.ones(4, 16)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_int8(x, scale=torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_fp8(x, scale=torch.tensor(float("inf")))
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_nvfp4(x, global_scale=torch.tensor(float("nan")))


def test_check_finite_names_the_tensor():
    check_finite(torch.ones(3), "fine")
    with pytest.raises(ValueError, match=r"^layers\.0\.mlp weight contains NaN or inf$"):
        check_finite(torch.tensor([1.0, float("nan")]), "layers.0.mlp weight")


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_all_zero_tensors(name):
    t = QUANTIZERS[name](torch.zeros(3, 37))
    out = _deq(t)
    assert out.shape == (3, 37)
    assert torch.all(out == 0) and not torch.isnan(out).any()
    scale = getattr(t, "scale", None)
    if scale is not None:
        assert torch.all(scale == 1.0)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_huge_values_stay_finite(name):
    x = torch.tensor([[1e30, -3e29, 1.0, 0.0, -1e30, 5e29, 2.0, 7e-20] * 4])
    out = _deq(QUANTIZERS[name](x))
    assert torch.isfinite(out).all()
    # The largest element is reproduced to within a few percent (NVFP4 and INT3 are coarse but exact there).
    assert abs(out[0, 0].item() - 1e30) <= 0.07 * 1e30


def test_int4_asymmetric_near_float32_max_stays_finite():
    w = torch.tensor([[3e38, -3e38, 1.0, 0.0]])
    out = dequantize_int4(quantize_int4(w, 4, symmetric=False))
    assert torch.isfinite(out).all()
    # scale = 6e38/15 = 4e37: the largest value lands within half a step.
    assert abs(out[0, 0].item() - 3e38) <= 0.5 * 4e37 * (1 + 1e-5)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(name, dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 37, generator=g) * 3).to(dtype)
    t_low = QUANTIZERS[name](x)
    t_f32 = QUANTIZERS[name](x.float())  # exact upcast: results must be identical
    assert torch.equal(_deq(t_low), _deq(t_f32))
    out = _deq(t_low, dtype)
    assert out.dtype == dtype and out.shape == x.shape


@pytest.mark.parametrize(
    "fmt,granularity,quant,deq",
    [
        ("int8", "token", lambda x: quantize_int8(x, "token"), dequantize_int8),
        ("fp8_e4m3", "channel", lambda x: quantize_fp8(x, "channel"), dequantize_fp8),
        ("fp8_e4m3", "block", lambda x: quantize_fp8(x, "block", block_size=16), dequantize_fp8),
        ("nvfp4", "block", lambda x: quantize_nvfp4(x), dequantize_nvfp4),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize(fmt, granularity, quant, deq, dtype):
    x = torch.randn(8, 40).to(dtype)
    bs = 16 if granularity == "block" and fmt == "fp8_e4m3" else None
    out = fake_quantize(x, fmt, granularity, block_size=bs)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, deq(quant(x), dtype))


def test_fake_quantize_static_scales():
    x = torch.tensor([[1.0, -2.0, 300.0] + [0.0] * 13])
    assert fake_quantize(x, "int8", "tensor", scale=torch.tensor(1.0)).tolist()[0][:3] == [1.0, -2.0, 127.0]
    assert fake_quantize(x, "fp8_e4m3", "tensor", scale=torch.tensor(0.5)).tolist()[0][:3] == [1.0, -2.0, 224.0]
    gs = torch.tensor(300.0) / (6 * 448)
    assert torch.equal(fake_quantize(x, "nvfp4", "block", scale=gs),
                       dequantize_nvfp4(quantize_nvfp4(x, global_scale=gs)))
    with pytest.raises(ValueError):
        fake_quantize(x, "int2", "tensor")
