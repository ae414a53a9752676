"""Rewrite each targeted linear into a `qcompile::` op whose quantized weight lives in the graph module."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, fx

from qcompile import formats, numerics
from qcompile.passes.find_linears import LinearSite, refresh_input, shared_input_groups
from qcompile.recipes import QuantSpec, Recipe

# Node metadata: the name of the layer (module path) a quantized op node replaced.
LAYER_NAME = "qcompile_layer"


@dataclass
class LayerReport:
    """What happened to one layer; `report()` prints these and `save()` stores them."""

    name: str
    weight_format: str
    input_format: str
    out_features: int
    in_features: int
    weight_bytes: int
    weight_sqnr_db: float
    calibration: str = ""  # how the layer was calibrated, where it differs from the recipe's algorithm

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_bytes / (self.out_features * self.in_features)

    def to_json(self) -> dict:
        data = asdict(self)
        data["weight_sqnr_db"] = None if math.isinf(self.weight_sqnr_db) else self.weight_sqnr_db
        return data

    @classmethod
    def from_json(cls, data: dict) -> LayerReport:
        data = dict(data)
        if data["weight_sqnr_db"] is None:
            data["weight_sqnr_db"] = math.inf
        return cls(**data)


def describe(spec: QuantSpec | None) -> str:
    if spec is None:
        return "-"
    parts = [spec.format, spec.granularity]
    if spec.granularity in ("group", "block"):
        size = spec.block_size
        parts.append("x".join(map(str, size)) if isinstance(size, tuple) else str(size))
    if not spec.symmetric:
        parts.append("asym")
    if spec.dynamic:
        parts.append("dynamic")
    return " ".join(parts)


def static_input_scale(fmt: str, amax: Tensor) -> Tensor:
    """Static activation scale from a calibrated amax (for nvfp4: the global scale); 1.0 where amax is 0."""
    amax = amax.detach().float().reshape(())
    scale = numerics.exact_div(amax, formats.FORMATS[fmt].static_divisor)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def shares_weight_scale(spec: QuantSpec, through_fp8: bool = False) -> bool:
    """Formats with one scale for the whole weight (FP8/INT8 per tensor, NVFP4's global scale, W4A8's FP8 scale):
    engines that run layers reading one input as one GEMM (q/k/v, gate/up) keep one such scale for the group."""
    return through_fp8 or formats.FORMATS[spec.format].shared_tensor_scale(spec.granularity)


def group_weight_amax(sites: list[LinearSite], spec: QuantSpec, through_fp8: bool = False) -> dict[str, Tensor]:
    """{layer name: the largest |w| over its shared-input group}, for formats that share the weight's scale."""
    if not shares_weight_scale(spec, through_fp8):
        return {}
    shared = {}
    for group in shared_input_groups(sites):
        # max(|min|, |max|): the same value as abs().amax() without a copy of the weight
        amax = torch.stack([torch.maximum(w.amin().abs(), w.amax().abs()).float()
                            for w in (site.weight.detach() for site in group)]).amax()
        shared.update({site.name: amax for site in group})
    return shared


def _quantize_weight(weight: Tensor, spec: QuantSpec, model_dtype: torch.dtype | None = None,
                     group_amax: Tensor | None = None, through_fp8: bool = False
                     ) -> tuple[dict[str, Tensor], dict, Tensor]:
    """Quantized tensors to store, the op's integer arguments, and the dequantized weight (for SQNR).
    `model_dtype`: the dtype the layer's weight had in the model (default: `weight`'s; algorithms hand float32).
    `group_amax`: for per-tensor scales, the amax they are computed from (the layer's fused group's).
    `through_fp8`: W4A8's integer weights, rounded through FP8 (`formats.weights_through_fp8`)."""
    model_dtype = weight.dtype if model_dtype is None else model_dtype
    fmt = formats.get(spec.format)
    if spec.granularity not in fmt.weight_granularities and fmt.fixed_block is None:
        raise NotImplementedError(f"{spec.format} weights are quantized per {' or '.join(fmt.weight_granularities)}, "
                                  f"not per {spec.granularity!r}")
    return fmt.quantize_weight(weight, spec, model_dtype, group_amax, through_fp8)


# rows of a weight quantized at a time when converting: the formats' float32 temporaries then stay near 2M elements
# (a few tens of MB) instead of several copies of the whole weight (docs/streaming.md#memory)
CHUNK_ELEMENTS = 2**21


def quantize_weight_in_chunks(weight: Tensor, spec: QuantSpec, model_dtype: torch.dtype | None = None,
                              group_amax: Tensor | None = None, through_fp8: bool = False
                              ) -> tuple[dict[str, Tensor], dict, float]:
    """`_quantize_weight` a block of rows at a time, with the weight's SQNR in dB instead of its dequantized copy.

    Every format quantizes rows independently once its per-tensor amax is fixed (`group_amax`), so the stored
    tensors equal the whole weight's bit for bit: per-row tensors (codes, channel/group/block scales) are joined
    along rows, per-tensor ones are the same in every block. Weights whose per-tensor scale is not given, and
    small ones, are quantized whole."""
    fmt = formats.FORMATS[spec.format]
    needs_amax = fmt.shared_tensor_scale(spec.granularity) or through_fp8
    rows, cols = (weight.shape[0], weight[0].numel()) if weight.dim() >= 2 else (1, weight.numel())
    block_rows = 1
    if spec.granularity == "block" and fmt.fixed_block is None:  # square FP8 blocks span rows
        size = spec.block_size
        block_rows = size[0] if isinstance(size, tuple) else int(size)
    step = max(block_rows, CHUNK_ELEMENTS // max(cols, 1) // block_rows * block_rows)
    if weight.dim() < 2 or rows <= step or (needs_amax and group_amax is None):
        tensors, int_args, dequantized = _quantize_weight(weight, spec, model_dtype, group_amax, through_fp8)
        return tensors, int_args, sqnr_db(weight, dequantized)
    model_dtype = weight.dtype if model_dtype is None else model_dtype
    parts: dict[str, list[Tensor]] = {}
    whole: dict[str, Tensor] = {}
    signal = noise = 0.0
    int_args = {}
    for start in range(0, rows, step):
        chunk = weight[start:start + step]
        tensors, int_args, dequantized = _quantize_weight(chunk, spec, model_dtype, group_amax, through_fp8)
        per_row = {chunk.shape[0], -(-chunk.shape[0] // block_rows)}
        for key, value in tensors.items():
            if key in whole or (start == 0 and (value.dim() == 0 or value.shape[0] not in per_row)):
                if key in whole and not torch.equal(whole[key], value):
                    raise AssertionError(f"per-tensor {key!r} differs between row blocks")
                whole[key] = value
            else:
                parts.setdefault(key, []).append(value)
        chunk_signal, chunk_noise = _squared_sums(chunk, dequantized)
        signal, noise = signal + chunk_signal, noise + chunk_noise
        del dequantized
    tensors = {key: whole[key] if key in whole else torch.cat(parts[key]) for key in tensors}
    return tensors, int_args, _db(signal, noise)


def fake_quantize_weight(weight: Tensor, spec: QuantSpec, through_fp8: bool = False) -> Tensor:
    """The weight as the recipe stores it, dequantized to float32 (for the algorithms' error searches).

    Symmetric INT4/INT3 groups and NVFP4 take a direct path that skips packing the codes into nibbles and
    unpacking them again (the searches call this hundreds of times per layer); it gives the same float32 values
    bit for bit (tests/test_algorithms.py checks it against the stored path)."""
    if spec.format in ("int4", "int3") and spec.granularity == "group" and spec.symmetric and weight.dim() == 2:
        dequantized = _fake_quantize_int_groups(weight, int(spec.block_size), spec.bits)
        if through_fp8:  # as numerics.dequantize_int4 with fp8_scale=amax(w)/448
            scale = numerics.nonzero_scale(numerics.exact_div(weight.detach().float().abs().amax(), numerics.FP8_E4M3_MAX))
            dequantized = (dequantized / scale).clamp(-numerics.FP8_E4M3_MAX, numerics.FP8_E4M3_MAX).to(
                torch.float8_e4m3fn).to(torch.float32) * scale
        return dequantized
    if spec.format == "nvfp4" and weight.dim() >= 1:
        return _fake_quantize_nvfp4(weight)
    return _quantize_weight(weight, spec, through_fp8=through_fp8)[2]


def grouped_padded(w: Tensor, group: int) -> Tensor:
    """[O, I] -> [O, G, group], zero-padded along I (the layout quantize_int4 and quantize_nvfp4 use)."""
    rows, cols = w.shape
    padded = -(-cols // group) * group
    if padded != cols:
        w = torch.nn.functional.pad(w, (0, padded - cols))
    return w.reshape(rows, padded // group, group)


def _fake_quantize_int_groups(weight: Tensor, group: int, bits: int) -> Tensor:
    """numerics.dequantize_int4(numerics.quantize_int4(w, group, symmetric=True, bits)) without the packing."""
    w = weight.detach().float()
    numerics.check_finite(w, "weight to quantize_int4")
    qmax = float(2 ** (bits - 1) - 1)
    groups = grouped_padded(w, group)
    scale = numerics.exact_div(groups.abs().amax(dim=-1, keepdim=True), qmax)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    if weight.dtype in (torch.bfloat16, torch.float16):  # as numerics.quantize_int4(..., scale_dtype=weight.dtype)
        scale = numerics.rounded_scale(scale, weight.dtype)
    q = torch.clamp(torch.round(groups / scale), -qmax - 1, qmax) + 0.0  # + 0.0: -0 codes are stored as +0
    return (q * scale).reshape(w.shape[0], -1)[:, : w.shape[1]]


def _fake_quantize_nvfp4(x: Tensor, global_scale: Tensor | None = None) -> Tensor:
    """numerics.dequantize_nvfp4(numerics.quantize_nvfp4(x, 16, global_scale)) without the packing, along the last
    axis, with E2M1 rounding done arithmetically: steps of 0.5 below 2, of 1 below 4, of 2 up to 6, each with
    ties to even (torch.round), which is the table rounding of docs/formats.md#e2m1-values."""
    v = x.detach().float()
    numerics.check_finite(v, "tensor to quantize_nvfp4")
    if global_scale is None:
        amax = v.abs().amax() if v.numel() else torch.zeros((), device=v.device)
        gs = numerics.exact_div(amax, numerics.E2M1_MAX * numerics.FP8_E4M3_MAX)
    else:
        gs = torch.as_tensor(global_scale, dtype=torch.float32).reshape(())
    gs = torch.where(gs == 0, torch.ones_like(gs), gs)
    lead, cols = v.shape[:-1], v.shape[-1]
    padded = -(-cols // 16) * 16
    if padded != cols:
        v = torch.nn.functional.pad(v, (0, padded - cols))
    blocks = v.reshape(*lead, padded // 16, 16)
    s = blocks.abs().amax(dim=-1) / (numerics.E2M1_MAX * gs)
    s = torch.where(s == 0, torch.ones_like(s), s)
    block_scale = torch.clamp(s, max=numerics.FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    denom = (block_scale * gs).unsqueeze(-1)
    underflow = denom == 0
    scaled = blocks / torch.where(underflow, torch.ones_like(denom), denom)
    a = scaled.abs()
    magnitude = torch.where(a < 2.0, torch.round(a * 2.0) * 0.5, torch.where(a < 4.0, torch.round(a), torch.round(a * 0.5) * 2.0))
    values = torch.copysign(magnitude.clamp(max=numerics.E2M1_MAX), scaled)
    values = torch.where(underflow, torch.zeros_like(values), values)
    return (values * denom).reshape(*lead, padded)[..., :cols]


def fake_quantize_input_nvfp4(x: Tensor, global_scale: Tensor) -> Tensor:
    """numerics.fake_quantize(x, "nvfp4", ..., scale=global_scale) in float32, for the algorithms' searches."""
    return _fake_quantize_nvfp4(x, global_scale)


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """10 log10(sum reference^2 / sum (reference - approx)^2), in float64, a block of elements at a time."""
    reference, approx = reference.detach().reshape(-1), approx.detach().reshape(-1)
    signal = noise = 0.0
    for start in range(0, reference.numel(), CHUNK_ELEMENTS):
        block_signal, block_noise = _squared_sums(reference[start : start + CHUNK_ELEMENTS],
                                                  approx[start : start + CHUNK_ELEMENTS])
        signal, noise = signal + block_signal, noise + block_noise
    return _db(signal, noise)


def sqnr_db_by_rows(reference: Tensor, approx_rows: Callable[[int, int], Tensor]) -> float:
    """`sqnr_db(reference, approx)` for a 2-D `reference`, where `approx_rows(first, last)` gives rows first..last-1
    of the approximation: summed over the same blocks of elements as `sqnr_db`, so the same number bit for bit,
    with one block's rows in memory instead of the whole approximation."""
    reference = reference.detach()
    cols = max(reference.shape[1], 1)
    flat = reference.reshape(-1)
    signal = noise = 0.0
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        end = min(start + CHUNK_ELEMENTS, flat.numel())
        first, last = start // cols, -(-end // cols)
        approx = approx_rows(first, last).detach().reshape(-1)[start - first * cols : end - first * cols]
        block_signal, block_noise = _squared_sums(flat[start:end], approx)
        signal, noise = signal + block_signal, noise + block_noise
        del approx
    return _db(signal, noise)


def _squared_sums(reference: Tensor, approx: Tensor) -> tuple[float, float]:
    r = reference.double()
    return r.pow(2).sum().item(), (r - approx.double()).pow(2).sum().item()


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _attribute_prefix(name: str) -> str:
    return "_qc_" + name.replace(".", "_").replace("#", "_")


def quantize_linears(
    gm: fx.GraphModule, sites: list[LinearSite], recipe: Recipe, input_amax: dict[str, Tensor] | None = None
) -> list[LayerReport]:
    """Replace every site by its `qcompile::` op; `input_amax` holds calibrated amax for static inputs."""
    input_amax = input_amax or {}
    reports = []
    for site in sites:
        refresh_input(site)
        numerics.check_finite(site.weight, f"weight of layer {site.name!r}")
    through_fp8 = formats.weights_through_fp8(recipe.weights, recipe.inputs)
    shared_amax = group_weight_amax(sites, recipe.weights, through_fp8)
    for site in sites:
        tensors, int_args, db = quantize_weight_in_chunks(site.weight.detach(), recipe.weights, site.source.dtype,
                                                          shared_amax.get(site.name), through_fp8)
        prefix = _attribute_prefix(site.name)
        attr_nodes = {}
        with gm.graph.inserting_before(site.node):
            for key, value in tensors.items():
                attr = f"{prefix}_{key}"
                gm.register_buffer(attr, value.contiguous())
                attr_nodes[key] = gm.graph.get_attr(attr)

            input_spec = recipe.inputs
            input_scale = None
            if input_spec is not None and not input_spec.dynamic:
                if site.name not in input_amax:
                    raise RuntimeError(f"layer {site.name!r} has a static input format but was never calibrated")
                gm.register_buffer(f"{prefix}_input_scale", static_input_scale(input_spec.format, input_amax[site.name]))
                input_scale = gm.graph.get_attr(f"{prefix}_input_scale")

            weight_format = formats.FORMATS[recipe.weights.format]
            weight_args = [attr_nodes.get(key, int_args.get(key)) for key in weight_format.weight_args]
            args = (
                site.input,
                *weight_args,
                site.bias,
                input_scale,
                "none" if input_spec is None else input_spec.format,
                "tensor" if input_spec is None else input_spec.granularity,
            )
            if "fp8_scale" in attr_nodes:  # W4A8's per-tensor FP8 scale: the int4 op's last argument
                args = (*args, attr_nodes["fp8_scale"])
            new_node = gm.graph.call_function(formats.linear_op(recipe.weights.format), args)
        new_node.meta.update({k: v for k, v in site.node.meta.items() if k in ("val", "example_value", "tensor_meta", "stack_trace", "nn_module_stack")})
        new_node.meta[LAYER_NAME] = site.name
        site.node.replace_all_uses_with(new_node)
        gm.graph.erase_node(site.node)
        _erase_float_weight(gm, site)
        reports.append(
            LayerReport(
                name=site.name,
                weight_format=describe(recipe.weights),
                input_format=describe(recipe.inputs),
                out_features=site.out_features,
                in_features=site.in_features,
                weight_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
                weight_sqnr_db=db,
            )
        )
    gm.graph.lint()
    gm.recompile()
    return reports


def _erase_float_weight(gm: fx.GraphModule, site: LinearSite) -> None:
    """Drop the now-unused transposes and float weight, so the module holds only the quantized copy."""
    node = site.weight_node
    # transposes between the constant and the product
    for user in list(node.users):
        if not user.users and user.op in ("call_function", "call_method"):
            gm.graph.erase_node(user)
    if node.users or node.op != "get_attr":
        return  # still used elsewhere (tied weights), or a dynamo placeholder the caller keeps passing
    gm.graph.erase_node(node)
    owner_path, _, attr = str(node.target).rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if attr in owner._parameters:
        del owner._parameters[attr]
    elif attr in owner._buffers:
        del owner._buffers[attr]
    elif hasattr(owner, attr):
        delattr(owner, attr)
