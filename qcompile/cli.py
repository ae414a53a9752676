"""The `qcompile` command line.

    qcompile export-onnx CHECKPOINT_DIR model.onnx [--opset 21] [--external-data auto|always|never]
                         [--int8-weights int8|uint8]

`CHECKPOINT_DIR` is a folder written by `QuantizedModel.save` (or `qcompile.quantize(...).save(...)`); the model is
exported with its own example call as in `qcompile.export_onnx`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompile", description="A quantization compiler for PyTorch 2.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    export = commands.add_parser(
        "export-onnx",
        help="export a saved QuantizedModel to a QDQ ONNX model",
        description="Export a saved QuantizedModel (a folder written by QuantizedModel.save) to QDQ ONNX.",
    )
    export.add_argument("checkpoint", type=Path, help="folder written by QuantizedModel.save")
    export.add_argument("output", type=Path, help="the .onnx file to write")
    export.add_argument("--opset", type=int, default=21,
                        help="ONNX opset (default: %(default)s; NVFP4 models are written at 23)")
    export.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                        help="write tensors to OUTPUT.data: auto (only past the 2 GB protobuf limit), always, never")
    export.add_argument("--int8-weights", choices=("int8", "uint8"), default="int8",
                        help="INT8 weight storage: int8 (default; ONNX Runtime's u8 x s8 kernels: fast with "
                             "VNNI/AMX, saturating sums on other x86 CPUs unless the session sets "
                             "session.x64quantprecision) or uint8 at zero point 128 (its u8 x u8 kernels: exact on "
                             "every x86 CPU with any session options)")
    export.add_argument("--no-optimize", action="store_true", help="skip constant folding and cleanup of the graph")
    export.add_argument("--no-check", action="store_true", help="skip onnx.checker.check_model(full_check=True)")
    export.set_defaults(run=_export_onnx)
    return parser


def _export_onnx(args: argparse.Namespace) -> int:
    import qcompile
    from qcompile.lowering.onnx import OnnxExportError

    if not args.checkpoint.is_dir():
        print(f"qcompile: {args.checkpoint} is not a directory", file=sys.stderr)
        return 2
    started = time.perf_counter()
    print(f"loading {args.checkpoint}", flush=True)
    try:
        qm = qcompile.load(args.checkpoint)
    except (FileNotFoundError, ValueError) as error:
        print(f"qcompile: {error}", file=sys.stderr)
        return 2
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    print(f"exporting {len(qm.layers)} quantized layers (recipe {qm.recipe.name}) to {args.output}", flush=True)
    try:
        path = qcompile.export_onnx(qm, args.output, opset=args.opset, external_data=external,
                                    optimize=not args.no_optimize, check=not args.no_check,
                                    int8_weights=args.int8_weights)
    except (OnnxExportError, ValueError, ImportError) as error:
        print(f"qcompile: {error}", file=sys.stderr)
        return 1
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if external is not False and data.exists():
        size += data.stat().st_size
    print(f"wrote {path} ({size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
