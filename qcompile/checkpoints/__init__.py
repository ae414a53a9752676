"""Hugging Face checkpoints of quantized models, in the formats serving engines load.

`export_hf(qm, out_dir, format=...)` writes `config.json` (with its `quantization_config`), safetensors shards with
their index, `generation_config.json` and, when given, the tokenizer's files. One module per format says how each
quantized layer's tensors and description are written (`compressed_tensors`, `modelopt`); this module walks the model's
module tree (`QuantizedModel.as_module()`), asks the format for each `QuantizedLinear`, casts the remaining float
tensors to the export dtype and writes the directory atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from qcompile.atomic import swap_into_place
from qcompile.checkpoints import compressed_tensors, modelopt
from qcompile.checkpoints.names import CheckpointNames, FusedExpertsError
from qcompile.checkpoints.shards import ShardWriter
from qcompile.quantized_modules import QuantizedLinear

FORMATS = {"compressed-tensors": compressed_tensors, "modelopt": modelopt}
MAX_SHARD_BYTES = 5 * 10**9


class ExportError(ValueError):
    """The model or recipe has no route into the requested format."""


def export_hf(
    qm,
    out_dir: str | os.PathLike,
    format: str = "compressed-tensors",
    dtype: torch.dtype = torch.bfloat16,
    tokenizer=None,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write `qm` (from `qcompile.quantize` on a Hugging Face `PreTrainedModel`) as a Hugging Face checkpoint.

    `dtype` is the dtype of the unquantized tensors (embeddings, norms, biases, `lm_head`). The directory is built
    in a temporary sibling and renamed into place; an existing non-empty `out_dir` is refused unless `overwrite`.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; valid formats: {', '.join(FORMATS)}")
    writer = FORMATS[format]
    tree = qm.as_module()
    config = getattr(tree, "config", None)
    if config is None or not hasattr(tree, "save_pretrained"):
        raise ExportError("export_hf needs a model quantized from a Hugging Face PreTrainedModel")
    target = Path(out_dir)
    if target.exists() and (target.is_file() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    writer.check_recipe(qm.recipe)
    writer.check_dtype(qm.recipe, dtype)

    tensors, quantized = module_tensors(tree, writer, dtype)
    if not quantized:
        raise ExportError("the model has no quantized layer to export")
    tensors.update(kv_cache_tensors(qm, tree, writer))
    tensors = _without_tied_copies(tree, tensors)
    names = CheckpointNames(tree)
    try:
        tensors = {names.of([key])[key]: value for key, value in tensors.items()}
    except FusedExpertsError as error:
        raise ExportError(str(error)) from None

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shards = ShardWriter(staging, max_shard_bytes)
        for key in sorted(tensors):
            shards.add({key: tensors[key]})
        shards.finish()
        write_metadata(staging, config, dtype, writer, qm.recipe, ignored_linears(tree, quantized, names), tokenizer,
                       getattr(tree, "generation_config", None))
        swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def module_tensors(tree: nn.Module, writer,
                   dtype: torch.dtype) -> tuple[dict[str, Tensor], dict[str, QuantizedLinear]]:
    """The tensors of `tree` as the format `writer` stores them: each `QuantizedLinear` as the format's tensors, every
    other tensor (KV-cache quantizers aside) cast to `dtype` if floating. Returns them and the quantized linears."""
    tensors: dict[str, Tensor] = {}
    quantized: dict[str, QuantizedLinear] = {}
    for name, module in tree.named_modules():
        if isinstance(module, QuantizedLinear):
            quantized[name] = module
            for key, value in writer.layer_tensors(name, module, dtype).items():
                tensors[f"{name}.{key}"] = value
            if getattr(module, "bias", None) is not None:  # kept in float by every format, under its own name
                tensors[f"{name}.bias"] = module.bias.to(dtype)
    for key, value in tree.state_dict(keep_vars=False).items():
        owner = key.rpartition(".")[0]
        if owner in quantized or owner.endswith("qcompile_kv"):
            continue
        tensors[key] = value.to(dtype) if value.is_floating_point() else value
    return tensors, quantized


def kv_cache_tensors(qm, tree: nn.Module, writer) -> dict[str, Tensor]:
    """The format's KV-cache scales of every attention `qm` quantizes the keys and values of (`tree`: its modules)."""
    reports = {report.name: report for report in getattr(qm, "kv_layers", [])}
    tensors = {}
    for name, module in tree.named_modules():
        quantization = getattr(module, "qcompile_kv", None)
        if quantization is not None:
            tensors.update(writer.kv_cache_tensors(reports[name], quantization))
    return tensors


def _without_tied_copies(tree: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tied parameters (lm_head and the embeddings) are stored once, under the name transformers keeps."""
    tied = set()
    keys = getattr(tree, "_tied_weights_keys", None) or {}
    if getattr(tree.config, "tie_word_embeddings", False):
        tied = set(keys) if isinstance(keys, (list, tuple, set)) else set(keys.keys())
    return {k: v for k, v in tensors.items() if k not in tied}


def ignored_linears(tree: nn.Module, quantized, names: CheckpointNames) -> list[str]:
    """The checkpoint names of the linears of `tree` left in float (not in `quantized`): routers, `lm_head`,
    excluded layers."""
    return sorted(names.module(name) for name, module in tree.named_modules()
                  if isinstance(module, nn.Linear) and name not in quantized)


def write_metadata(directory: Path, config, dtype: torch.dtype, writer, recipe, ignore: list[str], tokenizer=None,
                   generation_config=None) -> None:
    """`config.json` with the format's `quantization_config`, the generation config, the tokenizer's files and the
    format's own files (Model Optimizer's `hf_quant_config.json`). `ignore`: the checkpoint names of the linears
    left in float."""
    config_dict = config.to_dict()
    config_dict["dtype"] = str(dtype).removeprefix("torch.")
    config_dict.pop("torch_dtype", None)
    config_dict["use_cache"] = True
    config_dict["quantization_config"] = writer.quantization_config(recipe, ignore)
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    for file_name, data in getattr(writer, "extra_files", lambda *args: {})(recipe, ignore).items():
        (directory / file_name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
