"""Context extension, side by side in one run, against the references (issue 13):

    python benchmarks/context_vs_reference.py              # tables + one JSON line
    python benchmarks/context_vs_reference.py --json       # the JSON line only
    python benchmarks/context_vs_reference.py --tokens 500 --steps 2   # a quick run

1. Streaming generation: a small Llama (256 hidden, 4 layers, 4k vocab, fp32, CPU) decodes
   `--tokens` tokens greedily after an 8-token prompt, one token per forward through the cache:
   plain (transformers' DynamicCache) vs `attend sinks tokens=4 window=252`. Per block of 250
   tokens: tokens per second, the cache's bytes; and the process's peak RSS growth over each run (sinks
   first, so plain's growth is what it needs beyond the sinks run's peak).
2. The LongLoRA train step at 4x the trained length (512 -> 2048 tokens): specs/longlora.peft
   (S2-Attn) vs the same spec without `attend s2` (full attention), forward + backward, medians
   of `--steps` rounds alternating the two.
3. `scale rope TYPE` parity: max |logits| difference from the model transformers builds with that
   rope_parameters and the same weights, Llama/Qwen2/Mistral/GPT-NeoX, eager and sdpa, 240 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import surgeon  # noqa: E402

SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=4096)


def small_llama(trained: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL, max_position_embeddings=trained, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config).eval()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stream(model: torch.nn.Module, tokens: int, block: int = 250) -> dict:
    ids = torch.randint(0, SMALL["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(1))
    cache = transformers.DynamicCache(config=model.config)
    rss0 = peak_rss_mb()
    blocks = []
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True)
        start = time.perf_counter()
        for step in range(1, tokens + 1):
            token = out.logits[:, -1:].argmax(-1)
            out = model(token, cache=cache, use_cache=True)
            if step % block == 0:
                now = time.perf_counter()
                size = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4
                blocks.append({"tokens": step, "tokens_per_s": block / (now - start), "cache_mib": size / 2 ** 20})
                start = now
    return {"blocks": blocks, "rss_growth_mib": peak_rss_mb() - rss0}


def streaming(tokens: int) -> dict:
    """Sinks first: the peak RSS only grows, so the run after shows its growth beyond the first's."""
    model = small_llama(512)
    job = surgeon.apply("attend sinks tokens=4 window=252", model)
    sinks = stream(model, tokens)
    job.revert()
    return {"plain": stream(small_llama(512), tokens), "sinks": sinks}


def train_step(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return time.perf_counter() - start


def longlora(steps: int) -> dict:
    spec = (ROOT / "specs" / "longlora.peft").read_text()
    full_spec = "\n".join(line for line in spec.splitlines() if not line.startswith("attend s2"))
    models = {}
    for name, text in (("s2", spec), ("full", full_spec)):
        model = small_llama(512)
        surgeon.apply(text, model, seed=0)
        models[name] = model.train()
    ids = torch.randint(0, SMALL["vocab_size"], (1, 2048), generator=torch.Generator().manual_seed(2))
    times: dict[str, list[float]] = {"s2": [], "full": []}
    for name in times:  # warm-up
        train_step(models[name], ids)
    for round_ in range(steps):
        for name in (("s2", "full") if round_ % 2 == 0 else ("full", "s2")):
            times[name].append(train_step(models[name], ids))
    s2, full = statistics.median(times["s2"]), statistics.median(times["full"])
    return {"s2_s": s2, "full_s": full, "ratio": s2 / full, "length": 2048, "trained": 512}


def rope_parity() -> list[dict]:
    from test_rope import LONG, build, cases

    rows = []
    for kind in ("llama", "qwen2", "mistral", "gpt_neox"):
        for attention in ("eager", "sdpa"):
            for variant, (statement, parameters) in cases(kind).items():
                model, reference = build(kind, attention), build(kind, attention, parameters)
                reference.load_state_dict(model.state_dict())
                surgeon.apply(statement, model)
                ids = torch.randint(0, 128, (2, LONG), generator=torch.Generator().manual_seed(1))
                with torch.no_grad():
                    diff = (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item()
                rows.append({"model": kind, "attention": attention, "rope": variant, "max_abs_diff": diff})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    result = {"machine": platform.platform(), "torch": torch.__version__, "transformers": transformers.__version__,
              "streaming": streaming(args.tokens), "longlora": longlora(args.steps), "rope": rope_parity()}
    if not args.json:
        print(f"streaming generation, {args.tokens} tokens (tokens/s | cache MiB per block of 250)")
        print(f"{'tokens':>7} {'plain tok/s':>12} {'sinks tok/s':>12} {'plain MiB':>10} {'sinks MiB':>10}")
        for p, s in zip(result["streaming"]["plain"]["blocks"], result["streaming"]["sinks"]["blocks"]):
            print(f"{p['tokens']:>7} {p['tokens_per_s']:>12.1f} {s['tokens_per_s']:>12.1f} {p['cache_mib']:>10.2f} "
                  f"{s['cache_mib']:>10.2f}")
        print(f"peak RSS growth: plain {result['streaming']['plain']['rss_growth_mib']:.1f} MiB, "
              f"sinks {result['streaming']['sinks']['rss_growth_mib']:.1f} MiB")
        ll = result["longlora"]
        print(f"\nLongLoRA train step at {ll['length']} tokens (trained {ll['trained']}): S2-Attn {ll['s2_s']:.3f} s, "
              f"full attention {ll['full_s']:.3f} s, ratio {ll['ratio']:.2f}x")
        print("\nscale rope parity vs the config-built model (max |logit diff|, 240 tokens)")
        worst = max(row["max_abs_diff"] for row in result["rope"])
        for row in result["rope"]:
            print(f"  {row['model']:>8} {row['attention']:>5} {row['rope']:>13} {row['max_abs_diff']:.1e}")
        print(f"  worst of {len(result['rope'])}: {worst:.1e}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
