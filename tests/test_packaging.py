"""Packaging: the torch_dynamo_backends entry point, backend="quant" without importing qcompile, the wheel layout."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_entry_point_resolves_to_the_backend():
    points = [ep for ep in importlib.metadata.entry_points(group="torch_dynamo_backends") if ep.name == "quant"]
    assert len(points) == 1
    assert points[0].value == "qcompile.backend:quant_backend"
    from qcompile.backend import quant_backend

    assert points[0].load() is quant_backend


SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(4, 32)
    assert "qcompile" not in sys.modules, "imported before compiling"
    compiled = torch.compile(model, backend="quant", options={"recipe": "int8_dynamic", "compiler": "eager"})
    with torch.no_grad():
        y, y_float = compiled(x), model(x)
    error = ((y - y_float).norm() / y_float.norm()).item()
    # Per-token INT8 activations and per-channel INT8 weights: about 1% error, never 0 (that would be float).
    assert 1e-4 < error < 0.05, error
    assert "quant" in torch._dynamo.list_backends(exclude_tags=())
    print("OK", error, "qcompile" in sys.modules)
    """
)


def test_backend_works_without_importing_qcompile(tmp_path):
    script = tmp_path / "jit.py"
    script.write_text(SUBPROCESS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    # The script never imports qcompile; torch loads it through the entry point when the backend is first used.
    assert line.startswith("OK") and line.endswith("True"), result.stdout


def _can_build_wheels() -> bool:
    if importlib.util.find_spec("setuptools") is None:
        return False
    if importlib.util.find_spec("wheel") is not None:
        return True
    return importlib.util.find_spec("setuptools.command.bdist_wheel") is not None  # setuptools >= 70.1


@pytest.mark.skipif(not _can_build_wheels(), reason="building a wheel needs setuptools (with bdist_wheel) or wheel")
def test_wheel_layout(tmp_path):
    # Build from a copy so that build/ and *.egg-info never land in the working tree.
    source = tmp_path / "src"
    skip = {".git", ".venv", "build", "dist", "tests", "benchmarks", ".hypothesis", ".pytest_cache", "out"}
    shutil.copytree(
        REPO,
        source,
        ignore=lambda d, names: [n for n in names if n in skip or n.endswith(".egg-info") or n == "__pycache__"]
        if Path(d) == REPO
        else [n for n in names if n == "__pycache__"],
    )
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", ".", "-w", str(tmp_path / "wheels")],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0 and "No module named" in (result.stdout + result.stderr):
        pytest.skip("the build backend is incomplete here: " + (result.stdout + result.stderr)[-500:])
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    wheels = list((tmp_path / "wheels").glob("qcompile-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "qcompile/__init__.py" in names
    assert "qcompile/passes/find_linears.py" in names
    assert "qcompile/lowering/torch_reference.py" in names
    assert any(n.startswith("qcompile/passes/") for n in names) and any(n.startswith("qcompile/lowering/") for n in names)
    for folder, package in (("qcompile", "qcompile"), ("passes", "qcompile/passes"), ("lowering", "qcompile/lowering")):
        for path in (REPO / folder).rglob("*.py"):  # every source file of every subpackage ships
            assert f"{package}/{path.relative_to(REPO / folder).as_posix()}" in names, path
    top_level = {n.split("/", 1)[0] for n in names}
    assert "passes" not in top_level and "lowering" not in top_level, sorted(top_level)
    assert not any(n.startswith("tests/") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheels[0]).read(entry_points).decode()
    assert "[torch_dynamo_backends]" in text and "quant = qcompile.backend:quant_backend" in text


def test_import_loads_neither_dynamo_nor_inductor():
    """`import qcompile` stays cheap: the lowerings (which pull in inductor) register on the first op call."""
    script = ("import sys, qcompile\n"
              "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'torch._inductor.lowering', 'transformers',"
              " 'onnx', 'triton') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
