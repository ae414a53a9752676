"""KV-cache quantization in the graph: observe the keys and values of each attention, then route them through the
cache's format (`qcompile::kv_round_trip`) with the calibrated static scales.

The round trip acts on each token's elements alone (FP8: one scale for the tensor; NVFP4: blocks of 16 along the
head dimension under one static global scale), so quantizing what the attention reads is the same as quantizing
each token once when it is stored: the graph computes what generation with a quantized cache computes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, fx, nn

from qcompile import numerics
from qcompile.passes.find_attention import AttentionSite, example_value, stored_elements_per_token
from qcompile.passes.insert_observers import remove_observers

OBSERVER_PREFIX = "_qcompile_kv_observer_"
# Node meta of each inserted round trip: (attention module name, "key" | "value").
KV_ROLE = "qcompile_kv_role"
ELEMENT_BITS = {"fp8": 8.0, "nvfp4": 4.0 + 8.0 / 16}  # NVFP4: one FP8 scale per 16 elements


class AmaxObserver(nn.Module):
    """max |x| over the calibration batches."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.amax: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"calibration data gives NaN or inf in the {self.what}; check the calibration batches")
            amax = x.detach().abs().amax().float() if x.numel() else torch.zeros(())
            self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        return x


@dataclass
class KVReport:
    """One attention's quantized keys and values, for `report()` and `save()`."""

    name: str
    format: str
    key_scale: float
    value_scale: float
    elements_per_token: int  # keys and values together, as stored (grouped heads not repeated); 0 if unknown
    key_projection: str = ""  # the linear layers that compute the keys and the values ("" if none was found)
    value_projection: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> KVReport:
        return cls(**data)

    def bytes_per_token(self, float_bytes: int) -> tuple[float, float]:
        """(bytes per token in `float_bytes`-byte floats, bytes per token in the format)."""
        return self.elements_per_token * float_bytes, self.elements_per_token * ELEMENT_BITS[self.format] / 8


def _route(gm: fx.GraphModule, site: AttentionSite, make) -> None:
    """Put `make(which, source)` between the attention and its keys, and its values."""
    for which, (reader, position) in (("key", site.key_use), ("value", site.value_use)):
        source = reader.args[position]
        with gm.graph.inserting_before(reader):
            node = make(which, source)
        node.meta.update({k: v for k, v in source.meta.items()
                          if k in ("val", "example_value", "tensor_meta", "nn_module_stack")})
        node.meta[KV_ROLE] = (site.name, which)
        args = list(reader.args)
        args[position] = node
        reader.args = tuple(args)


def insert_kv_observers(gm: fx.GraphModule, sites: list[AttentionSite]) -> dict[tuple[str, str], AmaxObserver]:
    """Route each attention's keys and values through an observer; returns them by (attention, "key" | "value")."""
    observers = {}

    def make(index):
        def build(which, source):
            observer = AmaxObserver(f"{which}s of attention {sites[index].name!r}")
            target = f"{OBSERVER_PREFIX}{index}_{which}"
            gm.add_submodule(target, observer)
            observers[(sites[index].name, which)] = observer
            return gm.graph.call_module(target, (source,))
        return build

    for index, site in enumerate(sites):
        _route(gm, site, make(index))
    gm.recompile()
    return observers


def remove_kv_observers(gm: fx.GraphModule) -> None:
    remove_observers(gm, OBSERVER_PREFIX)


def quantize_kv(gm: fx.GraphModule, sites: list[AttentionSite], fmt: str,
                amax: dict[tuple[str, str], Tensor]) -> list[KVReport]:
    """Route each attention's keys and values through `qcompile::kv_round_trip` with the scales of their
    calibrated `amax`; the scales become buffers of `gm`. Returns one report per attention."""
    from qcompile.passes.find_linears import find_linears

    linears = {site.node: site.name for site in find_linears(gm)}
    reports = []
    for index, site in enumerate(sites):
        scales = {}

        def build(which, source, index=index, site=site, scales=scales):
            # Engines keep these scales in a bf16/fp16 model's dtype: round them first, so nothing changes on load.
            dtype = getattr(example_value(source), "dtype", None)
            scale = numerics.rounded_scale(numerics.kv_cache_scale(amax[(site.name, which)], fmt),
                                           dtype if dtype in (torch.bfloat16, torch.float16) else None)
            scales[which] = scale
            target = f"_qcompile_kv_{index}_{which}_scale"
            gm.register_buffer(target, scale)
            scale_node = gm.graph.get_attr(target)
            return gm.graph.call_function(torch.ops.qcompile.kv_round_trip.default, (source, scale_node, fmt))

        per_token = [stored_elements_per_token(site, which) for which in ("key", "value")]
        projections = [_projection(node, linears) for node in (site.key, site.value)]
        _route(gm, site, build)
        reports.append(KVReport(site.name, fmt, float(scales["key"]), float(scales["value"]),
                                sum(per_token) if None not in per_token else 0, *projections))
    gm.recompile()
    return reports


def _projection(node: fx.Node, linears: dict[fx.Node, str]) -> str:
    """The linear layer nearest above `node` (the key or value projection), by breadth-first search; `linears`
    names the graph's unquantized linears."""
    from qcompile.passes.quantize_linears import LAYER_NAME

    queue, seen = [node], set()
    while queue and len(seen) < 64:
        current = queue.pop(0)
        if current in seen:
            continue
        seen.add(current)
        if LAYER_NAME in current.meta:
            return current.meta[LAYER_NAME]
        if current in linears:
            return linears[current]
        queue.extend(current.all_input_nodes)
    return ""
