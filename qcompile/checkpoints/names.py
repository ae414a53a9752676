"""The names a Hugging Face checkpoint gives a model's tensors, and the model's names for them.

transformers 5 converts some checkpoint tensors while loading and converts them back while saving (its "conversion
mapping"): per-expert MoE weights (`...experts.<e>.w1.weight`, or `gate_proj`/`up_proj`/`down_proj`) become fused 3-D
parameters (`...experts.gate_up_proj`), and some modules are renamed (Mixtral's `block_sparse_moe` is `mlp` in the
model). Serving engines read the checkpoint's names, one tensor per expert projection, which is also how qcompile
quantizes experts (`qcompile.moe`). Both directions here ask transformers' own mapping, so every architecture it
knows is named as its checkpoints are:

- `CheckpointNames(model).of(keys)`: the checkpoint name of each tensor of a quantized module tree (experts unfused),
  found by letting transformers save a small probe state dict whose values identify where each tensor went;
- `load_plan(model, checkpoint_keys)`: for each model tensor, the checkpoint tensors it is made of and the converter
  that combines them (used by streaming, which loads one layer at a time without `from_pretrained`).

Without transformers' mapping (older versions, non-transformers models) names are unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor, nn


def _conversions():
    try:
        from transformers import core_model_loading as loading
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return None, None
    return loading, get_model_conversion_mapping


class FusedExpertsError(ValueError):
    """The model's checkpoints store its experts fused, which the quantized formats cannot hold."""


class CheckpointNames:
    """Model tensor names → checkpoint tensor names, for the transformers model `model` whose module tree (or part of
    it, under the same names) is `tree`. Experts are named per expert projection (`<experts>.<e>.gate_proj`, as
    `qcompile.moe.UnfusedExperts` names them), whether `tree` holds them fused or unfused."""

    def __init__(self, model: nn.Module, tree: nn.Module | None = None):
        from qcompile.moe import UnfusedExperts, is_fused_experts

        self.model, self.tree = model, model if tree is None else tree
        self.experts = [name for name, m in self.tree.named_modules()
                        if isinstance(m, UnfusedExperts) or is_fused_experts(m)]
        self._modules: dict[str, str] = {}  # module name → checkpoint module name, resolved on demand

    def of(self, keys: Iterable[str]) -> dict[str, str]:
        """The checkpoint name of each of `keys` (module path + tensor name)."""
        keys = list(keys)
        owners = {key.rpartition(".")[0] for key in keys}
        self._resolve(owner for owner in owners if owner not in self._modules)
        names = {}
        for key in keys:
            owner, _, leaf = key.rpartition(".")
            names[key] = f"{self._modules[owner]}.{leaf}" if owner else key
        return names

    def module(self, name: str) -> str:
        """The checkpoint name of module `name` (e.g. for a format's list of unquantized layers)."""
        self._resolve([name] if name not in self._modules else [])
        return self._modules[name]

    def _resolve(self, owners: Iterable[str]) -> None:
        owners = sorted(set(owners))
        if not owners:
            return
        loading, _ = _conversions()
        expert_owners = {owner: experts for owner in owners
                         if (experts := next((m for m in self.experts if owner.startswith(m + ".")), None))}
        plain = [owner for owner in owners if owner not in expert_owners]
        if loading is None or not hasattr(self.model, "config"):
            self._modules.update((owner, owner) for owner in owners)
            return
        # each module is probed through one tensor, `<module>.weight`, holding a code that says which module it is
        probe: dict[str, Tensor] = {}
        codes: dict[int, str] = {}
        for owner in plain:
            codes[len(codes)] = owner
            probe[f"{owner}.weight"] = torch.tensor([len(codes) - 1])
        fused = set()
        for experts in sorted(set(expert_owners.values())):
            fused_tensors = self._expert_probe(experts, codes)
            probe.update(fused_tensors)
            fused.update(fused_tensors)
        saved = loading.revert_weight_conversion(self.model, probe)
        for name, value in saved.items():
            if name in fused:  # saved as it is: no converter splits it
                raise FusedExpertsError(
                    f"{name.rpartition('.')[0]}: checkpoints of {type(self.model).__name__} keep MoE experts fused "
                    f"({name}); the quantized formats hold one tensor per expert projection")
            for code in value.flatten().tolist():
                self._modules[codes[code]] = name.removesuffix(".weight")
        missing = [owner for owner in owners if owner not in self._modules]
        if missing:
            raise RuntimeError(f"no checkpoint name found for {missing[:3]}")

    def _expert_probe(self, experts: str, codes: dict[int, str]) -> dict[str, Tensor]:
        """The fused 3-D tensors of experts module `experts`, one element per expert projection, each holding the code
        of that projection's module (`<experts>.<e>.gate_proj`); saving splits them into the checkpoint's tensors."""
        from qcompile.moe import fused_layout

        count, has_gate, transposed = fused_layout(self.tree.get_submodule(experts))
        probe = {}
        parts = (("gate_up_proj", ("gate_proj", "up_proj")),) if has_gate else (("up_proj", ("up_proj",)),)
        for fused, projections in (*parts, ("down_proj", ("down_proj",))):
            values = torch.empty(count, len(projections), dtype=torch.int64)
            for e in range(count):
                for j, projection in enumerate(projections):
                    values[e, j] = len(codes)
                    codes[len(codes)] = f"{experts}.{e}.{projection}"
            # the fused layout: [E, out, in] with out = the projections' outputs side by side (one row each here)
            values = values[:, :, None]
            probe[f"{experts}.{fused}"] = values.transpose(1, 2).contiguous() if transposed else values
        return probe


@dataclasses.dataclass
class Source:
    """The checkpoint tensors one model tensor is made of: a single tensor, or several combined by `converter`."""

    keys: list[str]
    patterns: list[str | None]
    converter: object | None = None

    def combine(self, target: str, tensors: dict[str, Tensor], model: nn.Module) -> Tensor:
        """Model tensor `target` from its checkpoint tensors (`tensors`, read by the caller)."""
        if self.converter is None:
            return tensors[self.keys[0]]
        converter = copy.deepcopy(self.converter)  # a fresh one collects this tensor's sources only
        for key, pattern in zip(self.keys, self.patterns):
            converter.add_tensor(target, key, pattern, lambda key=key: tensors[key])
        return converter.convert(target, model=model, config=getattr(model, "config", None))[target]


def load_plan(model: nn.Module, checkpoint_keys: Iterable[str]) -> dict[str, Source]:
    """For each tensor name of `model` (a transformers model, possibly on the meta device) that the checkpoint's
    tensors `checkpoint_keys` give, where to find it."""
    loading, get_mapping = _conversions()
    keys = sorted(checkpoint_keys, key=loading.dot_natural_key if loading else None)
    if loading is None or not hasattr(model, "config"):
        return {key: Source([key], [None]) for key in keys}
    transforms = get_mapping(model)
    renamings = [t for t in transforms if isinstance(t, loading.WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, loading.WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    expected = model.state_dict()
    plan: dict[str, Source] = {}
    for key in keys:
        target, pattern = loading.rename_source_key(key, renamings, converters, getattr(model, "base_model_prefix", None),
                                                    expected)
        source = plan.setdefault(target, Source([], [], by_pattern.get(pattern)))
        source.keys.append(key)
        source.patterns.append(pattern)
    return plan
