"""Streaming captures each structure of decoder layer once (`qcompile.streaming._LayerGraphs`): the later layers of
that structure get the first one's graph, reading their own tensors at their own paths
(`qcompile.capture.GraphTemplate`). tests/test_streaming.py checks that the streamed tensors and their names equal the
whole model's bit for bit (every model there has a second layer that reuses the first one's graph); these check that
the reuse happens, and only where the structures match."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import hf_zoo  # noqa: E402

from qcompile.capture import module_tree  # noqa: E402
from qcompile.streaming import _Block, _structure, quantize_checkpoint  # noqa: E402


def _watch_exports(monkeypatch) -> list[str]:
    """The class names of the modules torch.export captures from now on."""
    capture = sys.modules["qcompile.capture"]
    exported: list[str] = []
    export = capture.export_program

    def counting(model, args, kwargs):
        exported.append(type(model).__name__)
        return export(model, args, kwargs)

    monkeypatch.setattr(capture, "export_program", counting)
    return exported


def test_later_layers_reuse_the_first_layers_graph(tmp_path, monkeypatch):
    folder = hf_zoo.model_folder(tmp_path / "source", hf_zoo.llama(), with_tokenizer=False)
    exported = _watch_exports(monkeypatch)
    quantize_checkpoint(folder, tmp_path / "out", "fp8", hf_zoo.batches("llama"), progress=False)
    assert exported.count("_Block") == 1


def test_layers_of_another_structure_are_captured_apart(tmp_path, monkeypatch):
    """Qwen2 with sliding-window attention from its second layer on: two structures of layer, two captures."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = hf_zoo._build(Qwen2Config, Qwen2ForCausalLM, 0, torch.float32, **{**hf_zoo.SIZES, "num_hidden_layers": 3},
                          use_sliding_window=True, sliding_window=8, max_window_layers=1)
    folder = hf_zoo.model_folder(tmp_path / "source", model, with_tokenizer=False)
    exported = _watch_exports(monkeypatch)
    quantize_checkpoint(folder, tmp_path / "out", "fp8_dynamic", hf_zoo.batches("llama"), progress=False)
    assert exported.count("_Block") == 2


def test_the_structure_key_tells_apart_what_the_graph_depends_on():
    """Equal for two layers of a model (each in its own module tree, with its own copy of the config, another
    `layer_idx`); different where a setting, a tensor's dtype or an input's dtype differs."""
    model = hf_zoo.llama()
    first, second, changed = (module_tree(_Block(i, model.model.layers[i])).layer for i in (0, 1, 1))
    call = (torch.zeros(1, 4, 64), None)
    assert _structure(first, call, {}) == _structure(second, call, {})
    changed.self_attn.scaling *= 2
    assert _structure(changed, call, {}) != _structure(first, call, {})
    assert _structure(copy.deepcopy(first).to(torch.bfloat16), call, {}) != _structure(first, call, {})
    assert _structure(first, (torch.zeros(1, 4, 64, dtype=torch.bfloat16), None), {}) != _structure(first, call, {})
