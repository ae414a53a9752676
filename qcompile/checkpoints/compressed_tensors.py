"""The compressed-tensors checkpoint format (vLLM, SGLang and transformers load it).

Each quantized linear `P` is written as the format's tensors under `P.`, and the model's `quantization_config`
describes one config group per layer format. The layouts, as the format's loaders read them:

- `int-quantized` (INT8) and `float-quantized` (FP8): `weight` in int8 / float8_e4m3fn, `weight_scale` float32
  (`[1]` per tensor, `[N, 1]` per channel, `[ceil(N/128), ceil(K/128)]` per block), `input_scale` `[1]` for a
  static activation scale; dequantized as `weight * weight_scale`, which is qcompile's definition.
- `pack-quantized` (INT4 groups, symmetric): the codes offset by 8 (0..15), eight to an int32 with element 0 in the
  lowest bits, in `weight_packed [N, ceil(K/8)]`; `weight_scale [N, ceil(K/group)]`; `weight_shape = [N, K]`.
- `nvfp4-pack-quantized`: E2M1 codes two to a byte (element 2i in the low nibble), `weight_scale` FP8 per 16
  elements, and the global scales stored as divisors: `weight_global_scale = 1 / global_scale`, the same for
  `input_global_scale` (the loaders compute `weight_scale / weight_global_scale`).

See docs/checkpoints.md for what each recipe maps to and where an engine's arithmetic can differ from qcompile's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcompile import formats, numerics
from qcompile.quantized_modules import QuantizedLinear
from qcompile.recipes import QuantSpec, Recipe

VERSION = "0.20.1"  # the compressed-tensors release whose loaders this layout was checked against


def _error(message: str) -> Exception:
    from qcompile.checkpoints import ExportError

    return ExportError(message)


def check_recipe(recipe: Recipe) -> None:
    """Raise for a recipe that has no exact route into this format."""
    weights, inputs = recipe.weights, recipe.inputs
    if recipe.kv_cache not in (None, "fp8"):
        raise _error(f"kv_cache={recipe.kv_cache!r}: compressed-tensors' engines read 8-bit float KV caches only; "
                     "export an NVFP4 KV cache with format='modelopt'")
    if formats.FORMATS[weights.format].compressed_tensors is None or not weights.symmetric:
        raise _error(f"recipe {recipe.name!r}: {weights.format} weights{'' if weights.symmetric else ' (asymmetric)'} "
                     "have no compressed-tensors layout qcompile writes")
    if inputs is None:
        return
    routes = {"int8": {"int8"}, "fp8_e4m3": {"fp8_e4m3"}, "nvfp4": {"nvfp4"}, "int4": set()}
    if inputs.format not in routes[weights.format]:
        raise _error(f"recipe {recipe.name!r} ({weights.format} weights, {inputs.format} inputs) has no route in "
                     "compressed-tensors, whose engines run 4-bit integer weights with 16-bit activations only; "
                     "export it with format='modelopt' (W4A8_AWQ), or quantize with a weight-only recipe")


def check_dtype(recipe: Recipe, dtype: torch.dtype) -> None:
    if recipe.weights.format == "nvfp4" and dtype != torch.bfloat16:
        raise _error("compressed-tensors' loaders decompress NVFP4 weights to bfloat16, so an NVFP4 checkpoint "
                     f"in {dtype} does not load: export with dtype=torch.bfloat16")


def _args(spec: QuantSpec, *, weights: bool) -> dict:
    """A compressed-tensors QuantizationArgs for one of qcompile's specs."""
    kind, bits, _ = formats.FORMATS[spec.format].compressed_tensors
    args = {"num_bits": bits, "type": kind, "symmetric": True, "group_size": None, "strategy": None,
            "block_structure": None, "dynamic": False, "actorder": None, "observer": None if not weights else "minmax",
            "observer_kwargs": {}}
    if spec.format == "nvfp4":
        args.update(strategy="tensor_group", group_size=16, dynamic=False if weights else "local")
    elif spec.granularity == "group":
        args.update(strategy="group", group_size=int(spec.block_size))
    elif spec.granularity == "block":
        size = spec.block_size if isinstance(spec.block_size, tuple) else (spec.block_size,) * 2
        args.update(strategy="block", block_structure=list(size))
    else:
        args.update(strategy=spec.granularity, dynamic=bool(spec.dynamic))
    if not weights and args["dynamic"] is False:
        args["observer"] = "minmax"
    return args


def quantization_config(recipe: Recipe, ignore: list[str]) -> dict:
    fmt = formats.FORMATS[recipe.weights.format].compressed_tensors[2]
    group = {"targets": ["Linear"], "weights": _args(recipe.weights, weights=True),
             "input_activations": None if recipe.inputs is None else _args(recipe.inputs, weights=False),
             "output_activations": None, "format": fmt}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ignore, "kv_cache_scheme": _kv_cache_scheme(recipe),
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}, "version": VERSION}


def _kv_cache_scheme(recipe: Recipe) -> dict | None:
    if recipe.kv_cache is None:
        return None
    return {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True,
            "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def kv_cache_tensors(report, quantization) -> dict[str, Tensor]:
    """`<attention>.k_scale` / `v_scale` `[1]` (float32), the attention's per-tensor static FP8 scales."""
    return {f"{report.name}.k_scale": quantization.key_scale.float().reshape(1),
            f"{report.name}.v_scale": quantization.value_scale.float().reshape(1)}


def layer_tensors(name: str, layer: QuantizedLinear, dtype: torch.dtype) -> dict[str, Tensor]:
    """The tensors of one quantized linear under their compressed-tensors names (without the layer prefix)."""
    if layer.input_multiplier is not None:
        raise _error(f"layer {name!r} divides its input by an AWQ/SmoothQuant scale that no earlier layer absorbs, "
                     "and compressed-tensors has no tensor for it: quantize with "
                     "dataclasses.replace(recipe, explicit_input_scales=False) (the CLI does for this format)")
    op = layer.op._schema.name.split("::")[1]
    out: dict[str, Tensor] = {}
    if op == "int8_linear" or op == "fp8_linear":
        weight_scale = layer.weight_scale.float()
        if op == "fp8_linear" and layer.constants.get("block_size"):
            out["weight_scale"] = weight_scale.reshape(layer.weight_scale.shape[-2:]) if weight_scale.dim() >= 2 \
                else weight_scale
        else:
            out["weight_scale"] = weight_scale.reshape(-1, 1) if weight_scale.numel() > 1 else weight_scale.reshape(1)
        out["weight"] = layer.weight
    elif op == "int4_linear":
        group = layer.constants["group_size"]
        if layer.in_features % group:
            raise _error(f"layer {name!r}: compressed-tensors needs in_features ({layer.in_features}) divisible by "
                         f"the group size ({group}): quantize with a group size that divides every layer's width "
                         "(the weights' block_size; the CLI's --group-size)")
        codes = numerics.unpack_nibbles(layer.packed).to(torch.int32)[:, : layer.constants["in_features"]]
        signed = torch.where(codes >= 8, codes - 16, codes)
        out["weight_packed"] = pack_int32(signed + 8)
        out["weight_scale"] = layer.scale.float()
        out["weight_shape"] = torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)
    elif op == "nvfp4_linear":
        if layer.in_features % 16:
            raise _error(f"layer {name!r}: compressed-tensors' NVFP4 needs in_features divisible by 16, "
                         f"got {layer.in_features}")
        out["weight_packed"] = layer.packed
        out["weight_scale"] = layer.block_scale
        out["weight_global_scale"] = _divisor(layer.global_scale)
    else:
        raise _error(f"layer {name!r}: no compressed-tensors layout for {layer.op}")
    input_scale = getattr(layer, "input_scale", None)
    if input_scale is not None:
        if op == "nvfp4_linear":
            out["input_global_scale"] = _divisor(input_scale)
        else:
            out["input_scale"] = input_scale.float().reshape(1)
    return out


def _divisor(scale: Tensor) -> Tensor:
    """compressed-tensors stores NVFP4 global scales as the number it divides by."""
    return (1.0 / scale.double()).float().reshape(1)


def pack_int32(codes: Tensor) -> Tensor:
    """Unsigned 4-bit codes [N, K] -> int32 [N, ceil(K/8)], element 8j+i in bits 4i..4i+3 of word j."""
    rows, cols = codes.shape
    padded = -(-cols // 8) * 8
    codes = torch.nn.functional.pad(codes.to(torch.int64), (0, padded - cols)).reshape(rows, padded // 8, 8)
    words = (codes << (4 * torch.arange(8, dtype=torch.int64))).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed
