"""The CPU forms of a quantized graph that `QuantizedModel` picks from per call (docs/cpu-lowering.md):

- `fused`, what `torch.compile(qm)` traces without freezing: where qcompile's own INT8 kernel runs the layers, a
  GELU or SiLU after an INT8 layer runs in the layer's kernel call (`qcompile.lowering.activation_fusion`) and INT8
  layers that read one tensor share one call (`qcompile.lowering.shared_input`);
- `eager`, what calls without autograd run: the fused graph with the remaining public ops on their autograd-free
  twins (`qcompile::cpu_int8_linear`, ...), which skip the public ops' Python autograd layer (measured ~30 us a
  call, a tenth of a small batch's time);
- `frozen`, what `torch.compile(qm)` traces when inductor freezes: INT8 layers in the pattern inductor prepacks for
  oneDNN (`qcompile.lowering.onednn`).

Each is None where it would equal the graph itself (or, for the first two, where a tensor is off the CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import fx


@dataclass
class CPUGraphs:
    fused: fx.GraphModule | None
    eager: fx.GraphModule | None
    frozen: fx.GraphModule | None


def cpu_graphs(graph_module: fx.GraphModule, copy: Callable[..., fx.GraphModule]) -> CPUGraphs:
    """The variants of `graph_module`; `copy(source=None)` copies a graph (default `graph_module`'s) over
    `graph_module`'s tensors."""
    from qcompile.lowering import cpu, onednn
    from qcompile.lowering.activation_fusion import fuse_int8_activations
    from qcompile.lowering.shared_input import merge_shared_input_int8_linears

    frozen = copy()
    frozen = frozen if onednn.rewrite_int8_linears(frozen) else None
    fused = eager = None
    tensors = [*graph_module.parameters(), *graph_module.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        fused = copy()
        changed = fuse_int8_activations(fused) + merge_shared_input_int8_linears(fused)
        fused = fused if changed else None
        eager, twins = copy(fused), cpu.kernel_call_ops()
        calls = [node for node in eager.graph.nodes if node.op == "call_function" and node.target in twins]
        for node in calls:
            node.target = twins[node.target]
        eager.recompile()
        eager = eager if changed or calls else None
    return CPUGraphs(fused, eager, frozen)


__all__ = ["CPUGraphs", "cpu_graphs"]
