"""Write each site's current float weight back into the graph as a plain `aten.linear`.

Scale-migrating passes (SmoothQuant, AWQ) change `LinearSite.weight` and the graph around it; materializing the
weights gives the float graph they imply, which must compute what the original graph computed.
"""

from __future__ import annotations

import torch
from torch import fx

from qcompile.passes.find_linears import LinearSite, refresh_input


def materialize_weights(gm: fx.GraphModule, sites: list[LinearSite]) -> fx.GraphModule:
    for index, site in enumerate(sites):
        refresh_input(site)
        name = f"_qc_float_weight_{index}"
        gm.register_buffer(name, site.weight.detach().contiguous())
        with gm.graph.inserting_before(site.node):
            weight = gm.graph.get_attr(name)
            linear = gm.graph.call_function(torch.ops.aten.linear.default, (site.input, weight, site.bias))
        linear.meta.update({k: v for k, v in site.node.meta.items() if k in ("val", "example_value", "tensor_meta")})
        site.node.replace_all_uses_with(linear)
        gm.graph.erase_node(site.node)
        site.node, site.weight_node = linear, weight
    gm.graph.lint()
    gm.recompile()
    return gm
