"""Insert activation observers in front of the linears that need calibration, and take them out again."""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from qcompile.passes.find_linears import LinearSite

OBSERVER_PREFIX = "_qcompile_observer_"


class ActivationObserver(nn.Module):
    """Records the running max of |x| over calibration batches, per tensor and per input channel.

    The per-channel statistic is what SmoothQuant and AWQ read; the per-tensor one gives static scales.
    """

    def __init__(self, layer_name: str):
        super().__init__()
        self.layer_name = layer_name
        self.amax: Tensor | None = None
        self.channel_amax: Tensor | None = None
        self.batches = 0

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            flat = x.detach().float().reshape(-1, x.shape[-1])
            if not torch.isfinite(flat).all():
                raise ValueError(
                    f"calibration data gives NaN or inf in the input of layer {self.layer_name!r}; "
                    "check the calibration batches (and the model's float output on them)"
                )
            channel_amax = flat.abs().amax(dim=0) if flat.numel() else flat.new_zeros(x.shape[-1])
            if self.channel_amax is None:
                self.channel_amax = channel_amax
            else:
                self.channel_amax = torch.maximum(self.channel_amax, channel_amax.to(self.channel_amax.device))
            self.amax = self.channel_amax.amax()
            self.batches += 1
        return x


def insert_observers(gm: fx.GraphModule, sites: list[LinearSite]) -> dict[str, ActivationObserver]:
    """Route the input of each site through an observer submodule; returns observers by layer name."""
    observers = {}
    for index, site in enumerate(sites):
        observer = ActivationObserver(site.name)
        target = f"{OBSERVER_PREFIX}{index}"
        gm.add_submodule(target, observer)
        with gm.graph.inserting_before(site.node):
            observed = gm.graph.call_module(target, (site.input,))
        observed.meta.update(site.input.meta)
        site.node.replace_input_with(site.input, observed)
        observers[site.name] = observer
    gm.recompile()
    return observers


def remove_observers(gm: fx.GraphModule) -> None:
    """Undo `insert_observers`: every observer node is replaced by its input."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(OBSERVER_PREFIX):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
    gm.recompile()
