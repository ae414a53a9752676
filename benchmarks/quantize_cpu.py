"""CPU benchmark: quantization time, size and latency of every recipe, against FP32 eager in the same run.

    python benchmarks/quantize_cpu.py                                  # what `make bench` runs
    python benchmarks/quantize_cpu.py --models llama --recipes fp8,nvfp4 --threads 2 --json out/bench.json

Models: all-MiniLM-L6-v2 (real weights, a batch of real news sentences) and a Llama-shaped LlamaForCausalLM with
random weights (hidden 512, 4 layers, 8 heads, intermediate 1536, vocab 8000; 2x128 random token ids).
For each recipe in qcompile.RECIPES: the time `qcompile.quantize` takes (capture, calibration on a few batches,
weight quantization), bytes before and after, bits per weight of the quantized linears, and the median latency
of the QuantizedModel next to the FP32 model run eagerly and as the exported (unquantized) graph. Ratios are
latency / FP32 eager latency, with the FP32 calls timed alternately with the model's own (so that load that drifts
during the run cancels out); the FP32 row shows the median over all of them. "out cos" is the cosine similarity of the whole output (hidden states or logits)
with the FP32 output on the timed batch.

The latency here is the eager QuantizedModel (no torch.compile): INT8 and 4-bit layers run the CPU kernels of
`qcompile.lowering.cpu`, FP8 the plain-PyTorch reference. For speed under torch.compile, next to torchao, see
benchmarks/cpu.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import qcompile
from qcompile import hf
from qcompile.capture import capture
from qcompile.eval import format_table

MODELS = ("minilm", "llama")


def _main_output(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for field in ("logits", "last_hidden_state"):
        value = getattr(output, field, None)
        if value is not None:
            return value
    return output[0]


def _paired_latency(baseline, model, kwargs: dict, warmup: int, repeats: int) -> tuple[float, float]:
    """Median seconds per call of `baseline` and of `model`, timed alternately after `warmup` calls of each.

    Alternating the two keeps the ratio fair when the machine's load drifts during the run.
    """
    baseline_times, model_times = [], []
    with torch.no_grad():
        for _ in range(warmup):
            baseline(**kwargs)
            model(**kwargs)
        for _ in range(repeats):
            for fn, times in ((baseline, baseline_times), (model, model_times)):
                start = time.perf_counter()
                fn(**kwargs)
                times.append(time.perf_counter() - start)
    return statistics.median(baseline_times), statistics.median(model_times)


def _output_cosine(reference: torch.Tensor, model, kwargs: dict) -> float:
    with torch.no_grad():
        out = _main_output(model(**kwargs)).float()
    return float(torch.nn.functional.cosine_similarity(reference.flatten().double(), out.flatten().double(), dim=0))


def _setup(name: str, calib_batches: int):
    """(description, model, calibration batches, timed batch) for one model."""
    if name == "minilm":
        model, tokenizer = hf.load_minilm()
        batch_size = 16
        calib = hf.tokenize_batches(tokenizer, hf.news_sentences(batch_size * calib_batches, offset=batch_size),
                                    batch_size)
        timed = hf.tokenize_batches(tokenizer, hf.news_sentences(batch_size), batch_size)[0]
        shape = "x".join(map(str, timed["input_ids"].shape))
        return f"all-MiniLM-L6-v2, batch {shape} tokens", model, calib, timed
    if name == "llama":
        model = hf.random_llama()
        generator = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size

        def ids(batch, length):
            return {"input_ids": torch.randint(0, vocab, (batch, length), generator=generator)}

        calib = [ids(2, 128) for _ in range(calib_batches)]
        # Batch 2, as in calibration: torch.export specializes a size-1 batch, so the model captured from
        # batch-2 calibration data would refuse batch 1.
        timed = ids(2, 128)
        c = model.config
        return (f"Llama random (hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads, "
                f"ffn {c.intermediate_size}, vocab {c.vocab_size}), batch 2x128 tokens"), model, calib, timed
    raise ValueError(name)


def _bits_per_weight(layers) -> float:
    elements = sum(layer.out_features * layer.in_features for layer in layers)
    return 8.0 * sum(layer.weight_bytes for layer in layers) / elements if elements else float("nan")


def bench_model(name: str, recipes: list[str], args) -> dict:
    description, model, calib, timed = _setup(name, args.calib_batches)
    print(f"\n== {name}: {description}", flush=True)
    float_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    with torch.no_grad():
        reference = _main_output(model(**timed)).float()

    exported = capture(model, (), timed)
    fp32_eager, fp32_graph = _paired_latency(model, exported, timed, args.warmup, args.repeats)
    del exported
    eager_times = [fp32_eager]
    rows = [
        {"recipe": "fp32 eager", "algorithm": "-", "quantize_s": None, "bytes": float_bytes, "bits_per_weight": 32.0,
         "latency_s": fp32_eager, "fp32_latency_s": fp32_eager, "latency_ratio": 1.0, "output_cosine": 1.0},
        {"recipe": "fp32 exported", "algorithm": "-", "quantize_s": None, "bytes": float_bytes,
         "bits_per_weight": 32.0, "latency_s": fp32_graph, "fp32_latency_s": fp32_eager,
         "latency_ratio": fp32_graph / fp32_eager,
         "output_cosine": 1.0},
    ]
    print(f"fp32 eager {fp32_eager * 1e3:.1f} ms, exported graph {fp32_graph * 1e3:.1f} ms", flush=True)

    for recipe in recipes:
        start = time.perf_counter()
        try:
            qm = qcompile.quantize(model, recipe, calib=calib, progress=args.progress)
        except NotImplementedError as error:
            print(f"{recipe}: skipped ({error})", flush=True)
            rows.append({"recipe": recipe, "skipped": str(error)})
            continue
        quantize_s = time.perf_counter() - start
        eager, latency = _paired_latency(model, qm, timed, args.warmup, args.repeats)
        eager_times.append(eager)
        row = {
            "recipe": recipe,
            "algorithm": qm.algorithm,
            "quantize_s": quantize_s,
            "bytes": qm.model_bytes,
            "bits_per_weight": _bits_per_weight(qm.layers),
            "latency_s": latency,
            "fp32_latency_s": eager,  # the FP32 eager calls interleaved with this model's
            "latency_ratio": latency / eager,
            "output_cosine": _output_cosine(reference, qm, timed),
            "layers": len(qm.layers),
        }
        rows.append(row)
        print(f"{recipe}: quantize {quantize_s:.1f}s, latency {latency * 1e3:.1f} ms, fp32 eager {eager * 1e3:.1f} ms "
              f"({row['latency_ratio']:.2f}x fp32), out cos {row['output_cosine']:.4f}", flush=True)
        del qm
    # The FP32 row's latency is the median over every interleaved FP32 measurement of the run.
    rows[0]["latency_s"] = rows[0]["fp32_latency_s"] = statistics.median(eager_times)
    return {"model": name, "description": description, "float_bytes": float_bytes, "rows": rows}


def result_table(result: dict) -> str:
    header = ("recipe", "algorithm", "quantize s", "MB", "size", "bits/w", "latency ms", "fp32 ms", "vs fp32",
              "out cos")
    lines = []
    float_bytes = result["float_bytes"]
    for row in result["rows"]:
        if "skipped" in row:
            lines.append((row["recipe"], "skipped", "", "", "", "", "", "", "", ""))
            continue
        lines.append((
            row["recipe"],
            row["algorithm"],
            "-" if row["quantize_s"] is None else f"{row['quantize_s']:.1f}",
            f"{row['bytes'] / 1e6:.1f}",
            f"{row['bytes'] / float_bytes:.2f}",
            f"{row['bits_per_weight']:.2f}",
            f"{row['latency_s'] * 1e3:.1f}",
            f"{row['fp32_latency_s'] * 1e3:.1f}",
            f"{row['latency_ratio']:.2f}x",
            f"{row['output_cosine']:.4f}",
        ))
    return format_table(header, lines, left=2)


def _split(value: str, valid, what: str, parser) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        parser.error(f"unknown {what}(s) {unknown or value!r}; valid: {', '.join(valid)}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: %(default)s")
    parser.add_argument("--recipes", default=",".join(qcompile.RECIPES), help="comma-separated (default: all)")
    default_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser.add_argument("--threads", type=int, default=default_threads,
                        help="torch.set_num_threads (default: the CPUs available, %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls; the median is reported (default: %(default)s)")
    parser.add_argument("--calib-batches", type=int, default=4, help="calibration batches (default: %(default)s)")
    parser.add_argument("--progress", action="store_true", help="show qcompile's calibration progress bars")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    models = _split(args.models, MODELS, "model", parser)
    recipes = _split(args.recipes, list(qcompile.RECIPES), "recipe", parser)
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0 or args.calib_batches < 1:
        parser.error("--threads, --repeats and --calib-batches must be at least 1, --warmup at least 0")

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"torch.set_num_threads({torch.get_num_threads()}), median of {args.repeats} runs after {args.warmup} warm-up",
          flush=True)
    results = [bench_model(name, recipes, args) for name in models]
    total_s = time.perf_counter() - started

    for result in results:
        threads = torch.get_num_threads()
        print(f"\n{result['model']}: {result['description']}; {threads} thread{'s' if threads != 1 else ''}")
        print(result_table(result))
    print("\nsize: model bytes / FP32 bytes (embeddings and lm_head stay FP32); fp32 ms: FP32 eager latency timed "
          "alternately with that row's model; vs fp32: latency / fp32 ms")
    print(f"total {total_s:.1f}s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "warmup": args.warmup,
            "repeats": args.repeats,
            "total_s": total_s,
            "models": results,
        }, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
