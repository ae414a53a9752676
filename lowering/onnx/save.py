"""Saving: an ONNX IR model written through a staging directory, checked, and moved into place atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _write_checked(onnx_model, path: Path, *, use_external: bool, check: bool) -> None:
    """Write `onnx_model` to `path` (its tensors to `<path>.data` when `use_external`) without a reader ever seeing a
    partial file: written to a temporary directory next to `path`, checked with
    `onnx.checker.check_model(full_check=True)` when `check`, and moved into place with `os.replace` (with external
    data, the data file is moved first)."""
    import onnx

    data_name = f"{path.name}.data"
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        _save(onnx_model, staged, data_name if use_external else None)
        if check:
            onnx.checker.check_model(str(staged), full_check=True)
        if use_external:
            os.replace(staging / data_name, path.parent / data_name)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save(model, path: Path, data_name: str | None) -> None:
    import onnx_ir as ir

    if data_name is None:
        ir.save(model, path)
    else:
        ir.save(model, path, external_data=data_name)
