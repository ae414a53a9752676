"""KV-cache quantization: keys and values found in the graph, scales calibrated, the round trip exact, generation
with a cache, save/load and the checkpoint exports."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import hf_zoo
import qcompile
from qcompile import numerics

FP8_MAX = 448.0


@functools.lru_cache(maxsize=None)
def _quantized(name: str, recipe: str, kv_cache: str | None, dtype: torch.dtype = torch.float32):
    model = getattr(hf_zoo, name)(dtype=dtype)
    calib = hf_zoo.batches(name, count=3)
    return model, calib, qcompile.quantize(model, recipe, calib=calib, kv_cache=kv_cache, progress=False)


class _Spy:
    """A transformers attention function that records max |key| and max |value| per attention module, then runs
    sdpa: the keys and values exactly as the model hands them to its attention."""

    def __init__(self):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

        self.amax: dict[int, list[float]] = {}

        def attention(module, query, key, value, *args, **kwargs):
            seen = self.amax.setdefault(id(module), [0.0, 0.0])
            seen[0] = max(seen[0], key.detach().double().abs().max().item())
            seen[1] = max(seen[1], value.detach().double().abs().max().item())
            return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

        AttentionInterface.register("test_spy", attention)
        AttentionMaskInterface.register("test_spy", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _kv_round_trips(qm, batch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]]:
    """(input, output, scale, format) of every qcompile::kv_round_trip node of the graph on one call."""
    records = []
    gm = qm.graph_module

    class Recorder(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            out = super().call_function(target, args, kwargs)
            if target is torch.ops.qcompile.kv_round_trip.default:
                records.append((args[0], out, args[1], args[2]))
            return out

    flat = torch.fx._pytree.tree_flatten_spec(((), batch), gm._in_spec) if gm._in_spec else list(batch.values())
    with torch.no_grad():
        Recorder(gm).run(*flat)
    return records


def _fp8_round_trip_by_definition(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 from its definition: 4 exponent bits (bias 7), 3 mantissa bits, max 448, subnormals at 2^-9 steps;
    round to nearest, ties to even, saturating. Computed in float64 on the grid of representable values."""
    grid = [0.0]
    for exponent in range(16):
        for mantissa in range(8):
            if exponent == 15 and mantissa == 7:
                continue  # NaN
            value = (mantissa / 8) * 2.0 ** -6 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7)
            grid.append(value)
    grid = torch.tensor(sorted(set(grid)), dtype=torch.float64)
    y = (x.double() / scale.double()).float().double()  # the division happens in float32, as the format defines
    magnitude = y.abs().clamp(max=FP8_MAX)
    index = torch.searchsorted(grid, magnitude.contiguous()).clamp(1, len(grid) - 1)
    low, high = grid[index - 1], grid[index]
    pick_high = (magnitude - low > high - magnitude) | (
        (magnitude - low == high - magnitude) & ((index % 2) == 0))  # ties to the even code (codes count from 0)
    value = torch.where(magnitude >= high, high, torch.where(pick_high, high, low))
    return (torch.sign(y) * value * scale.double()).to(x.dtype)


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_kv_scales_are_calibrated_maxima_of_the_attended_keys_and_values(name):
    recipe = "int8_dynamic" if name == "t5" else "fp8"  # T5 casts its FF input to an fp8 weight's dtype
    model, calib, qm = _quantized(name, recipe, "fp8")
    _, _, plain = _quantized(name, recipe, None)
    tree = plain.as_module()
    spy = _Spy()
    configs = {id(m.config): m.config for m in tree.modules() if hasattr(m, "config")}.values()
    previous = [config._attn_implementation for config in configs]
    for config in configs:  # T5's stacks hold copies of the model's config
        config._attn_implementation = "test_spy"
    try:
        with torch.no_grad():
            for batch in calib:
                tree(**batch)
    finally:
        for config, name in zip(configs, previous):
            config._attn_implementation = name
    modules = dict(tree.named_modules())
    assert len(qm.kv_layers) == len(spy.amax) > 0
    for kv in qm.kv_layers:
        key_amax, value_amax = spy.amax[id(modules[kv.name])]
        assert kv.key_scale == pytest.approx(key_amax / FP8_MAX, rel=1e-6), kv.name
        assert kv.value_scale == pytest.approx(value_amax / FP8_MAX, rel=1e-6), kv.name
    # the stored elements per token: keys and values of the kv heads (grouped heads not repeated)
    config = model.config
    if name == "llama":
        per_token = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
        assert {kv.elements_per_token for kv in qm.kv_layers} == {per_token}
        assert {kv.key_projection for kv in qm.kv_layers} == {f"model.layers.{i}.self_attn.k_proj" for i in range(2)}
    report = qm.report()
    assert "KV cache per token" in report and "4.00x smaller" in report


@pytest.mark.parametrize("name,fmt", [("llama", "fp8"), ("gpt2", "fp8"), ("t5", "fp8"), ("llama", "nvfp4")])
def test_kv_round_trip_in_the_graph_is_the_format_exactly(name, fmt):
    _, calib, qm = _quantized(name, "int8_dynamic", fmt)
    records = _kv_round_trips(qm, calib[1])
    assert len(records) == 2 * len(qm.kv_layers)
    for x, out, scale, record_fmt in records:
        assert record_fmt == fmt and out.dtype == x.dtype
        if fmt == "fp8":
            assert torch.equal(out, _fp8_round_trip_by_definition(x, scale))
            assert torch.equal(out, numerics.dequantize_fp8(numerics.quantize_fp8(x, scale=scale), x.dtype))
        else:
            t = numerics.quantize_nvfp4(x, global_scale=scale)
            assert torch.equal(out, numerics.dequantize_nvfp4(t, x.dtype))
        assert not torch.equal(out, x)  # the round trip does round


def test_nvfp4_kv_round_trip_decodes_from_e2m1_and_fp8_block_scales():
    """NVFP4 keys from the definition: per 16 elements along the head dimension, block scale = fp8(amax/6/global),
    values the nearest of ±{0, .5, 1, 1.5, 2, 3, 4, 6} (ties to even code) of x / (block scale * global)."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 40) * torch.logspace(-2, 1, 40)  # head_dim 40: the last block is partial
    x[0, 0, 0] = 0.0
    scale = numerics.kv_cache_scale(x.abs().amax(), "nvfp4")
    out = torch.ops.qcompile.kv_round_trip(x, scale, "nvfp4")
    padded = torch.nn.functional.pad(x.double(), (0, 8)).reshape(2, 3, 5, 3, 16)
    block = (padded.abs().amax(-1, keepdim=True) / (6 * scale.double())).float().to(torch.float8_e4m3fn).double()
    denominator = block * scale.double()
    y = torch.where(denominator == 0, torch.zeros_like(padded), padded / torch.where(denominator == 0, 1, denominator))
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    distance = (y.abs().clamp(max=6).unsqueeze(-1) - grid).abs()
    best = distance.min(-1, keepdim=True).values
    candidates = distance == best
    even = candidates & (torch.arange(8) % 2 == 0)  # a tie goes to the even code
    code = torch.where(even.any(-1), even.int().argmax(-1), candidates.int().argmax(-1))
    expected = (torch.sign(y) * grid[code] * denominator).reshape(2, 3, 5, 48)[..., :40].float()
    assert torch.equal(out, expected)


def test_generation_with_a_quantized_cache_equals_recomputation_with_quantized_keys_and_values():
    _, calib, qm = _quantized("llama", "fp8", "fp8")
    _, _, plain = _quantized("llama", "fp8", None)
    prompt = calib[0]["input_ids"][:1, :6]
    out = qm.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.shape[1] == 12
    for step, logits in enumerate(out.logits):
        sequence = out.sequences[:, : 6 + step]
        recomputed = qm.as_module()(input_ids=sequence).logits[:, -1]  # from scratch, a fresh cache
        torch.testing.assert_close(logits, recomputed, rtol=1e-5, atol=1e-5)
        # the graph (no cache) computes the same
        graph = qm(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[:, -1]
        torch.testing.assert_close(graph, recomputed, rtol=1e-5, atol=1e-5)
    # the cache holds the quantized values: on the FP8 grid of each layer's scale
    from transformers import DynamicCache

    cache = DynamicCache()
    qm(input_ids=prompt, past_key_values=cache, use_cache=True)
    tree = qm.as_module()
    for layer, kv in zip(cache.layers, qm.kv_layers):
        scales = tree.get_submodule(kv.name).qcompile_kv
        for stored, scale in ((layer.keys, scales.key_scale), (layer.values, scales.value_scale)):
            assert torch.equal(_fp8_round_trip_by_definition(stored, scale), stored)
    plain_cache = DynamicCache()
    plain(input_ids=prompt, past_key_values=plain_cache, use_cache=True)
    assert not torch.equal(plain_cache.layers[0].keys, cache.layers[0].keys)
    without = plain.as_module()(input_ids=out.sequences).logits
    with_kv = qm.as_module()(input_ids=out.sequences).logits
    assert (without - with_kv).abs().max() > 1e-4  # the cache's quantization is in effect


def test_t5_generation_with_quantized_self_and_cross_attention_caches_bf16():
    model, calib, qm = _quantized("t5", "int8_dynamic", "fp8", torch.bfloat16)
    names = [kv.name for kv in qm.kv_layers]
    assert any("EncDecAttention" in n for n in names) and any("decoder" in n and "SelfAttention" in n for n in names)
    assert all(torch.equal(torch.tensor(kv.key_scale).bfloat16().float(), torch.tensor(kv.key_scale))
               for kv in qm.kv_layers)  # rounded to the model's dtype, as engines keep them
    batch = calib[0]
    out = qm.generate(input_ids=batch["input_ids"][:1], max_new_tokens=4, do_sample=False, output_logits=True,
                      return_dict_in_generate=True)
    tree = qm.as_module()
    for step, logits in enumerate(out.logits):
        recomputed = tree(input_ids=batch["input_ids"][:1], decoder_input_ids=out.sequences[:, : step + 1])
        recomputed = recomputed.logits[:, -1]
        assert recomputed.dtype == torch.bfloat16  # generate hands out its scores in float32
        torch.testing.assert_close(logits, recomputed.float(), rtol=2e-2, atol=2e-2)


def test_kv_cache_saves_and_loads_in_a_fresh_process(tmp_path):
    _, calib, qm = _quantized("gpt2", "fp8_dynamic", "fp8")
    qm.save(tmp_path / "ckpt")
    from safetensors.torch import save_file

    expected = qm(**calib[2]).logits
    save_file({"expected": expected.contiguous(), **{k: v for k, v in calib[2].items()}}, tmp_path / "io.safetensors")
    script = f"""
import torch, qcompile
from safetensors.torch import load_file
io = load_file({str(tmp_path / 'io.safetensors')!r})
qm = qcompile.load({str(tmp_path / 'ckpt')!r})
out = qm(**{{k: v for k, v in io.items() if k != 'expected'}}).logits
assert torch.equal(out, io['expected']), (out - io['expected']).abs().max()
assert [kv.format for kv in qm.kv_layers] == ['fp8', 'fp8'], qm.kv_layers
assert 'KV cache per token' in qm.report()
print('ok')
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_kv_cache_exports_for_engines(tmp_path):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    _, calib, qm = _quantized("llama", "fp8", "fp8")
    path = qcompile.export_hf(qm, tmp_path / "ct", format="compressed-tensors", dtype=torch.float32)
    config = json.loads((path / "config.json").read_text())
    scheme = QuantizationArgs.model_validate(config["quantization_config"]["kv_cache_scheme"])
    assert (scheme.num_bits, scheme.type, scheme.strategy, scheme.dynamic, scheme.symmetric) == (
        8, "float", "tensor", False, True)
    assert "qcompile" not in json.dumps(config.get("_attn_implementation", ""))
    tensors = load_file(path / "model.safetensors")
    records = _kv_round_trips(qm, calib[0])
    for i, kv in enumerate(qm.kv_layers):
        k_scale, v_scale = tensors[f"{kv.name}.k_scale"], tensors[f"{kv.name}.v_scale"]
        assert k_scale.shape == (1,) and k_scale.dtype == torch.float32
        assert (k_scale.item(), v_scale.item()) == (kv.key_scale, kv.value_scale)
        # compressed-tensors' own fake quantization with the exported scale reproduces the graph's round trip
        x, out, _, _ = records[2 * i]
        assert torch.equal(fake_quantize(x, k_scale, torch.zeros_like(k_scale), scheme), out)
    assert not any("qcompile_kv" in key for key in tensors)

    path = qcompile.export_hf(qm, tmp_path / "mo", format="modelopt", dtype=torch.float32)
    quant = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    assert quant["kv_cache_quant_algo"] == "FP8"
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    tensors = load_file(path / "model.safetensors")
    for kv in qm.kv_layers:
        assert tensors[f"{kv.name}.k_proj.k_scale"].item() == kv.key_scale
        assert tensors[f"{kv.name}.v_proj.v_scale"].item() == kv.value_scale


def test_nvfp4_kv_cache_exports_to_modelopt_and_is_refused_by_compressed_tensors(tmp_path):
    _, _, qm = _quantized("llama", "int8_dynamic", "nvfp4")
    with pytest.raises(qcompile.checkpoints.ExportError, match="format='modelopt'"):
        qcompile.export_hf(qm, tmp_path / "ct", format="compressed-tensors")
    # int8_dynamic has no Model Optimizer algorithm: an FP8 model with an NVFP4 cache instead
    model = hf_zoo.llama()
    calib = hf_zoo.batches("llama", count=2)
    qm = qcompile.quantize(model, "fp8", calib=calib, kv_cache="nvfp4", progress=False)
    path = qcompile.export_hf(qm, tmp_path / "mo", format="modelopt", dtype=torch.float32)
    assert json.loads((path / "hf_quant_config.json").read_text())["quantization"]["kv_cache_quant_algo"] == "NVFP4"
    tensors = load_file(path / "model.safetensors")
    kv = qm.kv_layers[0]
    assert tensors[f"{kv.key_projection}.k_scale"].item() == kv.key_scale
    assert kv.key_scale == pytest.approx(float(numerics.kv_cache_scale(torch.tensor(kv.key_scale * 6 * 448), "nvfp4")))


def test_kv_cache_errors():
    model = hf_zoo.llama()
    batch = hf_zoo.batches("llama", count=1)[0]
    with pytest.raises(ValueError, match="calib"):
        qcompile.quantize(model, "fp8_dynamic", example_kwargs=batch, kv_cache="fp8", progress=False)
    with pytest.raises(ValueError, match="unknown kv_cache"):
        qcompile.quantize(model, "fp8_dynamic", calib=[batch], kv_cache="int4", progress=False)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    with pytest.raises(ValueError, match="no attention"):
        qcompile.quantize(mlp, "fp8_dynamic", calib=[torch.randn(4, 16)], kv_cache="fp8", progress=False)
    with pytest.raises(ValueError, match="NaN or inf"):
        qcompile.quantize(_NaNKeys(), "fp8_dynamic", calib=[torch.randn(2, 8, 16)], kv_cache="fp8", progress=False)


class _NaNKeys(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        k = k / 0.0  # inf keys
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_decomposed_attention_keys_and_values_are_found():
    """softmax(q @ k^T * scale) @ v written out, as eager attention implementations do."""

    class Eager(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(16, 16) for _ in range(3))

        def forward(self, x):
            q, k, v = self.q(x), self.k(x), self.v(x)
            p = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
            return p @ v

    torch.manual_seed(0)
    model = Eager().eval()
    calib = [torch.randn(2, 6, 16) for _ in range(2)]
    qm = qcompile.quantize(model, "int8_dynamic", calib=calib, kv_cache="fp8", progress=False)
    assert [(kv.key_projection, kv.value_projection) for kv in qm.kv_layers] == [("k", "v")]
    x = torch.randn(2, 6, 16)
    records = []

    class Recorder(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            out = super().call_function(target, args, kwargs)
            if target is torch.ops.qcompile.kv_round_trip.default:
                records.append((args[0], out, args[1]))
            return out

    with torch.no_grad():
        out = Recorder(qm.graph_module).run(x)
    (k, k_rt, k_scale), (v, v_rt, v_scale) = records
    assert k.shape == v.shape == (2, 6, 16)  # the keys themselves, not their transpose
    assert torch.equal(k_rt, _fp8_round_trip_by_definition(k, k_scale))
    assert torch.equal(v_rt, _fp8_round_trip_by_definition(v, v_scale))
    plain = qcompile.quantize(model, "int8_dynamic", calib=calib, progress=False)
    assert not torch.equal(out, plain(x))


def test_a_change_of_dtype_keeps_the_float32_scales_exactly():
    model = hf_zoo.llama()
    calib = hf_zoo.batches("llama", count=2)
    qm = qcompile.quantize(model, "fp8", calib=calib, kv_cache="fp8", progress=False)
    from qcompile.model import _quantization_tensors

    def float32_values():  # the quantized layers' and the KV cache's float32 scales, wherever the graph keeps them
        tensors = [t for t in _quantization_tensors(qm.graph_module) if t.dtype == torch.float32]
        return torch.sort(torch.cat([t.reshape(-1) for t in tensors]))[0]

    before = float32_values()
    qm.to(torch.bfloat16)
    kv_scales = [t for name, t in qm.graph_module.named_buffers() if "qcompile_kv" in name]
    assert sorted(float(t) for t in kv_scales) == sorted(
        s for kv in qm.kv_layers for s in (kv.key_scale, kv.value_scale))
    assert torch.equal(float32_values(), before)
    assert sum(node.target is torch.ops.qcompile.kv_round_trip.default for node in qm.graph_module.graph.nodes) == 4
    assert qm(**calib[0]).logits.dtype == torch.bfloat16


def test_cli_kv_cache(tmp_path, capsys):
    from qcompile.cli import main

    folder = hf_zoo.model_folder(tmp_path / "model", hf_zoo.llama())
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    assert main(["quantize", str(folder), str(tmp_path / "out"), "--recipe", "fp8", "--format", "modelopt",
                 "--kv-cache", "fp8", "--calib", str(calib), "--calib-samples", "2", "--seq-len", "32"]) == 0
    assert "KV cache per token" in capsys.readouterr().out
    quant = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())["quantization"]
    assert quant["kv_cache_quant_algo"] == "FP8"
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert {k for k in tensors if k.endswith(("k_scale", "v_scale"))} == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj.k_scale", "v_proj.v_scale")}
    assert main(["quantize", str(folder), str(tmp_path / "x.onnx"), "--recipe", "fp8", "--format", "onnx",
                 "--kv-cache", "fp8"]) == 2
    assert "--kv-cache has no ONNX translation" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_decode_round_trip_equals_the_reference(dtype):
    from qcompile.lowering.cpu.fp8 import fp8_kv_round_trip

    torch.manual_seed(3)
    x = (torch.randn(2, 3, 7, 40) * torch.logspace(-6, 3, 40)).to(dtype)  # subnormal to saturated codes
    x[0, 0, 0] = 0.0
    for scale in (torch.tensor(0.01), torch.tensor(1.0), numerics.kv_cache_scale(x.float().abs().amax(), "fp8")):
        expected = numerics.fake_quantize_kv(x, "fp8", scale)
        assert torch.equal(fp8_kv_round_trip(x, scale), expected)
        assert torch.equal(torch.ops.qcompile.kv_round_trip(x, scale, "fp8"), expected)


@pytest.mark.parametrize("recipe", ["fp8_dynamic", "int8_sq"])
def test_backend_kv_cache_equals_quantize(recipe):
    """backend='quant' calibrates the keys and values on the converted graph (int8_sq folds scales into v_proj)
    and computes what qcompile.quantize computes, in the calibrated call and in cached decode steps."""
    from transformers import DynamicCache

    model = hf_zoo.llama()
    calib = hf_zoo.batches("llama", count=3)
    qm = qcompile.quantize(model, recipe, calib=calib, kv_cache="fp8", progress=False)
    plain = qcompile.quantize(model, recipe, calib=calib, progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="quant", options={"recipe": recipe, "kv_cache": "fp8", "compiler": "eager"})
    with pytest.raises(RuntimeError, match="never calibrated"):
        compiled(**calib[0])
    with qcompile.calibrate(compiled):
        for batch in calib:
            compiled(**batch)
    with torch.no_grad():
        out = compiled(**calib[0]).logits
        assert torch.equal(out, qm(**calib[0]).logits)
        assert not torch.equal(out, plain(**calib[0]).logits)
        prompt = calib[1]["input_ids"][:1, :5]
        caches = DynamicCache(), DynamicCache()
        steps = [compiled(input_ids=prompt, past_key_values=caches[0]), qm(input_ids=prompt, past_key_values=caches[1])]
        for _ in range(3):  # decode steps: graphs compiled anew for one token reuse the calibrated scales
            token = steps[1].logits[:, -1:].argmax(-1)
            steps = [compiled(input_ids=token, past_key_values=caches[0]),
                     qm(input_ids=token, past_key_values=caches[1])]
            torch.testing.assert_close(steps[0].logits, steps[1].logits, rtol=1e-5, atol=1e-5)


def test_compiled_quantized_model_keeps_the_kv_round_trip():
    _, calib, qm = _quantized("gpt2", "fp8_dynamic", "fp8")
    torch._dynamo.reset()
    compiled = torch.compile(qm)
    with torch.no_grad():
        expected = qm(**calib[1]).logits
        torch.testing.assert_close(compiled(**calib[1]).logits, expected, rtol=1e-5, atol=1e-5)


def test_compiled_generation_quantizes_the_cache_as_eager_generation_does():
    _, calib, qm = _quantized("llama", "fp8_dynamic", "fp8")
    _, _, plain = _quantized("llama", "fp8_dynamic", None)
    prompt = calib[2]["input_ids"][:1, :6]
    options = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    torch._dynamo.reset()
    compiled = qm.generate(prompt, compile=True, **options)
    eager = qm.generate(prompt, **options)
    without = plain.generate(prompt, **options)
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b, c in zip(compiled.logits, eager.logits, without.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert (b - c).abs().max() > 1e-4
