"""QuantizedModel checkpoints (safetensors + JSON), torch.export of a QuantizedModel, and torch.compile of one."""

from __future__ import annotations

import json
import os

import pytest
import safetensors
import torch
from torch.export import Dim

import qcompile as qc
from simulation import bert_batch, mlp_batch, primary_output, rel, tiny_bert, tiny_llama, tiny_mlp, token_batch

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


def _mlp(recipe):
    model = tiny_mlp()
    calib = [mlp_batch(2, 8, 100 + i) for i in range(3)]
    return qc.quantize(model, recipe, calib=calib, progress=False), mlp_batch(3, 5, 7)


def _assert_checkpoint_files(directory):
    names = sorted(os.listdir(directory))
    assert names, "empty checkpoint"
    assert any(n.endswith(".safetensors") for n in names) and any(n.endswith(".json") for n in names)
    for name in names:
        path = os.path.join(directory, name)
        assert os.path.isfile(path), f"unexpected entry {name}"
        assert not name.endswith(PICKLE_SUFFIXES), f"pickle-style file {name}"
        with open(path, "rb") as f:
            assert f.read(2) != b"PK", f"{name} is a zip archive (torch.save format)"
        if name.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                json.load(f)
        elif name.endswith(".safetensors"):
            with safetensors.safe_open(path, framework="pt") as f:
                list(f.keys())
        else:
            pytest.fail(f"checkpoint holds a file that is neither JSON nor safetensors: {name}")


@pytest.mark.parametrize("recipe", ["nvfp4", "int4_awq", "fp8", "int8_sq"])
def test_save_load_round_trip_is_bit_identical(tmp_path, recipe):
    qm, x = _mlp(recipe)
    qm.save(tmp_path / "ckpt")
    _assert_checkpoint_files(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging directory left behind

    loaded = qc.load(tmp_path / "ckpt")
    assert isinstance(loaded, qc.QuantizedModel)
    with torch.no_grad():
        assert torch.equal(loaded(x), qm(x))
        x2 = mlp_batch(4, 11, 8)  # yet another shape: the loaded program keeps its dynamic dims
        assert torch.equal(loaded(x2), qm(x2))
    assert loaded.recipe == qm.recipe
    assert loaded.algorithm == qm.algorithm
    assert [vars(a) for a in loaded.layers] == [vars(b) for b in qm.layers]
    assert loaded.report() == qm.report()


def test_checkpoint_stores_packed_weights_not_float_ones(tmp_path):
    qm, _ = _mlp("int4_awq")
    qm.save(tmp_path / "ckpt")
    float_params = sum(p.numel() for p in tiny_mlp().parameters())
    size = sum(os.path.getsize(tmp_path / "ckpt" / n) for n in os.listdir(tmp_path / "ckpt") if n.endswith(".safetensors"))
    # 4-bit weights + scales + float biases and the example input: well under the 4 bytes/parameter of float32.
    assert size < 0.5 * 4 * float_params


def test_bert_with_kwargs_round_trip(tmp_path):
    model = tiny_bert()
    calib = [bert_batch(2, 8, 100 + i) for i in range(3)]
    qm = qc.quantize(model, "nvfp4", calib=calib, progress=False)
    qm.save(tmp_path / "bert")
    _assert_checkpoint_files(tmp_path / "bert")
    loaded = qc.load(tmp_path / "bert")
    x = bert_batch(3, 5, 7)
    with torch.no_grad():
        out, out_loaded = qm(**x), loaded(**x)
    assert torch.equal(out_loaded.last_hidden_state, out.last_hidden_state)
    assert torch.equal(out_loaded.pooler_output, out.pooler_output)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_round_trip(tmp_path, tied):
    """A causal LM: non-persistent buffers (rotary inv_freq) and, when tied, embeddings sharing lm_head's weight."""
    model = tiny_llama()
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    calib = [token_batch(2, 8, 100 + i) for i in range(3)]
    qm = qc.quantize(model, "int4_gptq", calib=calib, progress=False)
    qm.save(tmp_path / "llama")
    _assert_checkpoint_files(tmp_path / "llama")
    loaded = qc.load(tmp_path / "llama")
    x = token_batch(3, 5, 7)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, qm(x).logits)


def test_save_over_an_existing_checkpoint(tmp_path):
    first, x = _mlp("fp8")
    second, _ = _mlp("nvfp4_weight_only")
    target = tmp_path / "ckpt"
    first.save(target)
    second.save(target)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    loaded = qc.load(target)
    assert loaded.recipe.name == "nvfp4_weight_only"
    with torch.no_grad():
        assert torch.equal(loaded(x), second(x))
        assert not torch.equal(loaded(x), first(x))


def test_save_into_an_empty_existing_directory(tmp_path):
    qm, x = _mlp("int8_dynamic")
    (tmp_path / "empty").mkdir()
    qm.save(tmp_path / "empty")
    with torch.no_grad():
        assert torch.equal(qc.load(tmp_path / "empty")(x), qm(x))


def test_save_refuses_a_foreign_non_empty_directory(tmp_path):
    qm, _ = _mlp("int8_dynamic")
    target = tmp_path / "data"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises((FileExistsError, ValueError), match="not a qcompile checkpoint"):
        qm.save(target)
    assert sorted(os.listdir(target)) == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["data"]  # the staged copy was cleaned up


def test_load_rejects_a_directory_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError)):
        qc.load(tmp_path)


@pytest.mark.parametrize("recipe", ["nvfp4", "int4_awq"])
def test_torch_export_of_a_quantized_model(recipe):
    qm, x = _mlp(recipe)
    dims = {0: Dim("batch", min=2, max=64), 1: Dim("seq", min=2, max=128)}
    program = torch.export.export(qm, (x,), dynamic_shapes={"args": (dims,)})  # forward(*args, **kwargs)
    # The quantized layers stay single qcompile:: ops in the exported graph.
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum(t.startswith("qcompile.") for t in targets) == 3
    assert not any("aten.linear" in t or "aten.addmm" in t or "aten.mm" in t for t in targets)
    exported = program.module()
    with torch.no_grad():
        assert torch.equal(exported(x), qm(x))
        x2 = mlp_batch(6, 9, 3)
        assert torch.equal(exported(x2), qm(x2))


def test_torch_compile_of_a_quantized_model_with_inductor():
    qm, x = _mlp("nvfp4")
    compiled = torch.compile(qm)  # default backend (inductor), default grad mode
    for inputs in (x, mlp_batch(4, 7, 3)):
        y = compiled(inputs)
        with torch.no_grad():
            expected = qm(inputs)
        # Inductor fuses the GELU/Tanh between the (opaque) quantized ops: equal up to float32 rounding.
        assert rel(y, expected) < 1e-5


def test_bert_output_structure_is_kept():
    model = tiny_bert()
    qm = qc.quantize(model, "fp8_dynamic", example_kwargs=bert_batch(2, 8, 1), progress=False)
    with torch.no_grad():
        out = qm(**bert_batch(3, 5, 7))
    assert type(out) is type(model(**bert_batch(2, 8, 1)))
    assert primary_output(out).shape == (3, 5, 64) and out.pooler_output.shape == (3, 64)
