"""Build the small example models bundled in examples/ (random weights, fixed seed, no network).

    python examples/make_examples.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return LlamaForCausalLM(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def main() -> None:
    for name, build in (("tiny-llama", tiny_llama), ("tiny-gpt2", tiny_gpt2)):
        torch.manual_seed(0)
        build().save_pretrained(HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
