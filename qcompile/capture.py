"""Capture: an `nn.Module` and example inputs become an FX graph module through torch.export."""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.fx.experimental import _config as fx_config
from torch.utils import _pytree as pytree


def _dynamic_spec(value: Any):
    """Every dimension of every tensor may vary (batch and sequence length differ between calls)."""
    return pytree.tree_map(
        lambda leaf: {d: Dim.AUTO for d in range(leaf.dim())} if isinstance(leaf, torch.Tensor) else None, value
    )


def dynamic_shapes_for(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    spec = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            spec[name] = {k: _dynamic_spec(v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            spec[name] = tuple(_dynamic_spec(v) for v in value)
        else:
            spec[name] = _dynamic_spec(value)
    return spec


def export_program(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """torch.export (non-strict) with every tensor dimension dynamic; `aten.linear` stays undecomposed.

    Size-oblivious reasoning keeps a size-1 example dimension (batch 1 is the usual example) dynamic instead of
    specializing the program to it.
    """
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        return torch.export.export(
            model, tuple(args), dict(kwargs), dynamic_shapes=dynamic_shapes_for(model, args, kwargs), strict=False
        )


def module_tree(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree that shares its tensors, with fused MoE experts as per-expert linears
    (`qcompile.moe`): what is captured, and what `QuantizedModel` later runs for generation. The caller's model
    is never modified."""
    from qcompile.moe import unfuse_experts

    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    tree = copy.deepcopy(model, shared)
    unfuse_experts(tree)
    return tree


@contextlib.contextmanager
def caches_off(model: nn.Module):
    """Hugging Face models return their KV cache (a `DynamicCache` object, not a tensor) unless told otherwise.
    A captured forward computes the whole sequence, so it needs no cache: switch `use_cache` off in every config
    of the model while it is traced (the caller's call may still pass `use_cache` explicitly)."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    saved = []
    for config in configs.values():
        for holder in (config, *(getattr(config, name, None) for name in ("text_config", "decoder", "encoder"))):
            if holder is not None and getattr(holder, "use_cache", None):
                saved.append(holder)
                holder.use_cache = False
    try:
        yield
    finally:
        for holder in saved:
            holder.use_cache = True


def capture(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """The model as a graph module that is called like the model (parameters held as attributes)."""
    was_training = model.training
    model.eval()
    try:
        with caches_off(model):
            program = export_program(model, args, kwargs)
    finally:
        model.train(was_training)
    return program.module()
