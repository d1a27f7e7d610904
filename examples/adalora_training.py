"""AdaLoRA in a plain PyTorch training loop, on a tiny random Llama (CPU, no downloads, a few seconds).

    python examples/adalora_training.py

The rank budget starts at init_r=8 per matrix, falls (cubically) to target_r=2 per matrix on average
between step tinit=10 and step total_steps - tfinal = 50, and is fixed for the last 10 steps; the
allocator gives the rank to the matrices whose singular triplets matter most.
"""

from __future__ import annotations

import torch
import transformers

import surgeon
from surgeon.methods.weights.adalora import ranks

SPEC = """
inject adalora init_r=8 target_r=2 tinit=10 tfinal=10 total_steps=60 alpha=16 into *.attn.<q,v>
"""
TOTAL_STEPS = 60


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(config)


def main() -> None:
    model = tiny_llama().train()
    job = surgeon.apply(SPEC, model, seed=0)
    trainable = sum(p.numel() for p in job.trainable_parameters().values())
    print(f"trainable parameters: {trainable} (of {sum(p.numel() for p in model.parameters())})")

    optimizer = torch.optim.AdamW(job.trainable_parameters().values(), lr=5e-2)
    # a toy language: every sequence counts up from a random start, so there is something to learn
    starts = torch.randint(0, 96, (8, 1), generator=torch.Generator().manual_seed(1))
    ids = starts + torch.arange(24)
    for step in range(TOTAL_STEPS):
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + job.regularization()  # AdaLoRA's orthogonality term on P and Q
        loss.backward()
        optimizer.step()
        job.step(step, optimizer)  # importance scores and the rank budget; gradients are still here
        optimizer.zero_grad()
        if step % 10 == 0 or step == TOTAL_STEPS - 1:
            total = sum(ranks(model).values())
            print(f"step {step:3d}  loss {out.loss.item():.3f}  total rank {total}")

    print("ranks kept per matrix:")
    for name, rank in ranks(model).items():
        print(f"  {name}: {rank}")
    job.revert()  # the original model again, bit for bit


if __name__ == "__main__":
    main()
