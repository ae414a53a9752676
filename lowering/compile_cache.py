"""qcompile's code in the keys of torch.compile's caches.

Inductor and AOTAutograd cache compiled graphs on disk (`TORCHINDUCTOR_CACHE_DIR`, by default under /tmp), keyed
on the traced graph, torch's own code and inductor's configuration. A graph holding `qcompile::` ops is keyed on the
op names only, yet what it compiles to is decided by qcompile's code: the inductor decompositions in
`qcompile.lowering.cpu` choose the integer kernel, `torch._int_mm` or float arithmetic. Without qcompile's code in
the key, a graph compiled by one version of qcompile is served to the next (measured: an upgrade that moved INT8
layers to a C kernel kept running the previous version's float32 GEMMs, 1.04x FP32 instead of 1.36x).

`tag()` appends `qcompile-<hash of the installed package's sources>` to `torch.compiler.config.cache_key_tag`, the
setting torch provides for this (it goes into every cache key, and does nothing else). A tag the user set is kept.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from pathlib import Path

import torch

_PACKAGES = ("qcompile", "qcompile.passes", "qcompile.lowering", "qcompile.lowering.cpu", "qcompile.lowering.triton")
_SOURCES = ("*.py", "*.c")
_PREFIX = "qcompile-"


def source_digest(folders: list[tuple[str, Path]]) -> str:
    """16 hex digits of SHA-256 over the `.py` and `.c` files of each (name, folder), by name, not recursing."""
    digest = hashlib.sha256()
    for name, folder in folders:
        for path in sorted({path for pattern in _SOURCES for path in Path(folder).glob(pattern)}):
            digest.update(f"{name}/{path.name}".encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def fingerprint() -> str:
    """The source digest of this qcompile's packages (read once per process)."""
    return source_digest([(name, Path(importlib.import_module(name).__file__).parent) for name in _PACKAGES])


def tag() -> str:
    """Put this qcompile's fingerprint into torch.compile's cache keys (idempotent); returns the tag now in force."""
    current = torch.compiler.config.cache_key_tag
    own = _PREFIX + fingerprint()
    parts = [part for part in current.split(",") if part and not part.startswith(_PREFIX)]
    torch.compiler.config.cache_key_tag = ",".join([*parts, own])
    return torch.compiler.config.cache_key_tag


__all__ = ["fingerprint", "source_digest", "tag"]
