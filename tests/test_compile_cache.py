"""qcompile's code in torch.compile's cache keys (qcompile.lowering.compile_cache).

A graph of `qcompile::` ops compiles to whatever qcompile's decompositions choose, and torch's on-disk caches key
it on the op names only. The end-to-end test plays an upgrade: a graph is compiled and cached, then the
decomposition changes (here: its float path made recognisable) and the fingerprint with it; the next compile must
run the new decomposition, not the cached graph. A control with the fingerprint unchanged shows that the cache
would otherwise serve the old graph (so the test can fail).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qcompile as qc
from qcompile.lowering import compile_cache
from qcompile.lowering.cpu import int8 as cpu_int8


def test_source_digest_follows_every_source_file_and_nothing_else(tmp_path: Path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "k.c").write_text("int f(void) { return 1; }\n")
    before = compile_cache.source_digest([("pkg", tmp_path)])
    assert len(before) == 16 and int(before, 16) >= 0

    (tmp_path / "notes.txt").write_text("not code")
    (tmp_path / "a.cpython-311.pyc").write_bytes(b"\0\1")
    assert compile_cache.source_digest([("pkg", tmp_path)]) == before

    (tmp_path / "k.c").write_text("int f(void) { return 2; }\n")
    changed_c = compile_cache.source_digest([("pkg", tmp_path)])
    assert changed_c != before
    (tmp_path / "b.py").write_text("")
    assert compile_cache.source_digest([("pkg", tmp_path)]) not in (before, changed_c)
    # the same bytes under another package name are other sources
    assert compile_cache.source_digest([("other", tmp_path)]) != compile_cache.source_digest([("pkg", tmp_path)])


def test_the_lowerings_tag_the_cache_keys_and_keep_the_users_tag(monkeypatch):
    from qcompile.lowering import ensure_registered

    ensure_registered()  # what the first call of a qcompile:: op, or of its fake (any compile), does
    own = "qcompile-" + compile_cache.fingerprint()
    assert own in torch.compiler.config.cache_key_tag.split(",")

    with torch.compiler.config.patch(cache_key_tag="team-a,qcompile-0000000000000000"):
        assert compile_cache.tag() == f"team-a,{own}"  # a stale qcompile tag replaced, the user's kept
        assert compile_cache.tag() == f"team-a,{own}"  # idempotent
        assert torch.compiler.config.cache_key_tag == f"team-a,{own}"


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32)).eval()


def _compile_and_run(qm, x, qcompile_tag: str):
    torch._dynamo.reset()  # a new process, as far as dynamo knows; the on-disk caches stay
    with torch.compiler.config.patch(cache_key_tag=qcompile_tag), torch.no_grad():
        return torch.compile(qm)(x)


@pytest.mark.skipif(not torch._inductor.config.fx_graph_cache, reason="inductor's FX graph cache is off")
def test_a_changed_qcompile_is_not_served_a_graph_compiled_by_the_old_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, 12, 64, generator=g) for _ in range(2)]
    x = torch.randn(3, 12, 64, generator=g)
    qm = qc.quantize(_mlp(), "int8_dynamic", calib=calib, progress=False)
    with torch.no_grad():
        expected = qm(x)

    version_1, version_2 = "qcompile-" + "1" * 16, "qcompile-" + "2" * 16
    torch.testing.assert_close(_compile_and_run(qm, x, version_1), expected)  # compiled and cached by "version 1"

    # "version 2": the decomposition takes the float path for every INT8 layer, and that path is recognisable
    monkeypatch.setattr(cpu_int8, "takes_integer_gemm", lambda *args: False)
    monkeypatch.setattr(cpu_int8, "takes_native_int8_gemm", lambda *args: False)
    monkeypatch.setattr(cpu_int8, "int8_linear_dequantized",
                        lambda x, weight, *args: torch.full((*x.shape[:-1], weight.shape[0]), 7.0, dtype=x.dtype))

    stale = _compile_and_run(qm, x, version_1)  # the control: same key, so the cached "version 1" graph runs
    torch.testing.assert_close(stale, expected)

    fresh = _compile_and_run(qm, x, version_2)
    assert bool((fresh == 7.0).all()), "the graph cached by the previous qcompile was served"
