"""ONNX lowering: `export_onnx(qm, "model.onnx")` writes a `QuantizedModel` as a QDQ ONNX graph that edge runtimes
fuse into quantized kernels; `target="tensorrt"` writes the explicit-quantization form TensorRT's ONNX parser reads.

This module holds the public API. The quantized graph is re-exported with torch.export and translated with
`torch.onnx.export(..., dynamo=True)` (`exporter`), every `qcompile::` op through `translate.translation_table`
(`translate._Translation` for ONNX Runtime, `tensorrt._TensorRTTranslation` for TensorRT; weights re-laid out by
`weights`); the graph is then cleaned up (`graph_cleanup`), moved to the compute dtype for TensorRT (`precision`)
and written (`save`). `runtime.onnxruntime_session` opens a file in ONNX Runtime. docs/onnx.md describes both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcompile.ops import op_arguments

from .errors import OnnxExportError, UntranslatableOpError
from .exporter import (
    _check_translatable,
    _eval_mode,
    _example_call,
    _quantized_nodes,
    _require_onnx,
    _run_exporter,
    _where,
)
from .graph_cleanup import (
    _dedicate_qdq_pairs,
    _keep_gelu_bias_apart,
    _name_dynamic_axes,
    _name_outputs,
    _optimize,
    _set_model_metadata,
    _strip_exporter_metadata,
)
from .precision import compute_dtype, retype_floats, source_dtype, torch_dtype
from .runtime import INT4_ACCURACY_EXACT, X64_QUANT_PRECISION, onnxruntime_session
from .save import _write_checked
from .tensorrt import MAX_OPSET as TENSORRT_MAX_OPSET
from .tensorrt import _TensorRTTranslation, check_tensorrt
from .translate import DEFAULT_OPSET, FP4_OPSET, MIN_OPSET, _Translation, translation_table

__all__ = [
    "DEFAULT_OPSET",
    "FP4_OPSET",
    "INT4_ACCURACY_EXACT",
    "INT8_WEIGHT_TYPES",
    "OnnxExportError",
    "TARGETS",
    "TENSORRT_MAX_OPSET",
    "UntranslatableOpError",
    "X64_QUANT_PRECISION",
    "export_onnx",
    "onnxruntime_session",
    "to_onnx_model",
    "translation_table",
]

INT8_WEIGHT_TYPES = ("uint8", "int8")  # how INT8 weights are stored for ONNX Runtime, default first (export_onnx)
TARGETS = ("onnxruntime", "tensorrt")  # the runtimes a file is written for, default first
# A protobuf message cannot exceed 2 GiB; above this many bytes of initializers, tensors go to an external file.
# (export_onnx reads it from this module, where tests lower it.)
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    *,
    target: str = "onnxruntime",
    dtype: torch.dtype | str | None = None,
    example_inputs: tuple | Any = None,
    example_kwargs: dict | None = None,
    external_data: bool | None = None,
    optimize: bool = True,
    check: bool = True,
    int8_weights: str | None = None,
) -> Path:
    """Write `model` (a `qcompile.QuantizedModel`, or any module) to `path` as a QDQ ONNX model.

    - `target`: the runtime the file is written for (docs/onnx.md has the pattern of every recipe for each):
      - "onnxruntime" (default): the QDQ patterns ONNX Runtime's CPU provider fuses into its integer kernels
        (`MatMulIntegerToFloat`, `MatMulNBits`), in float32. The file computes the quantized model's function in a
        plain `onnxruntime.InferenceSession(path)`, without session options, on every CPU.
      - "tensorrt": explicit quantization as TensorRT 10's ONNX parser accepts it (and NVIDIA Model Optimizer
        writes it): symmetric Q/DQ without zero points (INT8, FP8), INT4 weights as blocked DequantizeLinear, NVFP4
        weights as FLOAT4E2M1 behind a DequantizeLinear chain and NVFP4 activations through
        `trt::TRT_FP4DynamicQuantize`, with the float graph in `dtype`. Recipes whose activation scales are
        computed per call (`int8_dynamic`, `fp8_dynamic`) and asymmetric INT4 raise `UntranslatableOpError`
        naming the node: TensorRT has no form for them. No engine is built or checked here (docs/onnx.md).
    - `dtype`: the compute dtype of a TensorRT file, `torch.float16` (default) or `torch.bfloat16`: inputs,
      outputs, weights' dequantized values, GEMMs, biases and activations. Scales stay float32 where the ops take
      them so (see docs/onnx.md). Only for `target="tensorrt"`.
    - `opset`: 21 by default; a model with NVFP4 layers needs FLOAT4E2M1 and is written at opset 23 (at least).
      TensorRT files are written at opset 24 at most.
    - Inputs: the model's own example call (`QuantizedModel`), or `example_inputs` / `example_kwargs`. Every
      dimension the model does not fix stays dynamic; the first input's leading dynamic axes are named
      `batch` and `sequence`. Outputs are named after the model's output fields (`logits`, `last_hidden_state`).
    - `external_data`: None writes tensors to `<path>.data` only when they exceed the 2 GB protobuf limit;
      True/False forces it.
    - `int8_weights` (ONNX Runtime): how INT8 weights are stored.
      - "uint8" (default): the codes plus 128 at zero point 128, the same integers, which ONNX Runtime multiplies
        u8 × u8, exactly on every x86 CPU with any session options.
      - "int8": the codes as they are, for ONNX Runtime's u8 × s8 kernels: faster on CPUs with an INT8
        dot-product instruction (AVX-512 VNNI, AVX-VNNI, AMX), but on x86 CPUs without one those kernels add pairs
        of products in saturating int16 (measured: 19% relative error on a 384-input layer) unless the session
        sets `session.x64quantprecision` to "1" (`X64_QUANT_PRECISION`; `onnxruntime_session` sets it).
      TensorRT files always hold INT8 codes (`None` or "int8").
    - The same model and inputs give byte-identical files. The file is written to a temporary directory next to
      `path`, checked with `onnx.checker.check_model(full_check=True)` when `check`, and moved into place with
      `os.replace`, so a reader never sees a partial file (with external data, the data file is moved first).

    Returns the path written. Raises `UntranslatableOpError` (naming the node) when a node has no translation for
    the target, ValueError for arguments that do not fit together.
    """
    _require_onnx()

    path = Path(path)
    int8_weights, dtype = _check_arguments(opset, target, dtype, int8_weights)
    args, kwargs = _example_call(model, example_inputs, example_kwargs)
    module = getattr(model, "graph_module", model)
    recipe = getattr(getattr(model, "recipe", None), "name", None)

    onnx_model = to_onnx_model(module, args, kwargs, opset=opset, optimize=optimize, int8_weights=int8_weights,
                               target=target, dtype=dtype, recipe=recipe)
    _set_model_metadata(onnx_model, model)
    onnx_model.metadata_props["qcompile.target"] = target
    if target == "tensorrt":
        onnx_model.metadata_props["qcompile.dtype"] = str(dtype).removeprefix("torch.")

    path.parent.mkdir(parents=True, exist_ok=True)
    initializer_bytes = sum(
        value.const_value.nbytes for value in onnx_model.graph.initializers.values() if value.const_value is not None
    )
    use_external = initializer_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
    _write_checked(onnx_model, path, use_external=use_external, check=check)
    return path


def _check_arguments(opset: int, target: str, dtype, int8_weights):
    """The arguments checked against each other; returns (int8_weights, dtype) with the target's defaults."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: QDQ with block_size needs opset {MIN_OPSET} or newer")
    if target == "onnxruntime":
        if dtype is not None:
            raise ValueError("dtype applies to target='tensorrt'; ONNX Runtime files compute in float32")
        int8_weights = INT8_WEIGHT_TYPES[0] if int8_weights is None else int8_weights
        if int8_weights not in INT8_WEIGHT_TYPES:
            raise ValueError(f"int8_weights must be one of {INT8_WEIGHT_TYPES}, not {int8_weights!r}")
        return int8_weights, None
    if opset > TENSORRT_MAX_OPSET:
        raise ValueError(f"opset {opset}: target='tensorrt' writes opset {TENSORRT_MAX_OPSET} at most")
    if int8_weights not in (None, "int8"):
        raise ValueError(f"int8_weights={int8_weights!r} applies to target='onnxruntime': TensorRT reads INT8 "
                         "weights as signed codes with no zero point")
    dtype = torch_dtype(torch.float16 if dtype is None else dtype)
    compute_dtype(dtype)  # raises for anything but float16 / bfloat16
    return "int8", dtype


def to_onnx_model(module: nn.Module, args: tuple, kwargs: dict, *, opset: int = DEFAULT_OPSET, optimize: bool = True,
                  int8_weights: str = "uint8", target: str = "onnxruntime", dtype: torch.dtype | None = None,
                  recipe: str | None = None):
    """The ONNX IR model (`onnx_ir.Model`) of `module` called as `module(*args, **kwargs)`; see `export_onnx`.

    Every qcompile op in the graph must have a translation: a node without one raises `UntranslatableOpError` naming
    the node, and every quantized node must have become a DequantizeLinear pattern, so a quantized model never turns
    into a float graph silently. `recipe` only names the recipe in errors. With `target="tensorrt"`, `dtype` may also
    be torch.float32 here: the TensorRT patterns computed in float32, which the tests hold to the QuantizedModel
    exactly (TensorRT itself needs float16 or bfloat16 around its FP8/FP4/INT4 GEMMs; `export_onnx` refuses it).
    """
    _require_onnx()
    from qcompile.capture import export_program

    tensorrt = target == "tensorrt"
    with torch.no_grad(), _eval_mode(module):
        program = export_program(module, args, kwargs)
    nodes = _quantized_nodes(program.graph_module)
    _check_translatable(nodes, translation_table())
    if tensorrt:
        check_tensorrt(nodes, recipe, _where)
    if any(node.target == torch.ops.qcompile.nvfp4_linear.default or op_arguments(node)["input_format"] == "nvfp4"
           for node in nodes):
        opset = max(opset, FP4_OPSET)
    if tensorrt:
        source = source_dtype(module, args, kwargs)
        translation = _TensorRTTranslation(opset, int8_weights="int8", compute=source)
    else:
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
    if tensorrt:
        retype_floats(model, source, compute_dtype(torch.float16 if dtype is None else dtype, allow_float32=True),
                      translation.keep_float32)
    else:
        _dedicate_qdq_pairs(model)
        _keep_gelu_bias_apart(model)
    return model
