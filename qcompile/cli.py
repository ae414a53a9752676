"""The `qcompile` command line.

    qcompile quantize MODEL_DIR OUT --recipe NAME [--calib TEXT_FILE] [--calib-samples N] [--seq-len L]
                      [--format qcompile|compressed-tensors|modelopt|onnx] [--dtype auto|bfloat16|float16|float32]
                      [--group-size N] [--exclude GLOB ...] [--stream]
    qcompile export-onnx CHECKPOINT_DIR model.onnx [--target onnxruntime|tensorrt] [--dtype float16|bfloat16]
                         [--opset 21] [--external-data auto|always|never] [--int8-weights uint8|int8]
    qcompile build-engine model.onnx model.engine [--shape NAME:MIN:OPT:MAX ...] [--workspace-gb N]
                          [--timing-cache PATH] [--precision-constraints obey|prefer|none] [--weakly-typed]
                          [--verbose]
    qcompile --version

`MODEL_DIR` is a local Hugging Face model folder (config.json and weights; nothing is downloaded). `CHECKPOINT_DIR`
is a folder written by `QuantizedModel.save`; it is exported with its own example call as in `qcompile.export_onnx`.
`build-engine` builds a TensorRT engine from a QDQ ONNX file as `qcompile.build_engine` does (TensorRT installed
separately: docs/tensorrt.md).
Errors are one line on stderr (exit 2 for bad input, 1 for a failure on the way).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompile", description="A quantization compiler for PyTorch 2.")
    parser.add_argument("--version", action="version", version=f"qcompile {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    quantize = commands.add_parser(
        "quantize",
        help="quantize a local Hugging Face model folder",
        description="Quantize a local Hugging Face model folder and write it in the chosen format.",
    )
    quantize.add_argument("model", type=Path, help="Hugging Face model folder (config.json, weights, tokenizer)")
    quantize.add_argument("output", type=Path, help="folder to write (a .onnx file with --format onnx)")
    quantize.add_argument("--recipe", required=True, help="a recipe name (see `qcompile.RECIPES`)")
    quantize.add_argument("--calib", type=Path, default=None,
                          help="calibration text file (default: the news corpus that ships in the gensim wheel)")
    quantize.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default: %(default)s)")
    quantize.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: %(default)s)")
    quantize.add_argument("--format", choices=("qcompile", "compressed-tensors", "modelopt", "onnx"),
                          default="qcompile",
                          help="qcompile (QuantizedModel.save, default); compressed-tensors or modelopt (Hugging Face "
                               "checkpoints that vLLM, SGLang, TensorRT-LLM and transformers load; qcompile.export_hf); "
                               "onnx (qcompile.export_onnx)")
    quantize.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                          help="dtype to load the model in (default: the checkpoint's own)")
    quantize.add_argument("--group-size", type=int, default=None,
                          help="INT4 group size (default: the recipe's, 128); formats that need it to divide every "
                               "layer's input width (compressed-tensors) may need a smaller one, e.g. 64")
    quantize.add_argument("--exclude", nargs="+", default=None, metavar="GLOB",
                          help="layer-name patterns left in float (replaces the recipe's list)")
    quantize.add_argument("--kv-cache", choices=("fp8", "nvfp4"), default=None,
                          help="quantize the KV cache (static scales calibrated on the calibration text)")
    quantize.add_argument("--stream", action="store_true",
                          help="load, quantize and write one decoder layer at a time, never the whole model "
                               "(compressed-tensors, modelopt and qcompile; Llama-like decoders; docs/streaming.md)")
    quantize.add_argument("--overwrite", action="store_true", help="replace an existing output")
    quantize.set_defaults(run=_quantize)

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
    export.add_argument("--target", choices=("onnxruntime", "tensorrt"), default="onnxruntime",
                        help="the runtime the file is for: onnxruntime (default; QDQ ONNX Runtime fuses into its "
                             "integer kernels, float32) or tensorrt (explicit quantization for TensorRT's ONNX "
                             "parser, zero points 0, FP16/BF16 compute; docs/onnx.md)")
    export.add_argument("--dtype", choices=("float16", "bfloat16"), default=None,
                        help="compute dtype of a --target tensorrt file (default: float16)")
    export.add_argument("--int8-weights", choices=("uint8", "int8"), default=None,
                        help="INT8 weight storage for --target onnxruntime: uint8 (default; codes + 128 at zero "
                             "point 128, ONNX Runtime's u8 x u8 kernels, exact on every CPU in any session) or int8 "
                             "(its u8 x s8 kernels: faster with VNNI/AMX, but on other x86 CPUs they saturate unless "
                             "the session sets session.x64quantprecision=1)")
    export.add_argument("--no-optimize", action="store_true", help="skip constant folding and cleanup of the graph")
    export.add_argument("--no-check", action="store_true", help="skip onnx.checker.check_model(full_check=True)")
    export.set_defaults(run=_export_onnx)

    engine = commands.add_parser(
        "build-engine",
        help="build a TensorRT engine from a QDQ ONNX model",
        description="Build a TensorRT engine with TensorRT's ONNX parser from a QDQ ONNX model written by "
                    "qcompile.export_onnx(..., target='tensorrt'); needs TensorRT 10 and an NVIDIA GPU.",
    )
    engine.add_argument("onnx", type=Path, help="the .onnx file")
    engine.add_argument("engine", type=Path, help="the engine file to write (replaced only when the build succeeds)")
    engine.add_argument("--shape", action="append", default=None, metavar="NAME:MIN:OPT:MAX",
                        help="the range of a dynamic input, each shape like 1x128 (NAME:SHAPE fixes it); repeat for "
                             "each input with a dynamic dimension")
    engine.add_argument("--workspace-gb", type=float, default=None, metavar="N",
                        help="builder workspace limit in GiB (default: TensorRT's, the GPU's memory)")
    engine.add_argument("--timing-cache", type=Path, default=None, metavar="PATH",
                        help="timing cache file: read if it exists, written after the build")
    engine.add_argument("--precision-constraints", choices=("obey", "prefer", "none"), default="none",
                        help="obey or prefer layer precisions (with --weakly-typed; default: %(default)s)")
    engine.add_argument("--weakly-typed", action="store_true",
                        help="build a weakly typed network (default: strongly typed, the types of the ONNX file)")
    engine.add_argument("--verbose", action="store_true", help="print TensorRT's whole log")
    engine.set_defaults(run=_build_engine)
    return parser


def _shape_spec(text: str) -> tuple[str, tuple]:
    """`NAME:MIN:OPT:MAX` or `NAME:SHAPE` (shapes like 1x128) -> (name, (min, opt, max)); names may hold colons."""

    def is_shape(part: str) -> bool:
        return all(d.isascii() and d.isdigit() for d in part.split("x"))

    def shape(part: str) -> tuple:
        return tuple(int(d) for d in part.split("x"))

    parts = text.split(":")
    if len(parts) >= 4 and ":".join(parts[:-3]) and all(map(is_shape, parts[-3:])):
        return ":".join(parts[:-3]), tuple(shape(p) for p in parts[-3:])
    if len(parts) >= 2 and ":".join(parts[:-1]) and is_shape(parts[-1]):
        return ":".join(parts[:-1]), (shape(parts[-1]),) * 3
    raise ValueError(f"--shape {text!r}: expected NAME:MIN:OPT:MAX (each shape like 1x128) or NAME:SHAPE")


def _build_engine(args: argparse.Namespace) -> int:
    shapes = {}
    try:
        for spec in args.shape or ():
            name, triple = _shape_spec(spec)
            if name in shapes:
                raise ValueError(f"--shape gives input {name!r} twice")
            shapes[name] = triple
    except ValueError as error:
        print(f"qcompile: {error}", file=sys.stderr)
        return 2
    if not args.onnx.is_file():
        print(f"qcompile: {args.onnx} is not a file", file=sys.stderr)
        return 2
    if args.workspace_gb is not None and not args.workspace_gb > 0:
        print("qcompile: --workspace-gb must be positive", file=sys.stderr)
        return 2
    import qcompile
    from qcompile.tensorrt import EngineBuildError

    started = time.perf_counter()
    print(f"building a TensorRT engine from {args.onnx}", flush=True)
    constraints = None if args.precision_constraints == "none" else args.precision_constraints
    try:
        path = qcompile.build_engine(
            args.onnx, args.engine, shapes=shapes or None,
            workspace_bytes=None if args.workspace_gb is None else int(args.workspace_gb * 2**30),
            timing_cache=args.timing_cache, precision_constraints=constraints,
            strongly_typed=not args.weakly_typed, verbose=args.verbose)
    except (FileNotFoundError, ValueError) as error:
        print(f"qcompile: {error}", file=sys.stderr)
        return 2
    except (EngineBuildError, ImportError, OSError) as error:
        print(f"qcompile: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f}s")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    import qcompile
    from qcompile.lowering.onnx import OnnxExportError

    if not args.checkpoint.is_dir():
        print(f"qcompile: {args.checkpoint} is not a directory", file=sys.stderr)
        return 2
    if args.target == "tensorrt" and args.int8_weights == "uint8":
        print("qcompile: --int8-weights uint8 applies to --target onnxruntime (TensorRT reads signed INT8 codes)",
              file=sys.stderr)
        return 2
    if args.target == "onnxruntime" and args.dtype is not None:
        print("qcompile: --dtype applies to --target tensorrt (ONNX Runtime files compute in float32)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    print(f"loading {args.checkpoint}", flush=True)
    try:
        qm = qcompile.load(args.checkpoint)
    except (FileNotFoundError, ValueError) as error:
        print(f"qcompile: {error}", file=sys.stderr)
        return 2
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    print(f"exporting {len(qm.layers)} quantized layers (recipe {qm.recipe.name}) to {args.output} "
          f"for {args.target}", flush=True)
    try:
        path = qcompile.export_onnx(qm, args.output, opset=args.opset, external_data=external,
                                    optimize=not args.no_optimize, check=not args.no_check,
                                    int8_weights=args.int8_weights, target=args.target, dtype=args.dtype)
    except (OnnxExportError, ValueError, ImportError) as error:
        print(f"qcompile: {error}", file=sys.stderr)
        return 1
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if external is not False and data.exists():
        size += data.stat().st_size
    print(f"wrote {path} ({size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f}s")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qcompile")
    except PackageNotFoundError:
        return "unknown"


class _Stages:
    """One line per stage, with its time."""

    def __init__(self):
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f}s] {message}", flush=True)


def _calibration_windows(args, tokenizer) -> list:
    from qcompile import eval as qeval

    if args.calib is not None:
        if not args.calib.is_file():
            raise _BadInput(f"calibration text {args.calib} is not a file")
        text = args.calib.read_text(encoding="utf-8", errors="replace")
    else:
        from qcompile import hf

        try:
            text = hf.news_text()
        except (ImportError, FileNotFoundError) as error:
            raise _BadInput(f"no --calib given and the built-in text is unavailable ({error}); "
                            "pass --calib TEXT_FILE or install gensim") from error
    try:
        windows = qeval.token_windows(tokenizer, text, args.calib_samples, args.seq_len)
    except ValueError as error:
        raise _BadInput(f"calibration text: {error}; pass fewer --calib-samples or a shorter --seq-len") from error
    return [{"input_ids": window} for window in windows]


def _quantize_streaming(args: argparse.Namespace, recipe, target: Path, dtype, stage) -> int:
    import qcompile
    from qcompile.streaming import StreamingError
    from transformers import AutoTokenizer

    if args.format == "onnx":
        raise _BadInput("--stream writes compressed-tensors, modelopt or qcompile checkpoints, not ONNX")
    if os.environ.get("RANK", "0") != "0":  # under torchrun, the first process speaks for all
        stage = lambda message: None  # noqa: E731
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError) as error:
        raise _BadInput(f"cannot load the tokenizer of {args.model}: {str(error).splitlines()[0]}") from error
    calib = _calibration_windows(args, tokenizer)
    stage(f"calibration: {len(calib)} windows of {args.seq_len} tokens; streaming {args.model} layer by layer")
    try:
        path = qcompile.quantize_checkpoint(args.model, target, recipe, calib, format=args.format, dtype=dtype,
                                            tokenizer=tokenizer, exclude=args.exclude, overwrite=args.overwrite)
    except StreamingError as error:
        raise _BadInput(str(error)) from error
    except (OSError, ValueError, NotImplementedError) as error:
        print(f"qcompile: quantizing failed: {error}", file=sys.stderr)
        return 1
    stage(f"wrote {path}")
    return 0


class _BadInput(Exception):
    """An error in what the user asked for: one line, exit 2."""


def _quantize(args: argparse.Namespace) -> int:
    try:
        return _run_quantize(args)
    except _BadInput as error:
        print(f"qcompile: {error}", file=sys.stderr)
        return 2


def _run_quantize(args: argparse.Namespace) -> int:
    stage = _Stages()
    if not (args.model / "config.json").is_file():
        raise _BadInput(f"{args.model} is not a Hugging Face model folder (no config.json)")
    import qcompile

    if args.recipe not in qcompile.RECIPES:
        raise _BadInput(f"unknown recipe {args.recipe!r}; valid recipes: {', '.join(qcompile.RECIPES)}")
    recipe = qcompile.RECIPES[args.recipe]
    if args.group_size is not None:
        if recipe.weights.granularity != "group":
            raise _BadInput(f"--group-size applies to group-wise weights; recipe {args.recipe!r} has "
                            f"{recipe.weights.granularity} weight scales")
        if args.group_size < 1:
            raise _BadInput("--group-size must be positive")
        recipe = dataclasses.replace(recipe, weights=dataclasses.replace(recipe.weights, block_size=args.group_size))
    if args.kv_cache is not None:
        if args.format == "onnx":
            raise _BadInput("--kv-cache has no ONNX translation yet; use --format qcompile, compressed-tensors or "
                            "modelopt")
        recipe = dataclasses.replace(recipe, kv_cache=args.kv_cache)
    if args.format in ("compressed-tensors", "modelopt"):
        from qcompile.checkpoints import FORMATS, ExportError

        try:
            FORMATS[args.format].check_recipe(recipe)
        except ExportError as error:
            raise _BadInput(str(error)) from error
        if args.format == "compressed-tensors":  # the format has no per-layer input multiplier
            recipe = dataclasses.replace(recipe, explicit_input_scales=False)
    if args.calib_samples < 1 or args.seq_len < 2:
        raise _BadInput("--calib-samples must be at least 1 and --seq-len at least 2")
    target = args.output
    if target.exists() and not args.overwrite and (target.is_file() or any(target.iterdir())):
        raise _BadInput(f"{target} exists and is not empty; pass --overwrite to replace it")
    parent = target.parent if target.parent != Path("") else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _BadInput(f"cannot create {parent}: {error.strerror}") from error
    if not os.access(parent, os.W_OK):
        raise _BadInput(f"{parent} is not writable")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.stream:
        return _quantize_streaming(args, recipe, target, None if dtype == "auto" else dtype, stage)
    stage(f"loading {args.model}")
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    except (OSError, ValueError) as error:
        raise _BadInput(f"cannot load {args.model}: {str(error).splitlines()[0]}") from error
    stage(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{next(model.parameters()).dtype})")
    calib = _calibration_windows(args, tokenizer)
    stage(f"calibration: {len(calib)} windows of {args.seq_len} tokens")
    try:
        qm = qcompile.quantize(model, recipe, calib=calib, exclude=args.exclude)
    except (ValueError, NotImplementedError) as error:
        print(f"qcompile: quantizing failed: {error}", file=sys.stderr)
        return 1
    stage(f"quantized with {args.recipe} ({qm.algorithm})")
    print(qm.report(), flush=True)
    try:
        if args.format == "onnx":
            path = qcompile.export_onnx(qm, target)
        elif args.format in ("compressed-tensors", "modelopt"):
            path = qcompile.export_hf(qm, target, format=args.format, dtype=next(model.parameters()).dtype,
                                      tokenizer=tokenizer, overwrite=args.overwrite)
        else:
            qm.save(target)
            path = target
    except (OSError, ValueError, ImportError) as error:
        print(f"qcompile: writing {target} failed: {error}", file=sys.stderr)
        return 1
    stage(f"wrote {path} ({args.format})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
