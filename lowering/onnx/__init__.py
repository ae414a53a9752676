"""ONNX lowering: `export_onnx(qm, "model.onnx")` writes a `QuantizedModel` as a QDQ ONNX graph that edge runtimes
fuse into quantized kernels.

This module holds the public API. The quantized graph is re-exported with torch.export and translated with
`torch.onnx.export(..., dynamo=True)` (`exporter`), every `qcompile::` op through `translate.translation_table`
(weights re-laid out by `weights`); the graph is then cleaned up (`graph_cleanup`) and written (`save`).
`runtime.onnxruntime_session` opens the file in ONNX Runtime.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import OnnxExportError, UntranslatableOpError
from .exporter import _check_translatable, _eval_mode, _example_call, _quantized_nodes, _require_onnx, _run_exporter
from .graph_cleanup import (
    _dedicate_qdq_pairs,
    _keep_gelu_bias_apart,
    _name_dynamic_axes,
    _name_outputs,
    _optimize,
    _set_model_metadata,
    _strip_exporter_metadata,
)
from .runtime import INT4_ACCURACY_EXACT, onnxruntime_session
from .save import _write_checked
from .translate import DEFAULT_OPSET, FP4_OPSET, MIN_OPSET, _Translation, translation_table

__all__ = [
    "DEFAULT_OPSET",
    "FP4_OPSET",
    "INT4_ACCURACY_EXACT",
    "INT8_WEIGHT_TYPES",
    "OnnxExportError",
    "UntranslatableOpError",
    "export_onnx",
    "onnxruntime_session",
    "translation_table",
]

INT8_WEIGHT_TYPES = ("int8", "uint8")  # how INT8 weights are stored (see export_onnx)
# A protobuf message cannot exceed 2 GiB; above this many bytes of initializers, tensors go to an external file.
# (export_onnx reads it from this module, where tests lower it.)
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    *,
    example_inputs: tuple | Any = None,
    example_kwargs: dict | None = None,
    external_data: bool | None = None,
    optimize: bool = True,
    check: bool = True,
    int8_weights: str = "int8",
) -> Path:
    """Write `model` (a `qcompile.QuantizedModel`, or any module) to `path` as a QDQ ONNX model.

    - `opset`: 21 by default; a model with NVFP4 layers needs FLOAT4E2M1 and is written at opset 23 (at least).
    - Inputs: the model's own example call (`QuantizedModel`), or `example_inputs` / `example_kwargs`. Every
      dimension the model does not fix stays dynamic; the first input's leading dynamic axes are named
      `batch` and `sequence`. Outputs are named after the model's output fields (`logits`, `last_hidden_state`).
    - `external_data`: None writes tensors to `<path>.data` only when they exceed the 2 GB protobuf limit;
      True/False forces it.
    - `int8_weights`: how INT8 weights are stored. "int8" (default): the codes as they are, for ONNX Runtime's
      u8 × s8 kernels, the fast ones on CPUs with an INT8 dot-product instruction (AVX-512 VNNI, AVX-VNNI, AMX).
      On x86 CPUs without one those kernels add pairs of products in saturating int16 (measured: 19% relative
      error on a 384-input layer) unless the session sets `session.x64quantprecision` (`onnxruntime_session`
      does). "uint8": the codes plus 128 at zero point 128, the same integers, which ONNX Runtime multiplies
      u8 × u8, exactly on every x86 CPU and with any session options, at the speed of the exact kernels (slower
      than u8 × s8 with VNNI; the same without it).
    - The same model and inputs give byte-identical files. The file is written to a temporary directory next to
      `path`, checked with `onnx.checker.check_model(full_check=True)` when `check`, and moved into place with
      `os.replace`, so a reader never sees a partial file (with external data, the data file is moved first).

    Returns the path written. Raises `UntranslatableOpError` (naming the node) when a node has no translation.
    """
    _require_onnx()

    path = Path(path)
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: QDQ with block_size needs opset {MIN_OPSET} or newer")
    if int8_weights not in INT8_WEIGHT_TYPES:
        raise ValueError(f"int8_weights must be one of {INT8_WEIGHT_TYPES}, not {int8_weights!r}")
    args, kwargs = _example_call(model, example_inputs, example_kwargs)
    module = getattr(model, "graph_module", model)

    onnx_model = to_onnx_model(module, args, kwargs, opset=opset, optimize=optimize, int8_weights=int8_weights)
    _set_model_metadata(onnx_model, model)

    path.parent.mkdir(parents=True, exist_ok=True)
    initializer_bytes = sum(
        value.const_value.nbytes for value in onnx_model.graph.initializers.values() if value.const_value is not None
    )
    use_external = initializer_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
    _write_checked(onnx_model, path, use_external=use_external, check=check)
    return path


def to_onnx_model(module: nn.Module, args: tuple, kwargs: dict, *, opset: int = DEFAULT_OPSET, optimize: bool = True,
                  int8_weights: str = "int8"):
    """The ONNX IR model (`onnx_ir.Model`) of `module` called as `module(*args, **kwargs)`; see `export_onnx`.

    Every qcompile op in the graph must have a translation: a node without one raises `UntranslatableOpError` naming
    the node, and every quantized node must have become a DequantizeLinear pattern, so a quantized model never turns
    into a float graph silently.
    """
    _require_onnx()
    from qcompile.capture import export_program

    with torch.no_grad(), _eval_mode(module):
        program = export_program(module, args, kwargs)
    nodes = _quantized_nodes(program.graph_module)
    _check_translatable(nodes, translation_table())
    if any(node.target == torch.ops.qcompile.nvfp4_linear.default or node.args[-2] == "nvfp4" for node in nodes):
        opset = max(opset, FP4_OPSET)
    translation = _Translation(opset, int8_weights=int8_weights)
    table = translation_table(translation)

    onnx_program = _run_exporter(program, table, opset)
    model = onnx_program.model
    translation.apply(model)
    if len(translation.translated) != len(nodes):
        raise OnnxExportError(
            f"{len(nodes)} quantized nodes in the graph but {len(translation.translated)} were translated to "
            "QDQ patterns; refusing to write a graph with float fallbacks"
        )
    _strip_exporter_metadata(model)
    _name_outputs(model, program)
    _name_dynamic_axes(model)
    if optimize:
        _optimize(model)
    else:
        import onnx_ir.passes.common as passes

        passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    _dedicate_qdq_pairs(model)
    _keep_gelu_bias_apart(model)
    return model
