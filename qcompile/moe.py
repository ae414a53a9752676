"""Mixture-of-experts layers whose experts are fused 3-D tensors, as per-expert linears that qcompile can quantize.

transformers 5 stores a layer's experts as two 3-D parameters (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`,
possibly transposed, interleaved or with biases) and runs them with batched or grouped matrix products, which are
not linear layers. `unfuse_experts` swaps each such module for an `UnfusedExperts` whose experts are `nn.Linear`
layers over views of the same storage (no copy), run the way transformers' own reference loop runs them: each
expert on the tokens routed to it, weighted, summed in expert order. Every expert then calibrates on exactly its
own tokens and becomes one quantized layer per projection.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module: 3-D expert weights and an expert count."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    return (isinstance(down, nn.Parameter) and isinstance(up, nn.Parameter) and down.dim() == 3 and up.dim() == 3
            and isinstance(getattr(module, "num_experts", None), int))


def fused_layout(module: nn.Module) -> tuple[int, bool, bool]:
    """(experts, whether a gate projection is fused with the up projection, whether weights are stored [in, out])
    of a fused experts module or of the `UnfusedExperts` that replaced one."""
    if isinstance(module, UnfusedExperts):
        return module.num_experts, module[0].has_gate, module[0].transposed
    has_gate = bool(getattr(module, "has_gate", hasattr(module, "gate_up_proj")))
    return module.num_experts, has_gate, bool(getattr(module, "is_transposed", False))


def _linear(weight: Tensor, bias: Tensor | None, transposed: bool) -> nn.Linear:
    weight = weight.t() if transposed else weight  # transposed storage is [in, out]
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


class ExpertMLP(nn.Module):
    """One expert: `down(gate(act(gate_proj x), up_proj x))`, with the fused module's own gating function."""

    def __init__(self, fused: nn.Module, index: int, gating: nn.Module):
        super().__init__()
        transposed = self.transposed = bool(getattr(fused, "is_transposed", False))
        has_gate = bool(getattr(fused, "has_gate", hasattr(fused, "gate_up_proj")))
        bias = bool(getattr(fused, "has_bias", False))
        self.interleaved = not bool(getattr(fused, "is_concatenated", True))
        self.has_gate = has_gate
        up_name = "gate_up_proj" if has_gate else "up_proj"
        up = getattr(fused, up_name).detach()[index]
        up_bias = getattr(fused, f"{up_name}_bias").detach()[index] if bias else None
        if has_gate:
            out_dim = -1 if transposed else 0
            half = up.shape[out_dim] // 2
            parts = ([up.narrow(out_dim, 0, half), up.narrow(out_dim, half, half)] if not self.interleaved else
                     [up[..., 0::2] if transposed else up[0::2], up[..., 1::2] if transposed else up[1::2]])
            bias_parts = [None, None] if up_bias is None else (
                [up_bias[:half], up_bias[half:]] if not self.interleaved else [up_bias[0::2], up_bias[1::2]])
            self.gate_proj = _linear(parts[0], bias_parts[0], transposed)
            self.up_proj = _linear(parts[1], bias_parts[1], transposed)
        else:
            self.up_proj = _linear(up, up_bias, transposed)
        down_bias = fused.down_proj_bias.detach()[index] if bias else None
        self.down_proj = _linear(fused.down_proj.detach()[index], down_bias, transposed)
        # the fused module's gating (act(gate) * up by default; some models clamp or add): called on the
        # gate/up halves put back in the fused layout, so any gating function of the model is kept exactly
        object.__setattr__(self, "_gating", gating)

    def forward(self, x: Tensor) -> Tensor:
        fused = self._gating
        if self.has_gate:
            gate, up = self.gate_proj(x), self.up_proj(x)
            if self.interleaved:
                joined = torch.stack((gate, up), dim=-1).flatten(-2)
            else:
                joined = torch.cat((gate, up), dim=-1)
            hidden = fused._apply_gate(joined) if hasattr(fused, "_apply_gate") else fused.act_fn(gate) * up
        else:
            hidden = fused.act_fn(self.up_proj(x))
        out = self.down_proj(hidden)
        if getattr(fused, "has_post_expert_norm", False):
            out = fused.post_expert_norm(out)
        return out


class UnfusedExperts(nn.Module):
    """Drop-in for a fused experts module: same call `(hidden_states [T, H], top_k_index [T, k], top_k_weights)`."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.num_experts = fused.num_experts
        # the fused module without its 3-D weights (attributes and submodules such as act_fn shared), so that
        # the float expert weights are not kept alive once the experts are quantized
        gating = copy.copy(fused)
        gating._parameters, gating._buffers = {}, {}
        # children named 0..E-1, so that layers are named `...experts.<e>.gate_proj` as in per-expert checkpoints
        for e in range(fused.num_experts):
            self.add_module(str(e), ExpertMLP(fused, e, gating))

    def __getitem__(self, index: int) -> ExpertMLP:
        return self.get_submodule(str(index))

    def __len__(self) -> int:
        return self.num_experts

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for index in range(self.num_experts):
            expert = self[index]
            # every expert runs on its tokens (possibly none): no data-dependent loop, so the graph captures
            token, slot = torch.where(top_k_index == index)
            routed = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, routed.to(out.dtype))
        return out


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module of `model` in place; returns their names."""
    names = []
    for name, module in list(model.named_modules()):
        if name and is_fused_experts(module):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, UnfusedExperts(module))
            names.append(name)
    return names
