"""Tiny random causal LMs (GPT-2, LLaMA, Gemma3) saved with a tiny BPE tokenizer, for the probe tests."""
from __future__ import annotations

import torch

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "A small model reads every word of this sentence and predicts the next one in turn.",
    "Researchers studied how the norm of each token grows across the layers of the network.",
    "On sunny days the children walk to school along the old road past the farm and the mill.",
    "Prices rose sharply in the third quarter as demand for energy outstripped the available supply.",
    "The committee will meet again next week to discuss the proposal and vote on the final budget.",
]


def tokenizer(vocab_size: int = 120):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def save(kind: str, path, layers: int = 3) -> str:
    """Save a random `kind` model (gpt2 / llama / gemma3) and its tokenizer to path; returns the path."""
    from transformers import (AutoModelForCausalLM, GPT2Config, Gemma3TextConfig, LlamaConfig)

    torch.manual_seed(0)
    tok = tokenizer()
    v = len(tok)
    if kind == "gpt2":
        cfg = GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=v, n_positions=128,
                         bos_token_id=1, eos_token_id=1)
    elif kind == "llama":
        cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=v, max_position_embeddings=128, bos_token_id=1,
                          eos_token_id=1, pad_token_id=0)
    elif kind == "gemma3":
        cfg = Gemma3TextConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, vocab_size=v, max_position_embeddings=128,
                               sliding_window=16, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(cfg)
    # Norm gains 1 and biases 0 would make norm(norm(x)) == norm(x) and hide a double norm: randomise them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
