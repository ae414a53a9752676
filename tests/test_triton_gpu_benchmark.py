"""The CPU-side logic of benchmarks/gpu.py and gpu_check.sh: clean exit without CUDA, the model it times, the goals
and the summary table, and a dry run of the whole check on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
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


def test_goals_and_summary(bench):
    """The goals are judged on the rows they name: GEMVs at M = 1 on the MLP layers (the worst), W4 prefill on every
    layer, decode on CUDA graphs, host time on the twin calls."""
    layers = [
        {"layer": "gate/up", "format": "int4", "m": 1, "shape": "1x14336x4096", "ms": 0.01, "copy_fraction": 0.7,
         "vs_bf16": 2.5},
        {"layer": "down", "format": "int4", "m": 1, "shape": "1x4096x14336", "ms": 0.01, "copy_fraction": 0.55,
         "vs_bf16": 2.2},
        {"layer": "q/o", "format": "int4", "m": 1, "shape": "1x4096x4096", "ms": 0.01, "copy_fraction": 0.2,
         "vs_bf16": 1.1},  # a small layer: shown, not judged
        {"layer": "q/o", "format": "int4", "m": 2048, "shape": "2048x4096x4096", "ms": 1.0, "vs_bf16": 0.95,
         "copy_fraction": 0.1},
        {"layer": "k/v", "format": "nvfp4", "m": 2048, "shape": "2048x1024x4096", "ms": 1.0, "vs_bf16": 0.8,
         "copy_fraction": 0.1},
        {"layer": "down", "format": "nvfp4", "note": "failed: RuntimeError"},
    ]
    decode = [
        {"name": "bf16", "eager_ms": 3.0, "graph_ms": 1.5},
        {"name": "int4_awq", "eager_ms": 5.0, "graph_ms": 0.75, "graph_speedup": 2.0, "host_us_per_linear": 9.0},
        {"name": "fp8_dynamic", "note": "skipped: time budget"},
    ]
    host = [{"format": "int4", "public_us": 30.0, "twin_us": 12.0}, {"format": "int8", "public_us": 25.0}]
    goals = bench.evaluate_goals({"layers": layers, "decode": decode, "host": host})
    assert set(goals) == set(bench.GOALS)
    assert goals["int4 GEMV M=1, fraction of copy BW"] == {"goal": 0.6, "measured": 0.55, "met": False,
                                                           "where": "down 1x4096x14336"}
    assert goals["int4 GEMV M=1, x bf16"]["measured"] == 2.2 and goals["int4 GEMV M=1, x bf16"]["met"] is True
    assert goals["nvfp4 GEMV M=1, fraction of copy BW"]["met"] is None
    assert goals["W4 prefill M=2048, x bf16"]["measured"] == 0.8
    assert goals["W4 prefill M=2048, x bf16"]["where"] == "k/v 2048x1024x4096"
    assert goals["decode int4_awq, x bf16"]["met"] is True
    assert goals["decode fp8_dynamic, x bf16"]["met"] is None
    host_goal = goals["host us per quantized linear"]
    assert host_goal["measured"] == 25.0 and host_goal["met"] is False  # int8 has no twin: its public op counts
    text = bench.format_summary({"goals": goals, "cuda_tests": "104 passed in 90s"})
    assert "MISSED" in text and "not measured" in text and "104 passed" in text
    assert bench.format_layer_table(layers).count("\n") == len(layers) + 1
    assert "skipped: time budget" in bench.format_decode_table(decode)


def test_dry_run_of_the_check_script(tmp_path):
    """benchmarks/gpu_check.sh with DRY_RUN=1: every step on the CPU, and one summary table with every goal."""
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, BENCH_RECIPES="int8_dynamic")
    script = PATH.parent / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout[proc.stdout.index("summary (goals of issue 26)"):]
    for goal in (*GOALS_EXPECTED, "CUDA correctness tests"):
        assert goal in summary, goal
    assert "tests collected" in summary
    result = json.loads((tmp_path / "gpu_benchmark.json").read_text())
    assert result["dry_run"] is True
    layers = {(r["layer"], r["format"], r["m"]) for r in result["layers"] if "ms" in r}
    for name in ("q/o", "k/v", "gate/up", "down"):
        for fmt in ("bf16 cuBLAS", "int4", "nvfp4", "fp8", "int8"):
            for m in (1, 16, 32):
                assert (name, fmt, m) in layers
    assert [r["format"] for r in result["host"]] == ["int4", "nvfp4", "fp8", "int8"]
    assert [r["name"] for r in result["decode"]] == ["bf16", "int8_dynamic"]
    assert result["decode"][1]["logits_cos"] > 0.99
    for name in ("env.txt", "gpu_tests.log", "gpu_benchmark.log"):
        assert (tmp_path / name).exists()


GOALS_EXPECTED = (
    "int4 GEMV M=1, fraction of copy BW", "int4 GEMV M=1, x bf16", "nvfp4 GEMV M=1, fraction of copy BW",
    "W4 prefill M=2048, x bf16", "decode int4_awq, x bf16", "decode nvfp4_weight_only, x bf16",
    "decode fp8_dynamic, x bf16", "decode int8_dynamic, x bf16", "host us per quantized linear",
)
