"""An independent float64 simulation of what a quantized model computes, plus the tiny models the tests share.

The simulation never touches the graph machinery (capture, passes, ops, lowering, backend): it deep-copies the
float model to float64 and swaps every targeted `nn.Linear` for `SimLinear`, which computes

    fake_quant(x) @ dequant(quant(W))^T + b      (in float64)

with the per-recipe semantics written out below in `SEMANTICS` (not read from `qcompile.RECIPES`). Static
activation ranges come from forward pre-hooks on the float64 copy, run over the same calibration batches.
The format definitions themselves (`qcompile.numerics`) are the reference numerics, tested bit for bit on their
own in tests/test_numerics.py, so they are used here as the definition of each format.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from qcompile import numerics

DEFAULT_EXCLUDE = ("*lm_head*", "*embed*", "*wte*", "*wpe*")


def _w_int8_channel(w):
    return numerics.dequantize_int8(numerics.quantize_int8(w, "channel"))


def _w_fp8(granularity):
    def quantize(w, group_amax=None):
        # one per-tensor scale for the layers that read one input (engines run them as one GEMM)
        scale = None if group_amax is None or granularity != "tensor" else group_amax / 448.0
        return numerics.dequantize_fp8(numerics.quantize_fp8(w, granularity, block_size=128, scale=scale))

    return quantize


def _w_int4_g128(w):
    return numerics.dequantize_int4(numerics.quantize_int4(w, 128, symmetric=True, bits=4))


def _w_int4_g128_fp8(w, group_amax=None):
    """W4A8: the INT4 weight as the FP8 GEMM takes it, rounded through FP8 under amax/448 (the fused group's)."""
    fp8_scale = True if group_amax is None else group_amax / 448.0
    return numerics.dequantize_int4(numerics.quantize_int4(w, 128, symmetric=True, bits=4, fp8_scale=fp8_scale))


def _w_nvfp4(w, group_amax=None):
    global_scale = None if group_amax is None else group_amax / (6.0 * 448.0)  # shared like FP8's per-tensor scale
    return numerics.dequantize_nvfp4(numerics.quantize_nvfp4(w, global_scale=global_scale))


@dataclass(frozen=True)
class Semantics:
    """What one recipe does to a linear: the dequantized weight, and how its input is fake-quantized."""

    weight: callable
    input_format: str | None = None  # None: weight-only
    input_granularity: str = "tensor"
    static_qmax: float | None = None  # static scale = amax / static_qmax; None: dynamic


_FP8_TENSOR_WEIGHT = _w_fp8("tensor")
# weight quantizers whose per-tensor scale is shared by the layers reading one input
SHARED_SCALE = (_FP8_TENSOR_WEIGHT, _w_nvfp4, _w_int4_g128_fp8)

SEMANTICS = {
    "fp8": Semantics(_FP8_TENSOR_WEIGHT, "fp8_e4m3", "tensor", 448.0),
    "fp8_dynamic": Semantics(_w_fp8("channel"), "fp8_e4m3", "token"),
    "fp8_block": Semantics(_w_fp8("block")),
    "int8_sq": Semantics(_w_int8_channel, "int8", "tensor", 127.0),
    "int8_dynamic": Semantics(_w_int8_channel, "int8", "token"),
    "int4_awq": Semantics(_w_int4_g128),
    "w4a8_awq": Semantics(_w_int4_g128_fp8, "fp8_e4m3", "tensor", 448.0),
    "nvfp4": Semantics(_w_nvfp4, "nvfp4", "block", 6.0 * 448.0),
    "nvfp4_weight_only": Semantics(_w_nvfp4),
    "int4_gptq": Semantics(_w_int4_g128),
}
# The formats of the presets whose algorithm changes weights or scales (SmoothQuant, AWQ, GPTQ), with plain max
# calibration instead (docs/formats.md#recipes derives "INT8 without SmoothQuant" this way): the simulation covers
# these exactly whatever the algorithms do.
MAX_VARIANTS = {"int8_sq_max": "int8_sq", "w4a8_max": "w4a8_awq", "int4_max": "int4_awq"}
for _variant, _preset in MAX_VARIANTS.items():
    SEMANTICS[_variant] = SEMANTICS[_preset]
RECIPE_NAMES = tuple(SEMANTICS)
# Presets with static activation scales (the ones that need qcompile.calibrate under torch.compile).
STATIC_RECIPES = tuple(
    name for name, s in SEMANTICS.items() if s.static_qmax is not None and name not in MAX_VARIANTS
)


def recipe_for(name: str):
    """The qcompile recipe behind a name of SEMANTICS: a preset, or a max-calibration variant of one."""
    import dataclasses

    import qcompile

    if name in MAX_VARIANTS:
        return dataclasses.replace(qcompile.RECIPES[MAX_VARIANTS[name]], algorithm="max", name=name)
    return qcompile.RECIPES[name]


def simulates_exactly(name: str) -> bool:
    """The simulation models max calibration; SmoothQuant/AWQ/GPTQ, once they run, change weights and scales."""
    import qcompile

    return qcompile.algorithms.describe(recipe_for(name)).startswith("max")


class SimLinear(nn.Module):
    """A linear layer computing the quantized function in float64."""

    def __init__(self, linear: nn.Linear, semantics: Semantics, amax: torch.Tensor | None,
                 group_amax: torch.Tensor | None = None):
        super().__init__()
        # The float64 copy holds the float32 weights exactly (float32 -> float64 is lossless).
        weight = linear.weight.detach().float()
        shared = semantics.weight in SHARED_SCALE and group_amax is not None
        self.register_buffer("weight", (semantics.weight(weight, group_amax) if shared
                                        else semantics.weight(weight)).double())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().double())
        self.semantics = semantics
        self.scale = None
        if semantics.static_qmax is not None:
            scale = amax.double() / semantics.static_qmax
            self.scale = torch.where(scale > 0, scale, torch.ones_like(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.semantics
        xq = x
        if s.input_format is not None:
            scale = None if self.scale is None else self.scale.float()
            xq = numerics.fake_quantize(x.float(), s.input_format, s.input_granularity, scale=scale).double()
        out = xq.double() @ self.weight.T
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype)


def call(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def to_double(batch):
    def conv(t):
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    if isinstance(batch, Mapping):
        return {k: conv(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(conv(v) for v in batch)
    return conv(batch)


def targeted_linears(model: nn.Module, exclude=DEFAULT_EXCLUDE) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    ]


def simulate(model: nn.Module, recipe: str, calib, exclude=DEFAULT_EXCLUDE) -> nn.Module:
    """The float64 model that computes what `recipe` should make of `model`."""
    semantics = SEMANTICS[recipe]
    sim = copy.deepcopy(model).double().eval()
    names = targeted_linears(sim, exclude)
    amax: dict[str, torch.Tensor] = {}
    group_amax = _group_weight_amax(sim, names, calib)
    if semantics.static_qmax is not None:
        handles = []
        for name in names:
            def hook(module, args, name=name):
                value = args[0].detach().abs().amax()
                amax[name] = value if name not in amax else torch.maximum(amax[name], value)

            handles.append(sim.get_submodule(name).register_forward_pre_hook(hook))
        with torch.no_grad():
            for batch in calib:
                call(sim, to_double(batch))
        for handle in handles:
            handle.remove()
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = sim.get_submodule(parent_name) if parent_name else sim
        setattr(parent, attr, SimLinear(sim.get_submodule(name), semantics, amax.get(name), group_amax.get(name)))
    return sim


def _group_weight_amax(model: nn.Module, names: list[str], calib) -> dict[str, torch.Tensor]:
    """{layer: max |w| over the layers that read the same input tensor}, found by running one batch eagerly and
    comparing the input tensors the layers receive."""
    reads: dict[str, tuple] = {}
    alive = []  # inputs held until the end, so that no later tensor reuses their memory (and address)

    def record(module, args, name):
        alive.append(args[0])
        reads.setdefault(name, (args[0].data_ptr(), tuple(args[0].shape)))

    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: record(module, args, name)) for name in names]
    with torch.no_grad():
        call(model, to_double(next(iter(calib))))
    for handle in handles:
        handle.remove()
    groups: dict[tuple, list[str]] = {}
    for name in names:
        groups.setdefault(reads.get(name, (name,)), []).append(name)
    shared = {}
    for members in groups.values():
        amax = torch.stack([model.get_submodule(n).weight.detach().float().abs().amax() for n in members]).amax()
        shared.update({n: amax for n in members})
    return shared


def primary_output(out) -> torch.Tensor:
    """The tensor to compare: logits / last hidden state / the plain tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if key in out:
            return out[key]
    raise TypeError(type(out))


def backend_error(error: BaseException) -> BaseException:
    """The exception a `backend="quant"` compile raised: dynamo wraps backend errors in BackendCompilerFailed."""
    return getattr(error, "inner_exception", error)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------- tiny models


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=160,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def tiny_mlp(seed: int = 0):
    # K = 40 and 160: not multiples of 16/128, so NVFP4 blocks, INT4 groups and FP8 tiles are padded/partial,
    # and K = 160 spans two INT4 groups and two FP8 tiles.
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(40, 96), nn.GELU(), nn.Linear(96, 160), nn.Tanh(), nn.Linear(160, 24)
    ).eval()


def token_batch(batch: int, seq: int, seed: int, vocab: int = 128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def bert_batch(batch: int, seq: int, seed: int):
    ids = token_batch(batch, seq, seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 2:] = 0  # one padded sequence, so the mask matters
    return {"input_ids": ids, "attention_mask": mask}


def mlp_batch(batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, 40, generator=g)


MODELS = {
    "llama": (tiny_llama, lambda b, s, seed: token_batch(b, s, seed)),
    "bert": (tiny_bert, bert_batch),
    "mlp": (tiny_mlp, mlp_batch),
}


# ------------------------------------------------------------------------------------------ comparisons

# Agreement between the library (float32 graph) and the float64 simulation, relative to the output norm. The two
# differ only by float32 rounding in the unquantized parts of the model (norms, attention, activations) and in
# the float32 matmul: observed 1e-7 to 4e-7 on every model and recipe.
SIM_TOL = 1e-5


def assert_matches_simulation(y: torch.Tensor, y_sim: torch.Tensor, y_float: torch.Tensor, recipe: str) -> None:
    """`y` computes the quantized function `y_sim`, and that function is measurably not the float one.

    Weight-only recipes round nothing that depends on the float32-vs-float64 path, so the whole output must agree
    to SIM_TOL. Recipes that quantize activations can flip a rounding decision where an activation lies within
    float32 rounding (~1e-7 relative) of a rounding boundary: one element moves by one quantization step. FP8
    has 16 boundaries per doubling, so about 3e-6 of the elements are that close: rare in the 3x5-token cases
    (one flip in 60: BERT int8_dynamic, 1.6e-4 on one token, 4e-5 overall), a few per 100k elements. Every
    layer works token by token and attention never mixes sequences, so a flip stays inside one sequence (dim 0).
    For those recipes at most a quarter of the sequences (at least one allowed) may miss SIM_TOL, and each of
    those must differ from the simulation by less than 0.3x its own distance to the float output (one step on
    one element is a small part of a whole sequence's rounding noise: 0.15x in the case above). A different
    quantized function moves every sequence, by 0.17x-1.5x of the float distance (measured: unquantized
    activations, per-token instead of per-tensor scales, W4A16 instead of W4A8), thousands of times SIM_TOL.
    """
    gap = rel(y_sim, y_float)
    assert gap > 20 * SIM_TOL, f"the quantized function is too close to the float one ({gap:.3g}) to test at all"
    total = rel(y, y_sim)
    if SEMANTICS[recipe].input_format is None:
        assert total < SIM_TOL, f"relative difference to the float64 simulation {total:.3g} (float gap {gap:.3g})"
        return
    per_sequence = [rel(y[i], y_sim[i]) for i in range(y.shape[0])]
    off = [i for i, d in enumerate(per_sequence) if d >= SIM_TOL]
    assert len(off) <= max(1, len(per_sequence) // 4), f"sequences off the simulation: {per_sequence} (gap {gap:.3g})"
    for i in off:
        own_gap = rel(y_sim[i], y_float[i])
        assert per_sequence[i] < 0.3 * own_gap, (
            f"sequence {i} is {per_sequence[i]:.3g} from the simulation, {own_gap:.3g} from the float output"
        )
