"""The scale of a float activation quantized on the CPU, and the checks that the activation is finite.

Shared by the INT8 lowering (`int8`) and the FP8/NVFP4 input round trips (`fp8`); `qcompile.lowering.onednn` calls
the checks too. The NaN/inf checks are ops of their own so that compiled code raises the same ValueError as the
reference. Overview: docs/cpu-lowering.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qcompile import numerics


def _raise_if_not_finite(amax: Tensor) -> None:
    if not math.isfinite(amax.max().item()):  # max propagates NaN
        raise ValueError("input to a quantized linear layer contains NaN or inf")


@torch.library.custom_op("qcompile::checked_input_scale", mutates_args=())
def checked_input_scale(scale: Tensor, amax: Tensor) -> Tensor:
    """`scale`, after checking that the activation's amax is finite: NaN/inf inputs have no INT8 code.

    An op of its own (not an assert in the graph) so that compiled code raises the same ValueError as the reference.
    Only the output scaling reads its result, so under inductor the quantization and the amax reduction still run
    in one pass over the activation, before the check.
    """
    _raise_if_not_finite(amax)
    return scale.clone()


@checked_input_scale.register_fake
def _(scale, amax):
    return torch.empty_like(scale)


@torch.library.custom_op("qcompile::check_finite_amax", mutates_args=())
def check_finite_amax(amaxes: list[Tensor]) -> Tensor:
    """1.0 (float32 scalar), after checking that every value in `amaxes` (largest |input| of quantized layers, by
    layer or by row) is finite.

    For graphs that check all their INT8 layers' inputs at once (`qcompile.lowering.onednn`): multiplying the
    outputs by the result keeps the check in the graph and changes no value. The amaxes come unreduced: reduced
    in the graph, inductor would compute each one in a loop of its own instead of in the layer's quantization loop.
    """
    _raise_if_not_finite(torch.cat([amax.reshape(-1) for amax in amaxes]))
    return torch.ones((), dtype=torch.float32)


@check_finite_amax.register_fake
def _(amaxes):
    return torch.empty((), dtype=torch.float32)


def input_scale_and_amax(
    x: Tensor, input_scale: Tensor | None, granularity: str, fmt_max: float
) -> tuple[Tensor, Tensor]:
    """(scale, amax) of a float32 activation: amax/fmt_max per token (last dim) or tensor, or the calibrated scale.

    `amax` is there to be checked (`checked_input_scale`) before the scale is used again; with a static scale it is
    computed only for that check.
    """
    amax = x.abs().amax(dim=-1, keepdim=True) if granularity == "token" else x.abs().amax()
    scale = amax / fmt_max if input_scale is None else input_scale.to(torch.float32)
    return numerics.nonzero_scale(scale), amax


__all__ = ["check_finite_amax", "checked_input_scale", "input_scale_and_amax"]
