"""KV-cache quantization in the model's own code: what the graph's `qcompile::kv_round_trip` nodes compute, done by
the attention modules of the module tree, so that `generate` with a cache reads quantized keys and values.

Hugging Face attention modules compute their keys and values (rotary embeddings applied), store them in the cache
given to them, and hand the cache's keys and values to an attention function looked up by the config's
`_attn_implementation`. Two hooks do what the graph's round trip does, with the same op and scale tensors:

- with a cache, the keys and values are quantized when they are stored (the attention module's `cache.update`
  is wrapped for the duration of its call), so the cache holds quantized values and each token is quantized once;
- without one (or while torch.compile traces, which the instance-level wrapping would not survive), the tree's
  configs name a wrapper of the attention function (registered with transformers as `qcompile_kv_<original>`)
  that quantizes the keys and values it is handed.

The round trip acts on each token alone, so both compute the graph's function. The module each graph node belongs
to is recorded on the node (`qcompile.passes.quantize_kv.KV_ROLE`), so nothing here knows names.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, fx, nn

from qcompile.lowering.cpu.fp8 import fp8_kv_round_trip
from qcompile.passes.quantize_kv import KV_ROLE

_PREFIX = "qcompile_kv_"
_STORED_QUANTIZED = "_qcompile_kv_caches"  # set on an attention module while its cache stores quantized values
_CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "cache", "layer_past")


class KVQuantization(nn.Module):
    """The format and static scales of one attention's keys and values (the graph's own scale tensors)."""

    def __init__(self, fmt: str, key_scale: Tensor, value_scale: Tensor):
        super().__init__()
        self.format = fmt
        self.register_buffer("key_scale", key_scale)
        self.register_buffer("value_scale", value_scale)

    def extra_repr(self) -> str:
        return f"{self.format}, key scale {float(self.key_scale):.4g}, value scale {float(self.value_scale):.4g}"

    def forward(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        # plain operations where the op's dispatch costs more than the rounding (eager CPU decode) and where
        # inductor should fuse the rounding into its kernels (compiled decode)
        # (torch.export keeps the op: saved programs, exports and `_quantization_tensors` find it)
        if self.format == "fp8" and (torch.compiler.is_dynamo_compiling() or not torch.compiler.is_compiling()
                                     and key.device.type == "cpu" and not torch.is_grad_enabled()):
            return fp8_kv_round_trip(key, self.key_scale), fp8_kv_round_trip(value, self.value_scale)
        op = torch.ops.qcompile.kv_round_trip.default
        return op(key, self.key_scale, self.format), op(value, self.value_scale, self.format)


def _eager_function(module: nn.Module):
    """"eager" attention is each model's own function, defined next to its attention module."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise NotImplementedError(f"{type(module).__name__} uses eager attention, which qcompile cannot wrap to "
                                  "quantize its KV cache; load the model with attn_implementation='sdpa'")
    return function


def _register_wrapper(original: str) -> str:
    """Register with transformers an attention function (and its mask) that quantizes keys and values, then calls
    the `original` one; returns its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = _PREFIX + original
    function = ALL_ATTENTION_FUNCTIONS[original] if original != "eager" and original in ALL_ATTENTION_FUNCTIONS \
        else None

    def attention(module, query, key, value, *args, **kwargs):
        quantization = getattr(module, "qcompile_kv", None)
        if quantization is not None and not module.__dict__.get(_STORED_QUANTIZED):
            key, value = quantization(key, value)
        return (function or _eager_function(module))(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(name, attention)
    if original in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[original])
    return name


def install_kv_quantization(tree: nn.Module, gm: fx.GraphModule) -> None:
    """Give each attention module of `tree` the graph's KV round trip (in place)."""
    found: dict[str, dict] = {}
    for node in gm.graph.nodes:
        if KV_ROLE not in node.meta or node.op != "call_function":
            continue
        name, which = node.meta[KV_ROLE]
        _, scale, fmt = node.args
        value = gm
        for part in str(scale.target).split("."):
            value = getattr(value, part)
        found.setdefault(name, {"format": fmt})[which] = value
    if not found:
        return
    modules = dict(tree.named_modules())
    for name, entry in found.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "config"):
            raise NotImplementedError(f"attention {name!r} is not a Hugging Face attention module, whose keys and "
                                      "values qcompile quantizes in the model's own code")
        module.qcompile_kv = KVQuantization(entry["format"], entry["key"], entry["value"])
        module.register_forward_pre_hook(_quantize_on_store, with_kwargs=True)
        module.register_forward_hook(_restore_caches, always_call=True)
    for module in tree.modules():
        config = getattr(module, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if isinstance(current, str) and not current.startswith(_PREFIX):
            config._attn_implementation = _register_wrapper(current)


def _quantize_on_store(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Wrap `update` of the cache handed to the attention module, so that what it stores is quantized."""
    cache = next((kwargs[name] for name in _CACHE_ARGUMENTS if kwargs.get(name) is not None), None)
    if cache is None or torch.compiler.is_compiling() or not hasattr(cache, "update"):
        return
    # an encoder-decoder cache hands its self- and cross-attention caches to the attention
    caches = [cache] + [getattr(cache, name) for name in ("self_attention_cache", "cross_attention_cache")
                        if getattr(cache, name, None) is not None]
    quantization = module.qcompile_kv
    for target in caches:
        original = target.update

        def update(key_states, value_states, *rest, _original=original, **options):
            key_states, value_states = quantization(key_states, value_states)
            return _original(key_states, value_states, *rest, **options)

        target.update = update
    module.__dict__[_STORED_QUANTIZED] = caches


def _restore_caches(module: nn.Module, args: tuple, output) -> None:
    for target in module.__dict__.pop(_STORED_QUANTIZED, ()):
        target.__dict__.pop("update", None)
