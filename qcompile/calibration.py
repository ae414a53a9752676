"""Calibration: feeding batches through an observed model, and the `qcompile.calibrate` context for compiled ones."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm


def as_call(batch: Any) -> tuple[tuple, dict]:
    """A calibration batch (tensor, tuple/list of inputs, or dict of kwargs) as call arguments."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def as_batches(calib):
    """A bare tensor or dict is one batch, not a sequence of rows or keys: wrap it in a list."""
    return [calib] if isinstance(calib, (torch.Tensor, Mapping)) else calib


def describe_call(args: tuple, kwargs: dict) -> str:
    """`(Tensor[2, 12] int64, input_ids=Tensor[2, 12] int64)`: a call's signature, for error messages."""
    def one(value):
        if isinstance(value, torch.Tensor):
            return f"Tensor{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
        return type(value).__name__ if not isinstance(value, (bool, int, float, str, type(None))) else repr(value)

    return "(" + ", ".join([*(one(a) for a in args), *(f"{k}={one(v)}" for k, v in kwargs.items())]) + ")"


def first_batch(calib: Iterable) -> tuple[Any, Iterable]:
    """Peek at the first batch of any iterable; returns it and an iterable that still yields every batch."""
    calib = as_batches(calib)
    if isinstance(calib, (list, tuple)):
        return (calib[0] if calib else None), calib
    iterator = iter(calib)
    try:
        head = next(iterator)
    except StopIteration:
        return None, ()
    return head, itertools.chain([head], iterator)


def run_calibration(
    model: Callable, calib: Iterable | Callable | None, *, desc: str = "calibrating", progress: bool = True,
    expected: str | None = None,
) -> int:
    """Run every batch through `model` (or call `calib(model)`, a forward loop); returns the batches seen.
    `expected` describes the captured call, for the error raised by a batch that does not fit it."""
    calib = as_batches(calib)
    if calib is None:
        raise ValueError("this recipe has static scales and needs calibration data: pass calib=[batch, ...]")
    batches = 0
    with torch.no_grad():
        if callable(calib) and not isinstance(calib, (torch.Tensor, Mapping)) and not hasattr(calib, "__iter__"):
            calib(model)
            return -1  # a forward loop: the observers count what it ran
        total = len(calib) if hasattr(calib, "__len__") else None
        for batch in tqdm(calib, desc=desc, total=total, disable=not progress, unit="batch", leave=False):
            args, kwargs = as_call(batch)
            try:
                model(*args, **kwargs)
            except Exception as error:
                if expected is None or "calibration data gives NaN" in str(error):
                    raise
                raise ValueError(f"calibration batch {batches} {describe_call(args, kwargs)} does not fit the model "
                                 f"captured for {expected}: {error}") from error
            batches += 1
    if batches == 0:
        raise ValueError("the calibration set is empty: a recipe with static scales needs at least one batch")
    return batches


class _CalibrationSession:
    def __init__(self, target):
        self.target = target
        self.graphs: list = []

    def observe(self, graph) -> None:
        if all(g is not graph for g in self.graphs):
            self.graphs.append(graph)


_SESSIONS: list[_CalibrationSession] = []


def active_session() -> _CalibrationSession | None:
    return _SESSIONS[-1] if _SESSIONS else None


@contextlib.contextmanager
def calibrate(compiled):
    """Calibrate a model compiled with `backend="quant"` and a static recipe.

        with qcompile.calibrate(compiled):
            for batch in calib_batches:
                compiled(batch)

    Inside the block the compiled graphs run in float with observers; on a clean exit each observed graph is
    converted to its quantized form. Graphs first compiled later (a new shape, say) reuse these statistics.
    """
    if not callable(compiled):
        raise TypeError("qcompile.calibrate expects the callable returned by torch.compile(..., backend='quant')")
    session = _CalibrationSession(compiled)
    _SESSIONS.append(session)
    try:
        yield compiled
    finally:
        _SESSIONS.remove(session)
    if not session.graphs:
        raise ValueError(
            "no calibration batch reached a quantized graph inside qcompile.calibrate(): "
            "call the compiled model on calibration inputs inside the with-block"
        )
    for graph in session.graphs:
        graph.finish_calibration()
