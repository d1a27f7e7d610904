"""Supervised fine-tuning with TRL's SFTTrainer and QLoRA on the bundled tiny Llama (CPU, no
downloads, under a minute).

    python examples/sft_with_trl.py [OUT_DIR]

The model has no tokenizer of its own, so a word-level one is built here (words w0..w249); the
dataset is text. TRL drives training; surgeon's spec says what trains. The checkpoints are surgeon
runs, and `surgeon merge` makes a plain model of the last one.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
import trl
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers

import surgeon

BASE = Path(__file__).parent / "tiny-llama"
SPEC = """
quantize base nf4 double
inject lora r=8 alpha=16 into *.attn.<q,k,v,o>
"""


def word_tokenizer(words: int = 250) -> transformers.PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(words)} | {"[UNK]": words, "[PAD]": words + 1, "[EOS]": words + 2}
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]", pad_token="[PAD]",
                                                eos_token="[EOS]")


def counting_texts(count: int = 64) -> list[str]:
    starts = torch.randint(0, 230, (count,), generator=torch.Generator().manual_seed(0)).tolist()
    return [" ".join(f"w{start + i}" for i in range(12)) for start in starts]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="surgeon-trl-"))
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(BASE)
    job = surgeon.apply(SPEC, model, seed=0)
    print(job.summary())
    config = trl.SFTConfig(output_dir=str(out), max_steps=30, save_steps=15, learning_rate=5e-3,
                           per_device_train_batch_size=8, logging_steps=10, report_to=[], use_cpu=True,
                           disable_tqdm=True)
    sft = trl.SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": counting_texts()}),
                         processing_class=word_tokenizer())
    sft.train()
    losses = [round(h["loss"], 3) for h in sft.state.log_history if "loss" in h]
    print(f"loss every 10 steps: {losses}")
    checkpoint = out / "checkpoint-30"
    print(f"{checkpoint}: {sorted(p.name for p in checkpoint.iterdir())}")
    merged = out / "merged"
    subprocess.run(["surgeon", "merge", str(checkpoint), "--model", str(BASE), "--out", str(merged), "--force"],
                   check=True)
    print(f"a plain model of the last checkpoint: {merged}")


if __name__ == "__main__":
    main()
