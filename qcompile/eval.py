"""Accuracy measurement on real models: perplexity of causal LMs, cosine similarity of sentence embeddings.

- `token_windows(tokenizer, text, count, length)`: the first `count` non-overlapping windows of `length` tokens;
- `perplexity(model, windows)`: exp of the mean next-token negative log-likelihood over the windows;
- `embedding_similarity(model, batches, reference)`: (mean, worst) cosine similarity to reference embeddings;
- `Stopwatch`: named stages with progress lines and their times;
- `format_table`: the plain-text tables the demo and the benchmarks print.

Used by `benchmarks/accuracy.py` (SmolLM2-135M perplexity on the Wikipedia excerpt with calibration on the news
corpus; all-MiniLM-L6-v2 embeddings of news sentences with calibration on Wikipedia sentences).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from qcompile import hf


def token_windows(tokenizer, text: str, count: int, length: int = 512) -> list[Tensor]:
    """The first `count` non-overlapping `[1, length]` windows of the tokenized text."""
    needed = count * length
    chars = needed * 6  # English runs at about 4-5 characters per token: tokenize a prefix, longer if need be
    while True:
        ids = tokenizer(text[:chars], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        if len(ids) > needed or chars >= len(text):
            break
        chars *= 2
    if len(ids) < needed:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than {count} windows of {length}")
    return [ids[i * length : (i + 1) * length].unsqueeze(0).clone() for i in range(count)]


def _logits(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits
    if isinstance(output, dict):
        return output["logits"]
    return output[0]


def perplexity(model, windows: Sequence[Tensor], *, progress: bool = True, desc: str = "perplexity") -> float:
    """exp(mean negative log-likelihood of every token given the ones before it in its window)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in tqdm(windows, desc=desc, disable=not progress, leave=False, unit="window"):
            logits = _logits(model(window)).float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1), reduction="sum"
            )
            total += nll.item()
            count += window[:, 1:].numel()
    return math.exp(total / count)


def embedding_similarity(model, batches: Iterable[dict], reference: Tensor) -> tuple[float, float]:
    """(mean, worst) cosine similarity of the model's sentence embeddings to `reference`."""
    return hf.cosine_stats(hf.sentence_embeddings(model, batches), reference)


def format_table(header: Sequence[str], rows: Iterable[Sequence], left: int = 1) -> str:
    """A plain-text table: the first `left` columns left-aligned, the rest right-aligned, a rule under the header."""
    lines = [[str(cell) for cell in header]] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        cells = [c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


class Stopwatch:
    """Prints each stage as it starts and ends, with its wall time; `times` keeps them by name."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        if self.enabled:
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=self.stream, flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.times[name] = elapsed
            if self.enabled:
                print(f"[{time.strftime('%H:%M:%S')}] {name}: {elapsed:.1f} s", file=self.stream, flush=True)


__all__ = ["Stopwatch", "embedding_similarity", "format_table", "perplexity", "token_windows"]
