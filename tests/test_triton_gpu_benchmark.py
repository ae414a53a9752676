"""The CPU-side logic of benchmarks/gpu.py: clean exit without CUDA, the model it times, its tables and targets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("qcompile_gpu_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exits_cleanly_without_cuda(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert bench.main(["--json", str(out)]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not out.exists()


def test_rejects_unknown_recipes(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--recipes", "int4_awq,nope"])


def test_decode_step_continues_the_prefill(bench):
    """The decode step over a KV cache gives the logits the prefill gives at the same position."""
    c = bench.LlamaConfig(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96, vocab=50, max_positions=32)
    model = bench.build_model(c, "cpu", torch.float32)
    prefill, step, past_k, past_v = bench.model_inputs(c, "cpu", prefill_len=9, past_len=5, dtype=torch.float32)
    assert past_k.shape == (2, 1, 2, 5, 16) and step.shape == (1, 1)
    with torch.no_grad():
        full = model(prefill)
        k, v = model.kv_cache(prefill[:, :8])
        stepped = model(prefill[:, 8:9], k, v)
        assert model(step, past_k, past_v).shape == (1, 1, 50)
    torch.testing.assert_close(stepped[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


def test_tables_and_targets(bench):
    kernels = [
        {"kernel": "fp8 GEMM (triton)", "shape": "4096x4096x4096", "ms": 0.2, "tflops": 687.2,
         "baseline": "torch._scaled_mm", "baseline_ms": 0.19, "speedup": 0.95, "vs_cublas": 0.95},
        {"kernel": "int4 g128 weight-only GEMV", "shape": "1x14336x4096", "ms": 0.013, "gbps": 2300.0,
         "copy_fraction": 0.75, "baseline": "bf16 matmul", "baseline_ms": 0.04, "speedup": 3.1},
        {"kernel": "int4 g128 weight-only GEMV", "shape": "1x4096x4096", "ms": 0.008, "gbps": 1100.0,
         "copy_fraction": 0.35},  # small layer: shown, not judged
        {"kernel": "nvfp4 weight-only GEMV", "shape": "1x4096x14336", "ms": 0.02, "gbps": 1500.0,
         "copy_fraction": 0.5},
    ]
    e2e = [
        {"name": "bf16 inductor", "prefill_ms": 10.0, "decode_ms": 1.5, "decode_graph_ms": 1.2},
        {"name": "int4_awq", "prefill_ms": 12.0, "decode_ms": 3.0, "decode_graph_ms": 0.4, "decode_speedup": 0.5,
         "decode_graph_speedup": 3.0, "prefill_speedup": 0.83, "logits_cos": 0.99},
        {"name": "nvfp4_weight_only", "note": "skipped: time budget"},
    ]
    targets = bench.evaluate_targets({"kernels": kernels, "end_to_end": e2e})
    assert targets["fp8_gemm_vs_cublas_4096"]["met"] is True
    assert targets["int4_gemv_fraction_of_copy_bw"] == {"target": 0.7, "measured": 0.75, "met": True}
    assert targets["nvfp4_gemv_fraction_of_copy_bw"]["met"] is False
    assert targets["decode_speedup_int4_awq"]["measured"] == 3.0
    assert targets["decode_speedup_nvfp4_weight_only"]["met"] is None
    text = bench.format_kernel_table(kernels) + bench.format_e2e_table(e2e) + bench.format_targets(targets)
    assert "MISSED" in text and "not measured" in text and "skipped: time budget" in text
