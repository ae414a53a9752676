"""Peak memory and time of streaming quantization against the in-memory path, on Llama-shaped checkpoints.

    python benchmarks/streaming.py                                  # 0.5B and 1.1B, nvfp4
    python benchmarks/streaming.py --sizes 0.5B,1.1B,3B --recipes int4_awq,nvfp4 --json out/streaming.json

For each size, a random-weight Llama-shaped model is written once in bf16 (safetensors, in --workdir, default a
temporary folder). Each (size, recipe) runs `qcompile quantize MODEL OUT --recipe R --format compressed-tensors`
twice in fresh processes: with `--stream` (one decoder layer in memory at a time) and without (the model loaded
with `from_pretrained`, quantized whole, exported). Reported: peak resident memory of the process (VmHWM, from
/proc, after the CLI ran in the same process) and the part of it above the libraries' own (the process's resident
memory once torch, transformers and qcompile are imported), each as a fraction of the bf16 checkpoint, and the
wall time of each path with their ratio. Calibration is small (--calib-samples windows of
--seq-len tokens of the built-in text) so that sizes past a few billion parameters finish on a laptop-class CPU;
AWQ's searches scale with it.

The in-memory path is skipped where the model would not fit (bf16 checkpoint above --in-memory-limit GB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {  # hidden, intermediate, layers, heads, kv heads (Llama-like shapes near these parameter counts)
    "tiny": (256, 768, 4, 4, 4),  # a smoke test of the script
    "0.5B": (1024, 4096, 24, 16, 16),
    "1.1B": (2048, 5632, 22, 32, 4),
    "3B": (3072, 8192, 28, 24, 8),
}
VOCAB = 32000

_RUNNER = r"""
import sys, threading, time
from qcompile.cli import main

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024

import torch, transformers, qcompile  # the libraries' own memory, measured apart
from transformers import AutoModelForCausalLM
base = status("VmRSS")
started = time.perf_counter()
code = main(sys.argv[1:])
print("RESULT", code, status("VmHWM"), time.perf_counter() - started, base, flush=True)
"""


def _write_model(path: Path, size: str) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv = SIZES[size]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False,
                         max_position_embeddings=4096)
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("meta"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)  # drawn in bf16: 3B in float32 would need 12 GB
        model.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
        model.save_pretrained(path)
        _tokenizer().save_pretrained(path)
        del model
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _tokenizer():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import hf_zoo

    return hf_zoo.tokenizer(256)


def _run(model: Path, out: Path, recipe: str, stream: bool, args) -> dict:
    command = [sys.executable, "-c", _RUNNER, "quantize", str(model), str(out), "--recipe", recipe, "--format",
               "compressed-tensors", "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
               "--overwrite"] + (["--stream"] if stream else [])
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    if done.returncode != 0 or not lines or lines[-1].split()[1] != "0":
        raise RuntimeError(f"{' '.join(command[3:])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    _, _, peak, seconds, base = lines[-1].split()
    return {"peak_bytes": int(peak), "seconds": float(seconds), "libraries_bytes": int(base)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.5B,1.1B", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--recipes", default="nvfp4")
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--in-memory-limit", type=float, default=8.0, help="GB of bf16 checkpoint (default 8)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qcompile-streaming-"))
    rows = []
    for size in args.sizes.split(","):
        model = workdir / f"llama-{size}"
        checkpoint = _write_model(model, size)
        for recipe in args.recipes.split(","):
            row = {"size": size, "recipe": recipe, "checkpoint_bytes": checkpoint}
            row["stream"] = _run(model, workdir / f"out-{size}-{recipe}-stream", recipe, True, args)
            if checkpoint / 1e9 <= args.in_memory_limit:
                row["in_memory"] = _run(model, workdir / f"out-{size}-{recipe}-whole", recipe, False, args)
            rows.append(row)
            _print_row(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=2) + "\n")
    return 0


def _print_row(row: dict) -> None:
    size = row["checkpoint_bytes"]

    def part(name: str, run: dict) -> str:
        model = run["peak_bytes"] - run["libraries_bytes"]
        return (f"{name}: peak {run['peak_bytes'] / 1e9:5.2f} GB ({run['peak_bytes'] / size:.2f}x), above the "
                f"libraries {model / 1e9:5.2f} GB ({model / size:.2f}x), {run['seconds']:6.1f} s")

    text = f"{row['size']:>5} {row['recipe']:<9} bf16 {size / 1e9:5.2f} GB | " + part("stream", row["stream"])
    whole = row.get("in_memory")
    if whole:
        text += " | " + part("in memory", whole) + f" | time ratio {row['stream']['seconds'] / whole['seconds']:.2f}"
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
