"""Safetensors shards written in memory and spilled to disk piece by piece hold the same tensors, as the safetensors
library reads them back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qcompile.checkpoints.shards import INDEX_FILE, ShardWriter


def _batches():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(33, 17, generator=g)
    return [
        {"embed.weight": torch.randn(40, 8, generator=g).to(torch.bfloat16)},
        {"layer.0.codes": torch.randint(0, 255, (7, 5), dtype=torch.uint8, generator=g),
         "layer.0.scale": torch.rand(7, generator=g),
         "layer.0.fp8": torch.randn(3, 16, generator=g).to(torch.float8_e4m3fn),
         "layer.0.tied": weight, "layer.0.tied_view": weight,  # sharing memory
         "layer.0.shape": torch.tensor([7, 10], dtype=torch.int32)},
        {},
        {"layer.1.big": torch.randn(300, 50, generator=g).to(torch.float16),  # larger than a shard
         "layer.1.norm": torch.ones(3, dtype=torch.bfloat16), "layer.1.scalar": torch.tensor(2.5)},
    ]


def _read(directory):
    files = sorted(directory.glob("*.safetensors"))
    out = {}
    for path in files:
        out.update(load_file(path))
    return files, out


@pytest.mark.parametrize("max_bytes", [10**9, 1500])
def test_spilled_shards_equal_in_memory_shards(tmp_path, max_bytes):
    written = {}
    for spill in (False, True):
        directory = tmp_path / str(spill)
        directory.mkdir()
        writer = ShardWriter(directory, max_bytes, spill=spill)
        for batch in _batches():
            writer.add(batch)
        writer.finish()
        assert not list(directory.glob(".*")), "piece or part files left behind"
        written[spill] = _read(directory)
        if len(written[spill][0]) > 1:
            index = json.loads((directory / INDEX_FILE).read_text())
            owner = index["weight_map"]
            for path in written[spill][0]:
                with safe_open(str(path), framework="pt") as f:
                    assert all(owner[key] == path.name for key in f.keys())
            assert sorted(owner) == sorted(written[spill][1])
            assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                          for t in written[spill][1].values())
        else:
            assert written[spill][0][0].name == "model.safetensors"
    expected = {k: v for batch in _batches() for k, v in batch.items()}
    for spill in (False, True):
        files, tensors = written[spill]
        assert sorted(tensors) == sorted(expected)
        for key, value in expected.items():
            assert tensors[key].dtype == value.dtype and tensors[key].shape == value.shape, key
            assert torch.equal(tensors[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key
    # same shard boundaries either way
    assert [p.name for p in written[False][0]] == [p.name for p in written[True][0]]
    if max_bytes == 1500:
        assert len(written[True][0]) >= 3


def test_spilled_tensors_leave_memory(tmp_path):
    """A spilled batch is on disk at once: the writer keeps no reference to it."""
    writer = ShardWriter(tmp_path, 10**9, spill=True)
    big = torch.randn(1000)
    writer.add({"a": big})
    assert all(not isinstance(item, torch.Tensor) for _, item in writer.pending)
    assert len(list(tmp_path.glob(".piece-*"))) == 1
    writer.finish()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["a"], big)


def test_no_directory_writes_nothing(tmp_path):
    writer = ShardWriter(None, 100, spill=True)
    writer.add({"a": torch.ones(3)})
    writer.finish()
    assert not list(tmp_path.iterdir())
