"""Directories written whole or not at all: built in a sibling temporary directory, then swapped into place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def swap_into_place(staging: Path, target: Path) -> None:
    """Move the finished `staging` directory to `target`; an existing `target` is removed only once the new one is
    in place (a crash in between leaves it as `.<name>.old`, never half-written)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
