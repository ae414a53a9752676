"""The export run: the example call, eval mode, the check that every `qcompile::` op has a translation, and
`torch.onnx.export` itself, whose failures become `OnnxExportError` / `UntranslatableOpError`."""

from __future__ import annotations

import contextlib
import logging
import re

import torch
from torch import nn

from qcompile.ops import op_arguments

from .errors import OnnxExportError, UntranslatableOpError

_QCOMPILE_NAMESPACE = "qcompile"


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript", "onnx_ir") if _find_spec(name) is None]
    if missing:
        raise ImportError(
            f"ONNX export needs {', '.join(missing)}: pip install 'qcompile[onnx]'"
        )


def _find_spec(name: str):
    import importlib.util

    return importlib.util.find_spec(name)


def _example_call(model, example_inputs, example_kwargs) -> tuple[tuple, dict]:
    if example_inputs is not None or example_kwargs is not None:
        if example_inputs is None:
            args = ()
        elif isinstance(example_inputs, tuple):
            args = example_inputs
        else:
            args = (example_inputs,)
        return args, dict(example_kwargs or {})
    example = getattr(model, "_example", None)
    if example is None:
        raise ValueError("pass example_inputs=(...) or example_kwargs={...}: this model carries no example call")
    args, kwargs = example
    return tuple(args), dict(kwargs)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Export in eval mode; modules unlifted from an ExportedProgram are already inference graphs (and refuse
    `eval()`)."""
    was_training = module.training
    try:
        module.eval()
    except NotImplementedError:
        yield
        return
    try:
        yield
    finally:
        module.train(was_training)


def _quantized_nodes(gm) -> list:
    return [
        node for node in gm.graph.nodes
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
        and node.target.namespace == _QCOMPILE_NAMESPACE
    ]


def _layer_of(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return re.sub(r"^L\['self'\]\.?", "", str(path)) or "<root>"
    return "?"


def _where(node) -> str:
    """How errors name a node: its name, its op and the layer it belongs to."""
    return f"node {node.name!r} ({node.target}, layer {_layer_of(node)!r})"


def _check_translatable(nodes: list, table: dict) -> None:
    """Every qcompile op must have a translation; activation formats are checked here, before any tracing."""
    supported_inputs = {"none", "int8", "fp8_e4m3", "nvfp4"}
    for node in nodes:
        where = _where(node)
        if node.target not in table:
            raise UntranslatableOpError(f"{where} has no ONNX translation")
        args = op_arguments(node)
        input_scale, fmt, granularity = args["input_scale"], args["input_format"], args["input_granularity"]
        if fmt not in supported_inputs:
            raise UntranslatableOpError(f"{where}: activation format {fmt!r} has no ONNX pattern")
        if fmt in ("int8", "fp8_e4m3") and input_scale is None and granularity not in ("token", "tensor"):
            raise UntranslatableOpError(f"{where}: dynamic {fmt} activations per {granularity!r} have no ONNX pattern")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs warnings about optional packages (torchvision) and prints progress; keep exports quiet."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _run_exporter(program, table: dict, opset: int):
    try:
        with _quiet_exporter():
            return torch.onnx.export(
                program,
                (),
                dynamo=True,
                custom_translation_table=table,
                opset_version=opset,
                optimize=False,
                verbose=False,
                report=False,
            )
    except UntranslatableOpError:
        raise
    except Exception as error:
        chain, cause = [], error
        while cause is not None and len(chain) < 20:
            chain.append(cause)
            if isinstance(cause, UntranslatableOpError):
                raise cause from error
            cause = cause.__cause__ or cause.__context__
        text = "\n".join(str(item) for item in chain)
        match = re.search(r"translating node %(\S+) : .*?target=([\w.:]+)", text)
        if match:
            reason = next((str(c) for c in chain if type(c).__name__ == "DispatchError"), str(chain[-1]))
            raise UntranslatableOpError(
                f"node {match.group(1)!r} ({match.group(2)}) has no ONNX translation: {reason.splitlines()[0]}"
            ) from error
        raise OnnxExportError(f"torch.onnx.export failed: {str(chain[-1]).splitlines()[0] if chain else error}") from error
