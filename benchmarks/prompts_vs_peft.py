"""The prompt family, surgeon vs PEFT, in one run: train-step time and greedy generation time.

    python benchmarks/prompts_vs_peft.py                 # table + one JSON line
    python benchmarks/prompts_vs_peft.py --steps 4 --methods prompt,prefix

For each method a small Llama (512 hidden, 8 layers, 32k vocab, fp32) is patched in place by
surgeon; PEFT's model is the surgeon run exported with `job.save(dir, format="peft")` and loaded
into a trainable PEFT model built from the saved config (`get_peft_model` + `set_peft_model_state_dict`:
PEFT refuses `from_pretrained(..., is_trainable=True)` for prompt learning) on a second copy of the
same base, so both carry the same prompt weights. Before timing, the logits on the real tokens must agree within 1e-4
and surgeon's greedy `generate` must give the reference tokens. The reference for the tokens is greedy decoding
by full forward passes of PEFT's model (PEFT's own generate ignores a prefix on Llama with
transformers 5.24; the row says whether it agreed). A train step is forward + backward + AdamW
step on a batch of 4 x 128; generation is 32 new tokens, greedy, with the KV cache, from 4 x 16.
Surgeon and PEFT alternate (the order swaps every repetition); medians; surgeon / PEFT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import surgeon  # noqa: E402
from surgeon.methods.base import registry  # noqa: E402

SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=32000)
SPECS = {
    "prompt": "inject prompt tokens=20 into embed",
    "ptuning": "inject ptuning tokens=20 encoder=mlp hidden=256 into embed",
    "prefix": "inject prefix tokens=20 into *.attn",
    "prefix-mlp": "inject prefix tokens=20 projection=256 into *.attn",
}
TOLERANCE = 1e-4


def llama() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))


def pair(spec: str) -> tuple[surgeon.Job, nn.Module, nn.Module]:
    import peft

    ours, theirs = llama(), llama()
    job = surgeon.apply(spec, ours, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in job.trainable_parameters().values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as folder:
        job.save(folder, format="peft")
        # PEFT refuses is_trainable=True for a saved prompt-learning adapter: build it from the
        # saved config for training, then load the saved tensors into it
        config = peft.PeftConfig.from_pretrained(folder)
        config.inference_mode = False
        peft_model = peft.get_peft_model(theirs, config)
        if not getattr(config, "prefix_projection", False):  # a projected prefix's export is the MLP's output
            peft.set_peft_model_state_dict(peft_model, load_file(f"{folder}/adapter_model.safetensors"))
    copy_encoder(job, peft_model.prompt_encoder["default"])
    return job, ours, peft_model


@torch.no_grad()
def copy_encoder(job: surgeon.Job, encoder: nn.Module) -> None:
    """PEFT's checkpoint holds what an encoder produces; in training mode PEFT runs its own encoder
    (P-tuning's MLP, prefix tuning's projection), so give it surgeon's encoder weights."""
    tensors = job.added_tensors()
    if hasattr(encoder, "mlp_head") or hasattr(encoder, "lstm_head"):  # P-tuning: module for module
        ours = job._surgery.patches[0][1].owner.prompt_encoder
        encoder.load_state_dict(ours.state_dict())
    elif getattr(encoder, "prefix_projection", False):  # prefix MLP: layer 0 holds the shared parts
        paths = [r.target.path for r in job.plan.rewrites]
        encoder.embedding.weight.copy_(tensors[f"{paths[0]}.prefix_embedding"])
        encoder.transform[0].weight.copy_(tensors[f"{paths[0]}.prefix_in_weight"])
        encoder.transform[0].bias.copy_(tensors[f"{paths[0]}.prefix_in_bias"])
        encoder.transform[2].weight.copy_(torch.cat([tensors[f"{p}.prefix_out_weight"] for p in paths], 0))
        encoder.transform[2].bias.copy_(torch.cat([tensors[f"{p}.prefix_out_bias"] for p in paths], 0))


@torch.no_grad()
def greedy_loop(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by full forward passes, no cache: the reference for what generate must give
    (PEFT's own generate ignores a prefix on Llama with transformers 5.24)."""
    for _ in range(new_tokens):
        logits = model(input_ids=ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def median_ms(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def bench(name: str, steps: int, reps: int) -> dict[str, object]:
    job, ours, theirs = pair(SPECS[name])
    short = torch.randint(3, SMALL["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(2))
    ours.eval(), theirs.eval()
    with torch.no_grad():
        diff = (ours(input_ids=short).logits[:, -16:] - theirs(input_ids=short).logits[:, -16:]).abs().max().item()
        generated = ours.generate(short, max_new_tokens=32, do_sample=False)
        same_tokens = torch.equal(generated, greedy_loop(theirs, short, 32))
        same_as_peft_generate = torch.equal(generated, theirs.generate(input_ids=short, max_new_tokens=32,
                                                                       do_sample=False))
    if diff > TOLERANCE or not same_tokens:
        raise SystemExit(f"{name}: surgeon and PEFT disagree (logits {diff:.2e}, same tokens {same_tokens})")
    long = torch.randint(3, SMALL["vocab_size"], (4, 128), generator=torch.Generator().manual_seed(3))

    def trainer(model: nn.Module, params: list[nn.Parameter]):
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step() -> None:
            model(input_ids=long, labels=long).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def generator(model: nn.Module):
        def run() -> None:
            with torch.no_grad():
                model.generate(input_ids=short, max_new_tokens=32, do_sample=False)
        return run

    ours.train(), theirs.train()
    train = {"surgeon": trainer(ours, list(job.trainable_parameters().values())),
             "peft": trainer(theirs, [p for p in theirs.parameters() if p.requires_grad])}
    times = _alternate(train, steps)
    ours.eval(), theirs.eval()
    gen = _alternate({"surgeon": generator(ours), "peft": generator(theirs)}, reps)
    row = {"method": name, "logits_max_abs_diff": diff, "same_greedy_tokens": same_tokens,
           "same_as_peft_generate": same_as_peft_generate,
           "trainable": sum(p.numel() for p in job.trainable_parameters().values())}
    for label, found in (("train", times), ("generate", gen)):
        ours_ms, theirs_ms = statistics.median(found["surgeon"]), statistics.median(found["peft"])
        row |= {f"{label}_surgeon_ms": ours_ms, f"{label}_peft_ms": theirs_ms, f"{label}_ratio": ours_ms / theirs_ms}
    return row


def _alternate(variants: dict[str, object], reps: int) -> dict[str, list[float]]:
    for run in variants.values():  # warm-up
        run()  # type: ignore[operator]
    times: dict[str, list[float]] = {key: [] for key in variants}
    for index in range(reps):
        for key in (list(variants) if index % 2 == 0 else list(reversed(variants))):
            times[key] += median_ms(variants[key], 1)  # type: ignore[arg-type]
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the prompt family: train step and generation, surgeon vs PEFT")
    parser.add_argument("--steps", type=int, default=8, help="timed train steps per variant (default 8)")
    parser.add_argument("--reps", type=int, default=8, help="timed generations per variant (default 8)")
    parser.add_argument("--methods", default=",".join(SPECS), help="comma-separated subset of " + ",".join(SPECS))
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    available = {name for _, name in registry()}
    rows = []
    for name in [n for n in args.methods.split(",") if n]:
        if name not in SPECS:
            parser.error(f"unknown method {name}; choose from {', '.join(SPECS)}")
        if SPECS[name].split()[1] not in available:
            rows.append({"method": name, "skipped": "not registered"})
            continue
        if not args.json:
            print(f"{name} ...", flush=True)
        rows.append(bench(name, args.steps, args.reps))
    if not args.json:
        print(f"\n{'method':<11} {'trainable':>10} {'train ms (s/PEFT)':>26} {'generate 32 ms (s/PEFT)':>30}")
        for row in rows:
            if "skipped" in row:
                print(f"{row['method']:<11} skipped: {row['skipped']}")
                continue
            print(f"{row['method']:<11} {row['trainable']:>10,} "
                  f"{row['train_surgeon_ms']:>8.1f} / {row['train_peft_ms']:>7.1f} ({row['train_ratio']:.2f}x) "
                  f"{row['generate_surgeon_ms']:>9.1f} / {row['generate_peft_ms']:>7.1f} ({row['generate_ratio']:.2f}x)")
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
