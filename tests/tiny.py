"""Tiny random causal LMs and a tiny byte-level BPE tokenizer, built in seconds for tests."""
from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Let x_n be the number of strings of length n; then x_(n+1) = 2 x_n + 1. ",
    "Thus, in total, there are 239 such strings. Hello wörld, naïve café 日本語 🙂. ",
    "def f(n):\n    return n * (n + 1) // 2\n\n",
    "In 1905 Einstein wrote four papers; the third introduced special relativity. ",
]


def make_tokenizer(vocab_size: int = 320):
    """A fast byte-level BPE tokenizer (GPT-2 style) with an EOS token, trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_model_dir(path: Path, arch: str = "llama", vocab_size: int = 320, seed: int = 0, tie: bool = True,
                   hidden: int = 32, layers: int = 2, **extra) -> Path:
    """Save a tiny random Llama-, Qwen2- or Mistral-style causal LM + tokenizer to `path` (an HF directory)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    tok = make_tokenizer(vocab_size)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    config = cls(**extra,
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger random logits so entropies spread over the buckets
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
