"""The C kernels' view of each stored weight, built once per weight and rebuilt when the weight changes.

Used by the INT8 kernel for AVX2 CPUs (`int8`, its packed weight) and the 4-bit kernel (`four_bit`, its value
tables). Overview: docs/cpu-lowering.md.
"""

from __future__ import annotations

import weakref

# The kernel's view of each stored weight (value tables, pointers, checks), built once per weight: compiled graphs
# pass the same constant tensors on every call, and rebuilding it cost a third of a small decode layer's time. An
# entry is used only for the very tensors it was built from (weak references), unchanged since (storage address
# and version counter); it keeps none of them alive, and goes when the first of them does.
_WEIGHTS: dict[tuple, tuple] = {}


def cached_weight(sources: tuple, extra: tuple, build):
    """`build()`, or what it returned for the same `sources` tensors (None allowed) and `extra` key, unchanged since."""
    tensors = [t for t in sources if t is not None]
    if any(t.is_inference() for t in tensors):  # no version counter to tell an in-place change: build each call
        return build()
    key = (tuple(id(t) if t is not None else None for t in sources), extra)
    stamp = tuple((t.data_ptr(), t._version) for t in tensors)
    entry = _WEIGHTS.get(key)
    if entry is not None and entry[1] == stamp and all(ref() is t for ref, t in zip(entry[0], tensors)):
        return entry[2]
    weight = build()

    def forget(_, key=key):
        _WEIGHTS.pop(key, None)

    _WEIGHTS[key] = (tuple(weakref.ref(t, forget) for t in tensors), stamp, weight)
    return weight


__all__ = ["cached_weight"]
