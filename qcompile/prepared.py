"""`PreparedModel`: a captured model with observers on the inputs of its targeted linears, between
`qcompile.prepare` and `qcompile.convert`. Calling it runs a calibration batch in float and records statistics."""

from __future__ import annotations

import torch
from torch import fx, nn

from qcompile.calibration import describe_call


class PreparedModel(nn.Module):
    def __init__(self, graph: fx.GraphModule, tree: nn.Module, layers: list[str], recipe, example: tuple[tuple, dict],
                 observers: dict, float_bytes: int):
        super().__init__()
        self.graph_module = graph
        self.tree = tree
        # the targeted linears by name (convert finds them again in the graph: a copy of this model holds no node
        # of another graph)
        self.layers = list(layers)
        self.recipe = recipe
        self.example = example
        self.observers = observers
        self.float_bytes = float_bytes
        self.batches_seen = 0
        # the KV cache is calibrated after conversion (the algorithms fold scales into value projections): the
        # batches seen here run again through the converted graph
        self.kept_batches: list[tuple[tuple, dict]] = []
        self.converted = False

    @property
    def expected_call(self) -> str:
        return describe_call(*self.example)

    def forward(self, *args, **kwargs):
        if self.converted:
            raise RuntimeError("this PreparedModel was converted (qcompile.convert): call the QuantizedModel it "
                               "returned")
        if self.recipe.kv_cache is not None:
            self.kept_batches.append((args, kwargs))
        with torch.no_grad():
            out = self.graph_module(*args, **kwargs)
        self.batches_seen += 1
        return out

    def extra_repr(self) -> str:
        return (f"recipe={self.recipe.name!r}, layers={len(self.layers)}, observed={len(self.observers)}, "
                f"batches_seen={self.batches_seen}")


__all__ = ["PreparedModel"]
