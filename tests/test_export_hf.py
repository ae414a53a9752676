"""qcompile.export_hf: Hugging Face checkpoints in the compressed-tensors format, loaded back by transformers with
compressed-tensors' own loaders (the reference: what an engine reads), and the `qcompile quantize` command line."""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys

import pytest
import torch

import hf_zoo
import qcompile
from qcompile import numerics
from qcompile.checkpoints import ExportError
from qcompile.lowering import torch_reference as ref
from qcompile.quantized_modules import QuantizedLinear

pytest.importorskip("compressed_tensors")

# loaded logits equal qcompile's bit for bit: the loaders dequantize exactly as qcompile does, in float32
EXACT = ("fp8", "fp8_dynamic", "fp8_block", "int4_awq", "int4_gptq")
# close: compressed-tensors emulates INT8 activations with its own scale convention (per-token amax/127.5 in its
# CPU emulation); NVFP4 is decompressed to bf16 by its loader, so those run on a bf16 model
CLOSE = {"int8_sq": 1e-5, "int8_dynamic": 0.03, "nvfp4": 0.3, "nvfp4_weight_only": 0.02}


def llama(dtype=torch.float32, seed=0):
    """A tiny Llama whose widths are multiples of 128 (the INT4 group), grouped-query attention, default config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**hf_zoo.SIZES, "hidden_size": 128, "intermediate_size": 256})
    return LlamaForCausalLM(config).to(dtype).eval()


@functools.lru_cache(maxsize=None)
def quantized(recipe_name: str, dtype=torch.float32, explicit_input_scales: bool = False):
    """(float model, quantized model), built once per combination (the tests only read them)."""
    model = llama(dtype)
    recipe = dataclasses.replace(qcompile.RECIPES[recipe_name], explicit_input_scales=explicit_input_scales)
    return model, qcompile.quantize(model, recipe, calib=hf_zoo.batches("llama"), progress=False)


def load(path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


@pytest.mark.parametrize("recipe", [*EXACT, *CLOSE])
def test_transformers_loads_compressed_tensors(recipe, tmp_path):
    dtype = torch.bfloat16 if recipe.startswith("nvfp4") else torch.float32
    model, qm = quantized(recipe, dtype)
    qcompile.export_hf(qm, tmp_path / "out", dtype=dtype)
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(config)  # the format's own schema accepts the description
    assert config["ignore"] == ["lm_head"]
    loaded = load(tmp_path / "out")
    batch = hf_zoo.batches("llama", seed=5)[0]
    with torch.no_grad():
        out, expected = loaded(**batch).logits, qm(**batch).logits
    if recipe in EXACT:
        assert torch.equal(out, expected)
    else:
        error = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
        float_error = ((model(**batch).logits.float() - expected.float()).norm() / expected.float().norm()).item()
        assert error < CLOSE[recipe] and error < float_error


def _qcompile_weight(layer: QuantizedLinear) -> torch.Tensor:
    op = layer.op._schema.name
    if op.endswith("int4_linear"):
        return ref.dequantize_int4_weight(layer.packed, layer.scale, None, layer.constants["group_size"], 4,
                                          layer.in_features, getattr(layer, "fp8_scale", None))
    return ref.dequantize_nvfp4_weight(layer.packed, layer.block_scale, layer.global_scale, layer.in_features)


def pack_quantized_weight(tensors: dict, prefix: str) -> torch.Tensor:
    """pack-quantized decoded from its definition (offset-binary nibbles, eight per int32, element 0 lowest)."""
    packed = tensors[f"{prefix}.weight_packed"].to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(packed.shape[0], -1)
    rows, cols = tensors[f"{prefix}.weight_shape"].tolist()
    codes = nibbles[:, :cols].float() - 8
    scale = tensors[f"{prefix}.weight_scale"]
    return codes * scale.repeat_interleave(-(-cols // scale.shape[1]), dim=1)[:, :cols]


def test_int4_layout_from_the_format_definition(tmp_path):
    """Codes times scales, decoded from the format's definition, give qcompile's weight bit for bit."""
    from safetensors.torch import load_file

    _, qm = quantized("int4_gptq")
    qcompile.export_hf(qm, tmp_path / "out", dtype=torch.float32)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    for name, layer in qm.as_module().named_modules():
        if isinstance(layer, QuantizedLinear):
            assert torch.equal(pack_quantized_weight(tensors, name), _qcompile_weight(layer)), name


def test_quantized_layers_keep_their_biases(tmp_path):
    """Qwen2's q/k/v projections have biases: written beside the quantized weights, so the loaded model computes
    what qcompile computes (fp8 loads bit for bit on a float32 model)."""
    model = hf_zoo.qwen2()
    qm = qcompile.quantize(model, "fp8", calib=hf_zoo.batches("qwen2"), progress=False)
    qcompile.export_hf(qm, tmp_path / "out", dtype=torch.float32)
    loaded = load(tmp_path / "out")
    batch = hf_zoo.batches("qwen2", seed=5)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, qm(**batch).logits)
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.bias, model.model.layers[0].self_attn.q_proj.bias)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_experts_written_per_expert_under_the_checkpoint_names(arch, tmp_path):
    """Fused MoE experts are quantized one projection per expert and written under the names the model's own
    checkpoints use (what `save_pretrained` writes for the float model: Mixtral's `block_sparse_moe.experts.<e>.w1`,
    Qwen2-MoE's `mlp.experts.<e>.gate_proj`), which is what engines read. Each decodes to qcompile's weight, and
    transformers (which dequantizes experts while loading) computes what qcompile computes."""
    from safetensors.torch import load_file

    model = getattr(hf_zoo, arch)()
    model.save_pretrained(tmp_path / "float")
    float_names = set(load_file(tmp_path / "float" / "model.safetensors"))
    recipe = dataclasses.replace(qcompile.RECIPES["int4_awq"], explicit_input_scales=False,
                                 weights=dataclasses.replace(qcompile.RECIPES["int4_awq"].weights, block_size=32))
    qm = qcompile.quantize(model, recipe, calib=hf_zoo.batches(arch), progress=False)
    qcompile.export_hf(qm, tmp_path / "out", dtype=torch.float32)
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    layers = {key.removesuffix(".weight_packed") for key in tensors if key.endswith(".weight_packed")}
    experts = sorted(layer for layer in layers if ".experts." in layer)
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    assert {f"{layer}.weight" for layer in layers} <= float_names  # every quantized layer is a checkpoint linear
    as_float = {owner + ".weight" if owner in layers and leaf.startswith("weight") else key
                for key in tensors for owner, _, leaf in [key.rpartition(".")]}
    assert as_float == float_names  # the float checkpoint's tensors, the quantized layers' weights as their tensors
    # the experts' weights, decoded here, are qcompile's (matched through the fused tensors transformers loads)
    qcompile_layers = {name: m for name, m in qm.as_module().named_modules() if isinstance(m, QuantizedLinear)}
    assert len(qcompile_layers) == len(layers)
    loaded = load(tmp_path / "out")
    fused = loaded.model.layers[1].mlp.experts
    up = fused.gate_up_proj if hasattr(fused, "gate_up_proj") else fused.up_proj
    for e in range(4):
        prefix = f"model.layers.1.{'block_sparse_moe' if arch == 'mixtral' else 'mlp'}.experts.{e}."
        gate, up_name, down = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        decoded = torch.cat([pack_quantized_weight(tensors, prefix + gate), pack_quantized_weight(tensors, prefix + up_name)])
        mine = [_qcompile_weight(qcompile_layers[f"model.layers.1.mlp.experts.{e}.{p}"])
                for p in ("gate_proj", "up_proj")]
        assert torch.equal(decoded, torch.cat(mine)) and torch.equal(up[e], decoded)
        assert torch.equal(pack_quantized_weight(tensors, prefix + down), fused.down_proj[e])
    batch = hf_zoo.batches(arch, seed=5)[0]
    with torch.no_grad():
        out, expected, reference = loaded(**batch).logits, qm(**batch).logits, model(**batch).logits
    error = ((out - expected).norm() / expected.norm()).item()  # float rounding: fused experts against one by one
    assert error < 1e-5 and error < ((reference - expected).norm() / expected.norm()).item() / 1000


def test_bf16_int4_scales_rounded_before_the_codes(tmp_path):
    """In a bf16 model the group scales are bf16 values (what the loaders keep), so the loaded weight is qcompile's
    weight rounded once to bf16."""
    _, qm = quantized("int4_awq", torch.bfloat16)
    qcompile.export_hf(qm, tmp_path / "out", dtype=torch.bfloat16)
    loaded = load(tmp_path / "out")
    with torch.no_grad():
        loaded(**hf_zoo.batches("llama")[0])  # the loaders decompress on the first call
    for name, layer in qm.as_module().named_modules():
        if isinstance(layer, QuantizedLinear):
            assert torch.equal(layer.scale.to(torch.bfloat16).float(), layer.scale), name
            assert torch.equal(loaded.get_submodule(name).weight, _qcompile_weight(layer).to(torch.bfloat16)), name


def test_export_errors_and_atomic_directory(tmp_path):
    one_layer = ("*lm_head*", "*layers.1.*", "*mlp*", "*k_proj", "*v_proj", "*o_proj")  # q_proj of layer 0
    w4a8 = qcompile.quantize(llama(), "w4a8_awq", calib=hf_zoo.batches("llama"), exclude=one_layer, progress=False)
    with pytest.raises(ExportError, match="w4a8_awq.*no route in compressed-tensors"):
        qcompile.export_hf(w4a8, tmp_path / "a")
    _, awq = quantized("int4_awq", explicit_input_scales=True)  # the preset: explicit input scales
    with pytest.raises(ExportError, match=r"o_proj.*explicit_input_scales=False"):
        qcompile.export_hf(awq, tmp_path / "b")
    _, nvfp4 = quantized("nvfp4_weight_only")
    with pytest.raises(ExportError, match="dtype=torch.bfloat16"):
        qcompile.export_hf(nvfp4, tmp_path / "c", dtype=torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written
    _, fp8 = quantized("fp8_dynamic")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        qcompile.export_hf(fp8, tmp_path / "e")
    qcompile.export_hf(fp8, tmp_path / "e", overwrite=True)
    assert not (tmp_path / "e" / "keep.txt").exists() and (tmp_path / "e" / "config.json").is_file()


def test_sharded_checkpoint(tmp_path):
    _, qm = quantized("fp8_dynamic")
    qcompile.export_hf(qm, tmp_path / "out", dtype=torch.float32, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "out" / s).is_file() for s in shards)
    batch = hf_zoo.batches("llama", seed=5)[0]
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "out")(**batch).logits, qm(**batch).logits)


def test_cli_quantize_to_compressed_tensors(tmp_path, capsys):
    from qcompile.cli import main

    folder = hf_zoo.model_folder(tmp_path / "model", llama())
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    assert main(["quantize", str(folder), str(tmp_path / "out"), "--recipe", "int4_awq", "--format",
                 "compressed-tensors", "--calib", str(calib), "--calib-samples", "4", "--seq-len", "64"]) == 0
    assert "total: 14 layers" in capsys.readouterr().out
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["format"] == \
        "pack-quantized"
    with torch.no_grad():  # in a fresh process: transformers with compressed-tensors' loaders
        code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
                "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True); "
                "print(bool(torch.isfinite(m(input_ids=torch.arange(8)[None]).logits).all()))")
        run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0 and run.stdout.strip().endswith("True"), run.stderr[-2000:]
    for args, message in (
        ([str(folder), str(tmp_path / "x"), "--recipe", "nope"], "unknown recipe 'nope'"),
        ([str(folder), str(tmp_path / "x"), "--recipe", "w4a8_awq", "--format", "compressed-tensors"],
         "no route in compressed-tensors"),
        ([str(tmp_path / "none"), str(tmp_path / "y"), "--recipe", "fp8"], "not a Hugging Face model folder"),
        ([str(folder), str(tmp_path / "z"), "--recipe", "fp8", "--group-size", "64"], "applies to group-wise"),
        ([str(folder), str(tmp_path / "out"), "--recipe", "fp8"], "exists and is not empty"),
    ):
        assert main(["quantize", *args]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qcompile:")]
        assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("recipe", ["fp8", "nvfp4", "w4a8_max"])
def test_fused_groups_share_per_tensor_scales(recipe):
    """q/k/v and gate/up read one input, and engines run each group as one GEMM with one per-tensor weight scale
    (NVFP4: one global scale; W4A8: one FP8 scale): qcompile computes the same, from the largest |w| of the group."""
    if recipe == "w4a8_max":  # max calibration: AWQ would move the weights off the float model's
        model = llama()
        qm = qcompile.quantize(model, dataclasses.replace(qcompile.RECIPES["w4a8_awq"], algorithm="max"),
                               calib=hf_zoo.batches("llama"), progress=False)
    else:
        model, qm = quantized(recipe, explicit_input_scales=True)
    tree = qm.as_module()
    qmax = 6.0 * 448.0 if recipe == "nvfp4" else 448.0
    for layer in range(2):
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
                      ("self_attn.o_proj",), ("mlp.down_proj",)):
            names = [f"model.layers.{layer}.{member}" for member in group]
            amax = max(model.get_submodule(name).weight.detach().abs().max().item() for name in names)
            for name in names:
                module = tree.get_submodule(name)
                scale = {"fp8": "weight_scale", "nvfp4": "global_scale", "w4a8_max": "fp8_scale"}[recipe]
                scale = getattr(module, scale)
                assert scale.numel() == 1 and scale.item() == pytest.approx(amax / qmax, rel=1e-7), name


# ------------------------------------------------------------------------------------------ Model Optimizer
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def modelopt_weight(tensors: dict, prefix: str, algo: str, shape) -> torch.Tensor:
    """A layer's weight decoded from the unified checkpoint's definition (written here, not qcompile's code)."""
    weight, scale = tensors[f"{prefix}.weight"], tensors[f"{prefix}.weight_scale"]
    rows, cols = shape
    if algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W8A8_SQ_PER_CHANNEL"):
        return weight.float() * (scale if scale.dim() == 0 else scale[:, None])
    if algo == "FP8_PB_WO":
        return weight.float() * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):  # two codes per byte along the output dimension, low nibble first
        nibbles = torch.stack([weight & 0xF, weight >> 4], dim=1).reshape(rows, cols).to(torch.int32)
        codes = torch.where(nibbles >= 8, nibbles - 16, nibbles).float()
        values = codes * scale.repeat_interleave(cols // scale.shape[1], dim=1)
        if algo == "W4A16_AWQ":
            return values
        # W4A8: the FP8 GEMM's weight, code x group scale rounded to FP8 under weight_scale_2 (saturating)
        second = tensors[f"{prefix}.weight_scale_2"]
        return (values / second).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * second
    if algo in ("NVFP4", "W4A16_NVFP4"):
        values = E2M1[torch.stack([weight & 0xF, weight >> 4], dim=-1).reshape(rows, cols).long()]
        block = scale.float() * tensors[f"{prefix}.weight_scale_2"]
        return (values.reshape(rows, cols // 16, 16) * block[..., None]).reshape(rows, cols)
    raise AssertionError(algo)


MODELOPT = {"fp8": "FP8", "fp8_dynamic": "FP8_PER_CHANNEL_PER_TOKEN", "fp8_block": "FP8_PB_WO",
            "int8_sq": "W8A8_SQ_PER_CHANNEL", "int4_awq": "W4A16_AWQ", "int4_gptq": "W4A16_AWQ", "nvfp4": "NVFP4",
            "nvfp4_weight_only": "W4A16_NVFP4", "w4a8_awq": "W4A8_AWQ"}


@pytest.mark.parametrize("recipe", list(MODELOPT))
def test_modelopt_checkpoint_decodes_to_qcompile_weights(recipe, tmp_path):
    from safetensors.torch import load_file

    _, qm = quantized(recipe, explicit_input_scales=True)  # the preset as it is
    qcompile.export_hf(qm, tmp_path / "out", format="modelopt", dtype=torch.float32)
    described = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())
    assert described["producer"]["name"] == "modelopt"
    assert described["quantization"]["quant_algo"] == MODELOPT[recipe]
    assert described["quantization"]["exclude_modules"] == ["lm_head"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "modelopt" and config["quant_algo"] == MODELOPT[recipe]
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    multipliers = 0
    for name, layer in qm.as_module().named_modules():
        if not isinstance(layer, QuantizedLinear):
            continue
        weight = modelopt_weight(tensors, name, MODELOPT[recipe], (layer.out_features, layer.in_features))
        op = layer.op._schema.name.split("::")[1]
        expected = {"fp8_linear": lambda: ref.dequantize_fp8_weight(layer.weight, layer.weight_scale,
                                                                    layer.constants["block_size"]),
                    "int8_linear": lambda: ref.dequantize_int8_weight(layer.weight, layer.weight_scale),
                    }.get(op, lambda: _qcompile_weight(layer))()
        assert torch.equal(weight, expected), name
        if f"{name}.pre_quant_scale" in tensors:  # the input is multiplied by it before the layer
            multipliers += 1
            x = torch.randn(3, layer.in_features)
            scaled = x * tensors[f"{name}.pre_quant_scale"]
            if f"{name}.input_scale" in tensors:  # then the static per-tensor activation rounding (W8A8, W4A8)
                fmt = "int8" if MODELOPT[recipe] == "W8A8_SQ_PER_CHANNEL" else "fp8_e4m3"
                scaled = numerics.fake_quantize(scaled, fmt, "tensor", scale=tensors[f"{name}.input_scale"])
            y = scaled @ weight.T
            torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    # the o_proj scales of AWQ/SmoothQuant have no fold point under grouped-query attention: pre_quant_scale
    assert (multipliers > 0) == (recipe in ("int4_awq", "int8_sq", "w4a8_awq"))
    # static input scales exactly where the format quantizes activations with one
    assert any(key.endswith(".input_scale") for key in tensors) == (
        MODELOPT[recipe] in ("FP8", "NVFP4", "W8A8_SQ_PER_CHANNEL", "W4A8_AWQ"))
    if MODELOPT[recipe] == "W4A16_NVFP4":  # the weight-only description engines read: no activation scheme
        assert "input_activations" not in config["config_groups"]["group_0"]
        assert config["config_groups"]["group_0"]["weights"]["group_size"] == 16


@pytest.mark.parametrize("recipe, reason", [("int8_dynamic", "int8_dynamic.*compressed-tensors")])
def test_modelopt_refuses_recipes_it_has_no_name_for(recipe, reason, tmp_path):
    _, qm = quantized(recipe)
    with pytest.raises(ExportError, match=reason):
        qcompile.export_hf(qm, tmp_path / "out", format="modelopt")
    assert not (tmp_path / "out").exists()
