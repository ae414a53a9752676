"""The errors an ONNX export raises."""

from __future__ import annotations


class OnnxExportError(RuntimeError):
    """The model cannot be exported to ONNX as asked."""


class UntranslatableOpError(OnnxExportError):
    """A node of the graph has no ONNX translation."""

