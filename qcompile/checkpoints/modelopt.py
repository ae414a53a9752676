"""Model Optimizer's unified Hugging Face checkpoint (TensorRT-LLM, vLLM and SGLang read it as `modelopt`).

`hf_quant_config.json` names one `quant_algo` for the model, and `config.json` carries the same description as its
`quantization_config` (`quant_method: "modelopt"`). Per quantized linear `P`, the tensors as the format's loaders
read them (scales are float32 unless said otherwise; a 0-d tensor is one number):

| recipe | quant_algo | tensors under `P.` |
|---|---|---|
| fp8 | FP8 | `weight` float8_e4m3fn, `weight_scale` 0-d, `input_scale` 0-d |
| fp8_dynamic | FP8_PER_CHANNEL_PER_TOKEN | `weight`, `weight_scale [N]` |
| fp8_block | FP8_PB_WO | `weight`, `weight_scale [ceil(N/128), ceil(K/128)]` |
| int8_sq | W8A8_SQ_PER_CHANNEL | `weight` int8, `weight_scale [N]`, `input_scale` 0-d |
| int4_awq, int4_gptq | W4A16_AWQ | `weight` uint8 `[N/2, K]`, `weight_scale [N, K/group]` |
| w4a8_awq | W4A8_AWQ | as W4A16_AWQ, with `weight_scale_2` 0-d (the FP8 scale) and `input_scale` 0-d |
| nvfp4 | NVFP4 | `weight` uint8 `[N, K/2]`, `weight_scale` FP8 `[N, K/16]`, `weight_scale_2` 0-d, `input_scale` 0-d |
| nvfp4_weight_only | W4A16_NVFP4 | as NVFP4, without `input_scale` |

- W4A16_AWQ packs two signed 4-bit codes per byte along the output dimension: byte `[i, k]` holds row `2i` in its
  low nibble and row `2i + 1` in its high nibble. W4A8_AWQ stores the same, and its weight is
  `fp8_e4m3(code * weight_scale / weight_scale_2) * weight_scale_2` (docs/formats.md#w4a8), as qcompile computes it.
- NVFP4 multiplies by its global scales: `weight_scale_2` is qcompile's global scale and `input_scale` the static
  input global scale (amax / (6 * 448)), so the dequantized weight is `e2m1 * weight_scale * weight_scale_2`, as
  qcompile defines it.
- A quantized KV cache is `kv_cache_quant_algo` FP8 or NVFP4 with `<key projection>.k_scale` and
  `<value projection>.v_scale`: the FP8 scale amax/448 (not raised to 1, as Model Optimizer's own exporter does
  for engines that once ignored the scale: the checkpoint computes what qcompile computes), or the NVFP4 global
  scale amax/(6*448).
- An AWQ or SmoothQuant scale with no earlier op to fold into is `pre_quant_scale [K]`: the input is multiplied by
  it before it is quantized (W4A16_AWQ and W8A8_SQ_PER_CHANNEL).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcompile import numerics
from qcompile.quantized_modules import QuantizedLinear
from qcompile.recipes import Recipe

PRODUCER_VERSION = "0.40.0"  # the Model Optimizer release whose exporter this layout was read from


def _error(message: str) -> Exception:
    from qcompile.checkpoints import ExportError

    return ExportError(message)


def quant_algo(recipe: Recipe) -> str:
    """The format's name for what the recipe computes; an error for a recipe it has no name for."""
    w, x = recipe.weights, recipe.inputs
    name = None
    if w.format == "fp8_e4m3":
        if w.granularity == "tensor" and x is not None and x.format == "fp8_e4m3" and not x.dynamic \
                and x.granularity == "tensor":
            name = "FP8"
        elif w.granularity == "channel" and x is not None and x.format == "fp8_e4m3" and x.dynamic \
                and x.granularity == "token":
            name = "FP8_PER_CHANNEL_PER_TOKEN"
        elif w.granularity == "block" and x is None:
            name = "FP8_PB_WO"
    elif w.format == "int8" and w.granularity == "channel" and x is not None and x.format == "int8" \
            and not x.dynamic and x.granularity == "tensor":
        name = "W8A8_SQ_PER_CHANNEL"
    elif w.format == "int4" and w.symmetric and w.granularity == "group" and x is None:
        name = "W4A16_AWQ"
    elif w.format == "int4" and w.symmetric and w.granularity == "group" and x is not None \
            and x.format == "fp8_e4m3" and not x.dynamic and x.granularity == "tensor":
        name = "W4A8_AWQ"
    elif w.format == "nvfp4" and x is not None and x.format == "nvfp4" and not x.dynamic:
        name = "NVFP4"
    elif w.format == "nvfp4" and x is None:
        name = "W4A16_NVFP4"
    if name is None:
        raise _error(f"recipe {recipe.name!r} has no Model Optimizer quant_algo that qcompile writes "
                     "(int8_dynamic: use format='compressed-tensors')")
    return name


def check_recipe(recipe: Recipe) -> None:
    quant_algo(recipe)


_KV_CACHE_ALGO = {None: None, "fp8": "FP8", "nvfp4": "NVFP4"}


def kv_cache_tensors(report, quantization) -> dict[str, Tensor]:
    """`<key projection>.k_scale` and `<value projection>.v_scale` (float32, 0-d): the FP8 scale, or the NVFP4
    global scale, of the attention's keys and values."""
    if not report.key_projection or not report.value_projection:
        raise _error(f"attention {report.name!r}: no linear layer computes its keys or values, and Model "
                     "Optimizer's format stores the KV-cache scales under those layers")
    return {f"{report.key_projection}.k_scale": quantization.key_scale.float().reshape(()),
            f"{report.value_projection}.v_scale": quantization.value_scale.float().reshape(())}


def check_dtype(recipe: Recipe, dtype: torch.dtype) -> None:
    pass


def _description(recipe: Recipe, ignore: list[str]) -> dict:
    algo = quant_algo(recipe)
    details = {"quant_algo": algo, "kv_cache_quant_algo": _KV_CACHE_ALGO[recipe.kv_cache]}
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        details.update(group_size=int(recipe.weights.block_size), has_zero_point=False, pre_quant_scale=True)
    elif algo in ("NVFP4", "W4A16_NVFP4"):
        details.update(group_size=16)
    details["exclude_modules"] = ignore
    return details


def extra_files(recipe: Recipe, ignore: list[str]) -> dict[str, dict]:
    return {"hf_quant_config.json": {"producer": {"name": "modelopt", "version": PRODUCER_VERSION},
                                     "quantization": _description(recipe, ignore)}}


def quantization_config(recipe: Recipe, ignore: list[str]) -> dict:
    """config.json's `quantization_config`: the same description, in the form the loaders of `modelopt` read."""
    details = _description(recipe, ignore)
    config = {"quant_method": "modelopt", "quant_algo": details["quant_algo"], "ignore": details["exclude_modules"],
              "producer": {"name": "modelopt", "version": PRODUCER_VERSION}, "kv_cache_scheme": None}
    if recipe.kv_cache == "fp8":
        config["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    elif recipe.kv_cache is not None:
        config["kv_cache_scheme"] = _KV_CACHE_ALGO[recipe.kv_cache]
    for key in ("group_size", "has_zero_point", "pre_quant_scale"):
        if key in details:
            config[key] = details[key]
    if details["quant_algo"] in ("FP8", "NVFP4", "W4A16_NVFP4"):
        bits = 8 if details["quant_algo"] == "FP8" else 4
        args = {"dynamic": False, "num_bits": bits, "type": "float"}
        if bits == 4:
            args["group_size"] = 16
        group = {"weights": dict(args), "targets": ["Linear"]}
        if details["quant_algo"] != "W4A16_NVFP4":  # weight-only: no activation quantization
            group["input_activations"] = dict(args)
        config["config_groups"] = {"group_0": group}
    return config


def layer_tensors(name: str, layer: QuantizedLinear, dtype: torch.dtype) -> dict[str, Tensor]:
    op = layer.op._schema.name.split("::")[1]
    out: dict[str, Tensor] = {}
    if op in ("fp8_linear", "int8_linear"):
        out["weight"] = layer.weight
        scale = layer.weight_scale.float()
        if op == "fp8_linear" and layer.constants.get("block_size"):
            out["weight_scale"] = scale
        else:
            out["weight_scale"] = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1)
    elif op == "int4_linear":
        group = layer.constants["group_size"]
        if layer.in_features % group or layer.out_features % 2:
            raise _error(f"layer {name!r}: W4A16_AWQ/W4A8_AWQ need in_features divisible by {group} and an even "
                         f"out_features, got {layer.out_features}x{layer.in_features}")
        codes = numerics.unpack_nibbles(layer.packed)[:, : layer.in_features]  # two's complement nibbles
        out["weight"] = (codes[0::2] & 0xF) | ((codes[1::2] & 0xF) << 4)
        out["weight_scale"] = layer.scale.float()
        if getattr(layer, "fp8_scale", None) is not None:  # W4A8_AWQ
            out["weight_scale_2"] = layer.fp8_scale.float().reshape(())
    elif op == "nvfp4_linear":
        if layer.in_features % 16:
            raise _error(f"layer {name!r}: NVFP4 needs in_features divisible by 16, got {layer.in_features}")
        out["weight"] = layer.packed
        out["weight_scale"] = layer.block_scale
        out["weight_scale_2"] = layer.global_scale.float().reshape(())
    else:
        raise _error(f"layer {name!r}: no Model Optimizer layout for {layer.op}")
    input_scale = getattr(layer, "input_scale", None)
    if input_scale is not None:
        out["input_scale"] = input_scale.float().reshape(())
    if layer.input_multiplier is not None:
        if op not in ("int4_linear", "int8_linear"):
            raise _error(f"layer {name!r}: Model Optimizer has no pre_quant_scale for {op}")
        out["pre_quant_scale"] = layer.input_multiplier.float().reshape(-1)
    return out
