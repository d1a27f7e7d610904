"""Surgeon vs PEFT, side by side in one run: LoRA apply time and train-step time.

    python benchmarks/lora_vs_peft.py              # table + one JSON line
    python benchmarks/lora_vs_peft.py --json       # the JSON line only
    python benchmarks/lora_vs_peft.py --steps 4 --reps 2   # a quick run

1. apply: LoRA r=8 alpha=16 on q_proj/v_proj of a 7B-shaped Llama built on the meta device.
   A fresh meta model per repetition (construction is not timed); only the apply call is timed;
   one untimed warm-up apply per library, then `--reps` timed repetitions, surgeon and PEFT
   alternating (and swapping which goes first); medians reported.
   Extra row: the same apply on the small CPU model with real weights (surgeon fingerprints the
   touched tensors, which only costs anything when there are real weights).
2. train step: forward + backward + AdamW step, loss = model(ids, labels=ids).loss, on a small
   Llama (512 hidden, 8 layers, 32k vocab), batch 4 x 128, fp32, for surgeon LoRA, PEFT LoRA and full
   fine-tuning, all from the same initial weights (torch.manual_seed(0)); both LoRA variants carry
   the very same A/B values. 2 warm-up steps each, then `--steps` timed steps each, run round-robin
   in rounds (the order rotates every round) so machine noise hits all variants alike; medians.

Before timing, surgeon and PEFT are checked to compute the same function: with identical random
lora_A and lora_B in both, their logits must agree within 1e-4.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402

SPEC = "inject lora r=8 alpha=16 into *.attn.<q,v>"
R, ALPHA, TARGETS = 8, 16, ["q_proj", "v_proj"]
TOLERANCE = 1e-4

BIG = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
           num_key_value_heads=32, vocab_size=32000)
SMALL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=32000)
BATCH, SEQ = 4, 128


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --- model builders and the two apply calls -------------------------------------------------------

def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**shape)


def meta_llama(config) -> nn.Module:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(config)


def cpu_llama(config) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.train()
    return model


def surgeon_apply(model: nn.Module):
    import surgeon

    return surgeon.apply(SPEC, model)


def peft_apply(model: nn.Module):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))


def timed(fn, *args) -> tuple[float, object]:
    gc.collect()
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def bench_apply(build, reps: int) -> dict[str, list[float]]:
    """Alternate surgeon and PEFT (swapping who goes first); rep 0 is an untimed warm-up."""
    times: dict[str, list[float]] = {"surgeon": [], "peft": []}
    appliers = {"surgeon": surgeon_apply, "peft": peft_apply}
    for rep in range(reps + 1):
        order = ["surgeon", "peft"] if rep % 2 == 0 else ["peft", "surgeon"]
        for name in order:
            model = build()
            seconds, result = timed(appliers[name], model)
            if rep > 0:
                times[name].append(seconds)
            del model, result
    return times


# --- sanity check: same function in both libraries ------------------------------------------------

def peft_name(surgeon_name: str) -> str:
    """model.layers.0.self_attn.q_proj.lora_A -> base_model.model.model.layers...lora_A.default.weight"""
    return f"base_model.model.{surgeon_name}.default.weight"


def sync_lora(job, peft_model: nn.Module, *, randomize_b: bool) -> int:
    """Give PEFT surgeon's lora_A (and both the same random lora_B if asked). Returns tensors set."""
    ours = job.trainable_parameters()
    theirs = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    wanted = {peft_name(n): n for n in ours}
    if set(wanted) != set(theirs):
        missing = sorted(set(wanted) - set(theirs))[:3]
        extra = sorted(set(theirs) - set(wanted))[:3]
        raise SystemExit(f"surgeon and PEFT train different tensors: missing in PEFT {missing}, extra {extra}")
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for pname, sname in wanted.items():
            mine, other = ours[sname], theirs[pname]
            if tuple(mine.shape) != tuple(other.shape):
                raise SystemExit(f"{sname}: surgeon {tuple(mine.shape)} vs PEFT {tuple(other.shape)}")
            if randomize_b and sname.endswith("lora_B"):
                mine.copy_(torch.randn(mine.shape, generator=gen, dtype=mine.dtype) * 0.05)
            other.copy_(mine)
    return len(wanted)


def lora_pair(config) -> tuple[object, nn.Module, nn.Module]:
    """(surgeon job, surgeon model, PEFT model), same base weights, same LoRA weights (B zero)."""
    job = surgeon_apply(cpu_llama(config))
    peft_model = peft_apply(cpu_llama(config))
    sync_lora(job, peft_model, randomize_b=False)
    return job, job.model, peft_model


def sanity_check(config, ids: torch.Tensor) -> dict[str, float | int]:
    with torch.no_grad():
        base_logits = cpu_llama(config).eval()(ids).logits
        job = surgeon_apply(cpu_llama(config))
        peft_model = peft_apply(cpu_llama(config))
        job.model.eval()
        peft_model.eval()
        zero_b = (job.model(ids).logits - base_logits).abs().max().item()  # B = 0: LoRA is a no-op
        count = sync_lora(job, peft_model, randomize_b=True)
        ours = job.model(ids).logits
        theirs = peft_model(ids).logits
    diff = (ours - theirs).abs().max().item()
    effect = (ours - base_logits).abs().max().item()
    if diff > TOLERANCE:
        raise SystemExit(f"surgeon and PEFT disagree: max |logits diff| = {diff:.3g} > {TOLERANCE}")
    return {"max_abs_logits_diff": diff, "lora_effect_max_abs": effect, "zero_b_max_abs": zero_b,
            "tensors_synced": count}


# --- train step ----------------------------------------------------------------------------------

class Variant:
    def __init__(self, name: str, model: nn.Module, params: list[nn.Parameter]) -> None:
        self.name, self.model, self.params = name, model, params
        self.model.train()
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.times: list[float] = []
        self.loss = float("nan")

    def step(self, ids: torch.Tensor) -> float:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        seconds = time.perf_counter() - start
        self.loss = loss.item()
        return seconds


def bench_train(config, ids: torch.Tensor, steps: int, per_round: int) -> dict[str, Variant]:
    job, our_model, peft_model = lora_pair(config)
    full = cpu_llama(config)
    variants = [
        Variant("surgeon", our_model, list(job.trainable_parameters().values())),
        Variant("peft", peft_model, [p for p in peft_model.parameters() if p.requires_grad]),
        Variant("full", full, [p for p in full.parameters() if p.requires_grad]),
    ]
    for v in variants:  # warm-up: 2 untimed steps each
        for _ in range(2):
            v.step(ids)
    left = {v.name: steps for v in variants}
    round_no = 0
    while any(left.values()):
        shift = round_no % len(variants)
        for v in variants[shift:] + variants[:shift]:
            for _ in range(min(per_round, left[v.name])):
                v.times.append(v.step(ids))
                left[v.name] -= 1
        round_no += 1
    return {v.name: v for v in variants}


# --- report --------------------------------------------------------------------------------------

def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per variant (default 10)")
    parser.add_argument("--reps", type=int, default=5, help="timed apply repetitions per library (default 5)")
    parser.add_argument("--per-round", type=int, default=1,
                        help="consecutive steps of one variant before the next takes over (default 1)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.reps < 1 or args.per_round < 1:
        parser.error("--steps, --reps and --per-round must be at least 1")

    threads = cores()
    torch.set_num_threads(threads)
    say = (lambda *a, **k: None) if args.json else (lambda *a, **k: print(*a, **k, flush=True))
    wall_start = time.perf_counter()
    load_before = load_average()

    import peft
    import transformers

    import surgeon

    say(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"surgeon {surgeon.__version__}; torch.set_num_threads({threads}) -> "
        f"torch.get_num_threads() = {torch.get_num_threads()}")

    small = llama_config(SMALL)
    ids = torch.randint(0, SMALL["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    say("sanity check (small Llama, same base weights, same random lora_A/lora_B in both) ...")
    sanity = sanity_check(small, ids)
    say(f"  max |logits_surgeon - logits_peft| = {sanity['max_abs_logits_diff']:.3e} (tolerance {TOLERANCE:g}); "
        f"LoRA moves the logits by up to {sanity['lora_effect_max_abs']:.3e}; "
        f"with B = 0 surgeon equals the base model to {sanity['zero_b_max_abs']:.1e}; "
        f"{sanity['tensors_synced']} tensors synced")

    say(f"apply on the meta 7B-shaped Llama: 1 warm-up + {args.reps} reps each ...")
    big = llama_config(BIG)
    with contextlib.redirect_stdout(io.StringIO()):
        apply_big = bench_apply(lambda: meta_llama(big), args.reps)
        apply_small = bench_apply(lambda: cpu_llama(small), args.reps)

    say(f"train step (batch {BATCH}x{SEQ}, fp32): 2 warm-up + {args.steps} timed steps each, "
        f"round-robin {args.per_round} at a time ...")
    trained = bench_train(small, ids, args.steps, args.per_round)

    counts = {
        "surgeon": sum(p.numel() for p in trained["surgeon"].params),
        "peft": sum(p.numel() for p in trained["peft"].params),
        "full": sum(p.numel() for p in trained["full"].params),
    }
    a_s, a_p = median(apply_big["surgeon"]), median(apply_big["peft"])
    as_s, as_p = median(apply_small["surgeon"]), median(apply_small["peft"])
    t_s, t_p, t_f = (median(trained[n].times) for n in ("surgeon", "peft", "full"))
    wall = time.perf_counter() - wall_start

    figures = {
        "benchmark": "lora_vs_peft",
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "surgeon": surgeon.__version__,
                     "python": platform.python_version()},
        "sanity": sanity,
        "apply_7b_meta_s": {"surgeon": a_s, "peft": a_p, "reps": args.reps,
                            "all": {k: [round(x, 6) for x in v] for k, v in apply_big.items()}},
        "apply_small_cpu_s": {"surgeon": as_s, "peft": as_p, "reps": args.reps},
        "train_step_s": {"surgeon": t_s, "peft": t_p, "full": t_f, "steps": args.steps,
                         "min": {n: min(v.times) for n, v in trained.items()},
                         "per_round": args.per_round, "batch": BATCH, "seq": SEQ,
                         "all": {n: [round(x, 5) for x in v.times] for n, v in trained.items()}},
        "final_loss": {n: v.loss for n, v in trained.items()},
        "trainable_params": counts,
        "ratios": {"apply_surgeon_over_peft": a_s / a_p, "apply_small_surgeon_over_peft": as_s / as_p,
                   "train_surgeon_over_peft": t_s / t_p, "train_full_over_surgeon": t_f / t_s,
                   "train_min_surgeon_over_peft": min(trained["surgeon"].times) / min(trained["peft"].times),
                   "train_min_full_over_surgeon": min(trained["full"].times) / min(trained["surgeon"].times)},
        "wall_s": wall,
        "loadavg_before_after": [load_before, load_average()],
    }

    if not args.json:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"surgeon vs PEFT: LoRA r={R} alpha={ALPHA} on q,v  (CPU, {figures['threads']} threads, medians)")
        table.add_column("measurement")
        table.add_column("surgeon", justify="right")
        table.add_column("PEFT", justify="right")
        table.add_column("full FT", justify="right")
        table.add_column("surgeon / PEFT", justify="right")
        table.add_column("full / surgeon", justify="right")
        ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
        table.add_row(f"apply, 7B Llama on meta (n={args.reps})", ms(a_s), ms(a_p), "-", f"{a_s / a_p:.2f}x", "-")
        table.add_row(f"apply, small Llama on CPU (n={args.reps})", ms(as_s), ms(as_p), "-", f"{as_s / as_p:.2f}x", "-")
        table.add_row(f"train step, small {BATCH}x{SEQ} (n={args.steps})", ms(t_s), ms(t_p), ms(t_f),
                      f"{t_s / t_p:.2f}x", f"{t_f / t_s:.2f}x")
        b_s, b_p, b_f = (figures["train_step_s"]["min"][n] for n in ("surgeon", "peft", "full"))
        table.add_row("train step, best of n (less load-sensitive)", ms(b_s), ms(b_p), ms(b_f),
                      f"{b_s / b_p:.2f}x", f"{b_f / b_s:.2f}x")
        table.add_row("trainable parameters", f"{counts['surgeon']:,}", f"{counts['peft']:,}", f"{counts['full']:,}",
                      "", "")
        table.add_row("loss after last step", *(f"{trained[n].loss:.4f}" for n in ("surgeon", "peft", "full")), "", "")
        Console(width=max(120, Console().width)).print(table)
        print(f"wall time {wall:.1f} s; 1/5/15-min load average before {load_before}, after {load_average()} "
              f"({threads} cores: a load above that means other processes shared the CPU)")
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
