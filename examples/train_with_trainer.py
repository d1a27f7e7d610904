"""LoRA with transformers' Trainer on the bundled tiny Llama (CPU, no downloads, under a minute).

    python examples/train_with_trainer.py [OUT_DIR]

Trainer knows nothing of surgeon: every `save_steps` checkpoint it writes is a surgeon run
(manifest, spec, adapters: under 100 KB with Trainer's optimizer and RNG state, beside the
model's 430 KB), `resume_from_checkpoint` picks the run up exactly, and `surgeon.load(checkpoint, base)` rebuilds the trained model from it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import transformers

import surgeon

BASE = Path(__file__).parent / "tiny-llama"
SPEC = "inject lora r=8 alpha=16 into *.attn.<q,v>"


class CountingData(torch.utils.data.Dataset):
    """A toy language: every sequence counts up from a random start, so there is something to learn."""

    def __init__(self, count: int = 64) -> None:
        starts = torch.randint(0, 200, (count, 1), generator=torch.Generator().manual_seed(0))
        self.ids = starts + torch.arange(16)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def train(out: Path, resume: Path | None = None) -> tuple[transformers.PreTrainedModel, surgeon.Job]:
    model = transformers.AutoModelForCausalLM.from_pretrained(BASE)
    job = surgeon.apply(SPEC, model, seed=0)  # the run records BASE as its source
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=40, save_steps=20, learning_rate=5e-3,
                                          per_device_train_batch_size=8, logging_steps=10, report_to=[],
                                          use_cpu=True, seed=0, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=CountingData()).train(
        resume_from_checkpoint=str(resume) if resume else None)
    return model, job


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="surgeon-trainer-"))
    transformers.logging.set_verbosity_error()
    job_model, job = train(out / "full")
    job.print_trainable_parameters()
    checkpoint = out / "full" / "checkpoint-40"
    size = sum(p.stat().st_size for p in checkpoint.iterdir())
    print(f"{checkpoint}: {sorted(p.name for p in checkpoint.iterdir())}, {size / 1024:.0f} KiB in all")

    fresh = transformers.AutoModelForCausalLM.from_pretrained(BASE)
    surgeon.load(checkpoint, fresh)
    ids = CountingData().ids[:2]
    with torch.no_grad():
        same = torch.equal(fresh(input_ids=ids).logits, job_model(input_ids=ids).logits)
    print(f"surgeon.load(checkpoint, base) gives the trained model: {same}")

    _, resumed = train(out / "resumed", resume=out / "full" / "checkpoint-20")
    equal = all(torch.equal(a, b) for a, b in zip(job.trainable_parameters().values(),
                                                  resumed.trainable_parameters().values()))
    print(f"resumed from checkpoint-20, the same weights as the uninterrupted run: {equal}")
    try:
        transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    except ValueError as problem:
        print(f"from_pretrained(checkpoint) refuses, and says how: ...{str(problem)[40:160]}...")


if __name__ == "__main__":
    main()
