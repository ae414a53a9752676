"""ONNX Runtime sessions with the settings the exported files are meant for."""

from __future__ import annotations

import os

# ONNX Runtime's MatMulNBits `accuracy_level`: 1 computes in float32 (the product of the dequantized weight, as
# the QuantizedModel does); 4 quantizes activations to int8 per block, which is faster and not exact.
INT4_ACCURACY_EXACT = 1
# The session option that makes ONNX Runtime's INT8 kernels exact on x86 CPUs without an INT8 dot product (VNNI):
# the files written with int8_weights="int8" need it there; the default "uint8" files do not.
X64_QUANT_PRECISION = ("session.x64quantprecision", "1")


def onnxruntime_session(
    path: str | os.PathLike,
    *,
    threads: int | None = None,
    optimized_model_filepath: str | os.PathLike | None = None,
    int4_accuracy_level: int = INT4_ACCURACY_EXACT,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
):
    """An `onnxruntime.InferenceSession` for an exported model, with the settings the export is meant for.

    ONNX Runtime fuses `DequantizeLinear(block_size) → MatMul` into `MatMulNBits` with the accuracy level of the
    session option `session.qdq_matmulnbits_accuracy_level`, which defaults to 4 (int8 activations, not exact).
    This helper keeps it exact (`INT4_ACCURACY_EXACT`, float32 compute) unless asked otherwise.

    It also sets `session.x64quantprecision` (`X64_QUANT_PRECISION`), which files exported with
    `int8_weights="int8"` need: on x86 CPUs without VNNI, ONNX Runtime's u8×s8 kernels add pairs of products in
    saturating int16, and INT8 layers come out wrong (relative error 0.1-0.4 on the tiny test models, AMD EPYC with
    AVX2); the option switches those CPUs, and only those, to its exact u8×u8 kernels. The default files
    (`int8_weights="uint8"`) take the exact kernels with or without it.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(int(int4_accuracy_level)))
    options.add_session_config_entry(*X64_QUANT_PRECISION)
    if optimized_model_filepath is not None:
        options.optimized_model_filepath = str(optimized_model_filepath)
    return ort.InferenceSession(str(path), options, providers=list(providers))
