"""Hugging Face models as `from_pretrained` returns them (tests/hf_zoo.py: default configs, tiny sizes).

References: the float model itself (outputs close, in its dtype), transformers' own code (fused MoE experts,
generation by full recomputation), and a fresh process for saved checkpoints.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_zoo
import qcompile
from qcompile.moe import UnfusedExperts, is_fused_experts
from qcompile.quantized_modules import QuantizedLinear

RECIPES = ("fp8_dynamic", "int8_sq", "int4_awq", "nvfp4")
# Relative error of the model's main output against the float model's on random-weight models of two layers; the
# bound per recipe is loose (random weights spread errors evenly); what it catches is a wrong or unquantized graph.
BOUND = {"fp8_dynamic": 0.12, "int8_sq": 0.12, "int4_awq": 0.4, "nvfp4": 0.4}
# A model in fp32 and in bf16 runs a different recipe each, so that every recipe meets every dtype across models.
CASES = [(name, dtype, RECIPES[(i + (2 if dtype == torch.bfloat16 else 0)) % len(RECIPES)])
         for i, name in enumerate(hf_zoo.MODELS) for dtype in (torch.float32, torch.bfloat16)]


def main_output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def expected_layers(model: torch.nn.Module) -> int:
    """Linear layers outside the default exclusions (lm_head, embeddings, routers), fused experts unfused."""
    count = 0
    for name, module in model.named_modules():
        if qcompile.RECIPES["fp8"].excludes(name):
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            count += 1
        elif is_fused_experts(module):
            count += module.num_experts * (3 if hasattr(module, "gate_up_proj") else 2)
    return count


@functools.lru_cache(maxsize=None)
def quantized(name: str, recipe: str, dtype: torch.dtype = torch.float32):
    """(float model, calibration batches, quantized model), built once per combination for the tests that only
    read them (none of them may change the model)."""
    model = hf_zoo.MODELS[name](dtype=dtype)
    batches = hf_zoo.batches(name)
    return model, batches, qcompile.quantize(model, recipe, calib=batches, progress=False)


@pytest.mark.parametrize("name,dtype,recipe", CASES, ids=[f"{n}-{str(d)[6:]}-{r}" for n, d, r in CASES])
def test_quantize_default_config(name, dtype, recipe):
    model, batches, qm = quantized(name, recipe, dtype)
    assert len(qm.layers) == expected_layers(model) > 0
    out, ref = main_output(qm(**batches[1])), main_output(model(**batches[1]))
    assert out.dtype == dtype
    error = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert 0 < error < BOUND[recipe], error
    routers = [layer.name for layer in qm.layers if layer.name.endswith((".gate", "shared_expert_gate"))]
    assert not routers


def greedy_by_recomputation(forward, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    sequence = prompt
    for _ in range(steps):
        logits = main_output(forward(sequence))
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequence


# the decoders with the recipe they run in fp32 above (their quantized models are shared)
GENERATE = [(name, recipe) for name, dtype, recipe in CASES if name in hf_zoo.DECODERS and dtype == torch.float32]


@pytest.mark.parametrize("name,recipe", GENERATE, ids=[f"{n}-{r}" for n, r in GENERATE])
def test_generate_equals_recomputation(name, recipe):
    model, batches, qm = quantized(name, recipe)
    tree = qm.as_module()
    assert sum(isinstance(m, QuantizedLinear) for m in tree.modules()) == len(qm.layers)
    prompt = batches[0]["input_ids"][:, :5]
    generated = qm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    # the captured graph, fed the whole sequence at every step (no cache): an independent path through the ops
    assert torch.equal(generated, greedy_by_recomputation(lambda s: qm(input_ids=s), prompt, 8))
    # the cache-free model code and the graph agree on logits; the float model does not (the layers are quantized)
    sequence = generated[:, :-1]
    graph_logits = qm(input_ids=sequence).logits
    tree_logits = qm(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits
    torch.testing.assert_close(tree_logits, graph_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(input_ids=sequence).logits, graph_logits, atol=1e-4)


def test_generate_batch_with_padding_bf16():
    model = hf_zoo.llama(dtype=torch.bfloat16)
    qm = qcompile.quantize(model, "int4_awq", calib=hf_zoo.batches("llama"), progress=False)
    prompt = torch.tensor([[0, 0, 5, 9, 17], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    model.generation_config.pad_token_id = 0
    qm.as_module().generation_config.pad_token_id = 0
    out = qm.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False)
    sequence = prompt
    for _ in range(6):  # recomputation with the mask extended, no cache
        mask_now = torch.cat([mask, torch.ones(2, sequence.shape[1] - 5, dtype=mask.dtype)], dim=1)
        logits = qm(input_ids=sequence, attention_mask=mask_now).logits
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, sequence)
    # the padded row decodes as the unpadded prompt alone would
    alone = qm.generate(prompt[:1, 2:], max_new_tokens=6, do_sample=False)
    assert torch.equal(out[0, 2:], alone[0])


def test_to_dtype_keeps_quantized_tensors():
    model = hf_zoo.llama()
    batches = hf_zoo.batches("llama")
    qm = qcompile.quantize(model, "int8_sq", calib=batches, progress=False)
    scales = {n: t.clone() for n, t in qm.graph_module.named_buffers() if n.endswith("scale")}
    reference = qm(**batches[1]).logits
    qm.to(torch.bfloat16)
    out = qm(**batches[1]).logits
    assert out.dtype == torch.bfloat16
    kept = {n: t for n, t in qm.graph_module.named_buffers() if n.endswith("scale")}
    assert len(kept) == len(scales) and all(t.dtype == torch.float32 for t in kept.values())
    assert ((out.float() - reference).norm() / reference.norm()).item() < 0.05
    assert qm.generate(batches[0]["input_ids"][:, :4], max_new_tokens=3, do_sample=False).shape == (2, 7)


def test_fused_experts_unfused_equal_transformers_eager():
    for build in (hf_zoo.mixtral, hf_zoo.qwen2_moe):
        model = build()
        fused = next(m for m in model.modules() if is_fused_experts(m))
        model.config._experts_implementation = "eager"
        tokens = torch.randn(7, 64)
        index = torch.tensor([[0, 1], [1, 2], [3, 0], [0, 2], [1, 3], [2, 0], [1, 0]])
        weights = torch.rand(7, 2)
        assert torch.equal(UnfusedExperts(fused)(tokens, index, weights), fused(tokens, index, weights))


def test_experts_without_calibration_tokens():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**hf_zoo.SIZES, num_local_experts=8, num_experts_per_tok=1)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qm = qcompile.quantize(model, "fp8", calib=[{"input_ids": torch.tensor([[3, 5]])}], progress=False)
    assert any("saw no calibration token" in str(w.message) for w in caught)
    unseen = [layer for layer in qm.layers if layer.calibration]
    # two tokens reach at most 2 of 8 experts per layer: at least 6 experts x 3 projections x 2 layers go without
    assert len(unseen) >= 36 and all(".experts." in layer.name for layer in unseen)
    assert "calibrated otherwise" in qm.report() and "in MoE experts" in qm.report()
    x = torch.randint(0, 128, (1, 9))
    assert torch.isfinite(qm(input_ids=x).logits).all()


def test_calibration_input_checks():
    model = hf_zoo.llama()
    ids = torch.randint(0, 128, (2, 8))
    one = qcompile.quantize(model, "fp8", calib=ids, progress=False)  # a bare tensor is one batch
    listed = qcompile.quantize(model, "fp8", calib=[ids], progress=False)
    assert torch.equal(one(ids).logits, listed(ids).logits)
    bad = [{"input_ids": ids}, {"input_ids": ids}, {"input_ids": ids[..., None].expand(2, 8, 3)}]
    with pytest.raises(ValueError, match=r"calibration batch 2 \(input_ids=Tensor\[2, 8, 3\] int64\).*"
                                         r"captured for \(input_ids=Tensor\[2, 8\] int64\)"):
        qcompile.quantize(model, "int8_sq", calib=bad, progress=False)


LOAD_IN_FRESH_PROCESS = """
import json, sys, torch, qcompile
from safetensors.torch import load_file
for directory in sys.argv[1:]:
    qm = qcompile.load(directory)
    inputs = load_file(directory + "-inputs.safetensors")
    out = qm(**inputs)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    expected = load_file(directory + "-expected.safetensors")["out"]
    print(json.dumps({"dir": directory, "equal": bool(torch.equal(out, expected))}))
"""


def test_save_load_in_fresh_process(tmp_path):
    directories = []
    for name, recipe, dtype in (("llama", "int8_sq", torch.float32), ("t5", "int4_awq", torch.float32),
                                ("mixtral", "nvfp4", torch.bfloat16), ("vit", "fp8_dynamic", torch.bfloat16)):
        model = hf_zoo.MODELS[name](dtype=dtype)
        batches = hf_zoo.batches(name)
        qm = qcompile.quantize(model, recipe, calib=batches, progress=False)
        directory = str(tmp_path / name)
        qm.save(directory)
        save_file(batches[1], directory + "-inputs.safetensors")
        save_file({"out": main_output(qm(**batches[1])).contiguous()}, directory + "-expected.safetensors")
        directories.append(directory)
    result = subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, *directories],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["dir"] for line in lines] == directories and all(line["equal"] for line in lines), lines


def test_load_refuses_edited_checkpoint(tmp_path):
    model = hf_zoo.llama()
    qm = qcompile.quantize(model, "int4_awq", calib=hf_zoo.batches("llama"), progress=False)
    qm.save(tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("_scale"))
    edited = dict(tensors)
    edited[name] = tensors[name].to(torch.float16)
    save_file(edited, weights)
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor '{name}' is torch.float16"):
        qcompile.load(tmp_path / "ck")
    edited = dict(tensors)
    del edited[name]
    save_file(edited, weights)
    with pytest.raises(ValueError, match=rf"tensor '{name}' is missing"):
        qcompile.load(tmp_path / "ck")
    edited = dict(tensors)
    edited[name] = tensors[name][:-1]
    save_file(edited, weights)
    with pytest.raises(ValueError, match=rf"tensor '{name}' is .* the program expects"):
        qcompile.load(tmp_path / "ck")
    save_file(tensors, weights)
    assert isinstance(qcompile.load(tmp_path / "ck"), qcompile.QuantizedModel)


def test_sizes_the_graph_was_not_captured_for():
    """Batch 1 and single tokens, after a batch-2 capture (the model's code branches on both): the calls run the
    same quantized layers through the model's own code; rows are independent under per-token scales."""
    model = hf_zoo.llama()
    qm = qcompile.quantize(model, "int8_dynamic", calib=hf_zoo.batches("llama"), progress=False)
    x = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    full = qm(input_ids=x).logits
    torch.testing.assert_close(qm(input_ids=x[:1]).logits, full[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qm(input_ids=x[:, :1]).logits, full[:, :1], rtol=1e-5, atol=1e-5)


def test_encoder_decoder_generate_equals_recomputation():
    model = hf_zoo.t5()
    batches = hf_zoo.batches("t5")
    qm = qcompile.quantize(model, "int8_sq", calib=batches, progress=False)
    source = batches[0]["input_ids"]
    generated = qm.generate(source, max_new_tokens=6, do_sample=False)
    sequence = generated[:, :1]  # the decoder start token
    for _ in range(6):  # the captured graph (encoder and decoder) on the whole sequence at every step
        logits = qm(input_ids=source, decoder_input_ids=sequence).logits
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, sequence)


def test_moe_onnx_export(tmp_path):
    pytest.importorskip("onnxruntime")
    from qcompile.lowering.onnx import onnxruntime_session

    model = hf_zoo.mixtral()
    batches = hf_zoo.batches("mixtral")
    qm = qcompile.quantize(model, "int8_dynamic", calib=batches, progress=False)
    qcompile.export_onnx(qm, tmp_path / "mixtral.onnx")
    session = onnxruntime_session(tmp_path / "mixtral.onnx")
    out = session.run(None, {"input_ids": batches[1]["input_ids"].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), qm(**batches[1]).logits, rtol=1e-4, atol=1e-4)


class _ListExperts(torch.nn.Module):
    """An MoE block with its experts as a ModuleList of linears (the layout of older checkpoints)."""

    def __init__(self, hidden=32, inner=48, experts=4, top_k=2):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = torch.nn.ModuleList(
            torch.nn.ModuleDict({"w1": torch.nn.Linear(hidden, inner, bias=False),
                                 "w2": torch.nn.Linear(inner, hidden, bias=False)}) for _ in range(experts))
        self.top_k = top_k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = torch.topk(torch.softmax(self.gate(flat), dim=-1), self.top_k, dim=-1)
        out = torch.zeros_like(flat)
        for index, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == index)
            hidden = expert["w2"](torch.nn.functional.silu(expert["w1"](flat[token])))
            out.index_add_(0, token, hidden * weights[token, slot, None])
        return out.reshape(x.shape)


def test_module_list_experts():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), _ListExperts()).eval()
    calib = [torch.randn(2, 6, 16) for _ in range(3)]
    qm = qcompile.quantize(model, "int8_sq", calib=calib, progress=False)
    names = sorted(layer.name for layer in qm.layers)
    assert names == sorted(["0", *(f"1.experts.{e}.{w}" for e in range(4) for w in ("w1", "w2"))])  # router kept
    x = torch.randn(3, 5, 16)
    error = ((qm(x) - model(x)).norm() / model(x).norm()).item()
    assert 0 < error < 0.05
