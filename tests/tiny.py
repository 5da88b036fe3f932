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


def make_tokenizer(vocab_size: int = 320, bos: bool = False):
    """A fast byte-level BPE tokenizer (GPT-2 style) with an EOS token, trained on CORPUS. `bos=True`: it also
    has a `<s>` BOS that its post-processor puts in front of every text (as Llama / Gemma / Mistral do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"] + (["<s>"] if bos else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    if not bos:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def _llama_like(hidden: int, layers: int) -> dict:
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)


# arch -> (transformers config class, its size arguments, family-specific arguments of the tiny model)
ARCHS = {
    "llama": ("LlamaConfig", _llama_like, {}),
    "qwen2": ("Qwen2Config", _llama_like, {}),
    "qwen3": ("Qwen3Config", _llama_like, {"head_dim": 8}),
    "mistral": ("MistralConfig", _llama_like, {}),
    "gemma": ("GemmaConfig", _llama_like, {"head_dim": 8}),
    # a cap small enough to bend these tiny logits (Gemma-2's real one is 30)
    "gemma2": ("Gemma2Config", _llama_like, {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 8,
                                              "final_logit_softcapping": 2.0, "attn_implementation": "eager"}),
    "gemma3": ("Gemma3TextConfig", _llama_like, {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 8,
                                                  "final_logit_softcapping": 2.0}),
    "phi3": ("Phi3Config", _llama_like, {}),
    "phi": ("PhiConfig", _llama_like, {}),  # lm_head with a bias
    "granite": ("GraniteConfig", _llama_like, {"logits_scaling": 4.0, "embedding_multiplier": 2.0,
                                                "residual_multiplier": 0.5, "attention_multiplier": 0.25}),
    "cohere": ("CohereConfig", _llama_like, {"logit_scale": 0.5}),
    "olmo2": ("Olmo2Config", _llama_like, {}),
    "falcon_h1": ("FalconH1Config", _llama_like, {"lm_head_multiplier": 0.5, "mamba_n_heads": 4, "mamba_d_head": 16,
                                                   "mamba_d_ssm": 64, "mamba_d_state": 8, "mamba_chunk_size": 16}),
    "gpt2": ("GPT2Config", lambda h, n: dict(n_embd=h, n_layer=n, n_head=4, n_positions=512), {}),
    "gpt_neox": ("GPTNeoXConfig", lambda h, n: dict(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n,
                                                     num_attention_heads=4, max_position_embeddings=512), {}),
}


def make_model_dir(path: Path, arch: str = "llama", vocab_size: int = 320, seed: int = 0, tie: bool = True,
                   hidden: int = 32, layers: int = 2, bos: bool = False, **extra) -> Path:
    """Save a tiny random causal LM of one of ARCHS (Llama-, Qwen-, Gemma-, GPT-2-style, ...) + tokenizer to `path`
    (an HF directory); `bos=True` gives it a tokenizer that adds a BOS; `extra` overrides config fields."""
    import transformers
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(vocab_size, bos=bos)
    name, sizes, family = ARCHS[arch]
    ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id if bos else tok.eos_token_id)
    config = getattr(transformers, name)(**{**sizes(hidden, layers), **family, **ids, **extra,
                                            "vocab_size": len(tok), "tie_word_embeddings": tie})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    with torch.no_grad():  # larger random logits so entropies spread over the buckets
        head.weight.mul_(8.0)
        if getattr(head, "bias", None) is not None:  # initialised to 0: make a forgotten bias visible
            head.bias.normal_()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
