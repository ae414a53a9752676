"""Capture: an `nn.Module` and example inputs become an FX graph module through torch.export."""

from __future__ import annotations

import inspect
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


def capture(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """The model as a graph module that is called like the model (parameters held as attributes)."""
    was_training = model.training
    model.eval()
    try:
        program = export_program(model, args, kwargs)
    finally:
        model.train(was_training)
    return program.module()
