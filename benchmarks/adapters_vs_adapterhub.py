"""Surgeon vs AdapterHub `adapters` 1.3: bottleneck-adapter train steps and AdapterDrop inference.

    python benchmarks/adapters_vs_adapterhub.py            # table + one JSON line
    python benchmarks/adapters_vs_adapterhub.py --json     # the JSON line only
    python benchmarks/adapters_vs_adapterhub.py --quick    # smoke run: 2 steps, 1 warm-up, batch 2 x 32
    python benchmarks/adapters_vs_adapterhub.py --configs pfeiffer,full --steps 20

One Llama (512 hidden, 1376 FFN, 8 layers, 8 heads, 32k vocab, SDPA, fp32), batch 4 x 128.

1. train step: forward + backward + AdamW step, loss = model(ids, labels=ids).loss, for
   `inject adapter config=pfeiffer|houlsby|parallel` (surgeon, this venv, transformers 5.x) and
   SeqBnConfig / DoubleSeqBnConfig / ParBnConfig (AdapterHub, its own venv, transformers 4.57,
   in a long-lived worker subprocess: benchmarks/_adapterhub_worker.py), plus full fine-tuning of
   the plain model on both sides (the reference of the adapter / full ratios).
2. inference: forward under torch.no_grad in eval mode of the plain model, pfeiffer, and pfeiffer
   with AdapterDrop of layers 0-3 (`drop adapters in layers.[0-3]` vs
   `set_active_adapters("a", skip_layers=[0, 1, 2, 3])`).

Both sides start from the very same base weights (this process saves them as safetensors into a
temporary folder, the worker loads them) and, per adapter config, the same initial adapter
weights (the library's initialisation, copied into surgeon's adapter under its names). Every
variant's models are built once. Steps are interleaved one by one, surgeon and AdapterHub
alternating, the order rotating every round (the first `--warmup` rounds are not timed), so
background load hits both alike; each side times its own step with perf_counter. Medians and
best-of-n. Before anything is timed, each config (and pfeiffer with the drop) is checked: the same
random adapter weights in both, the two losses must agree within 1e-4 (else the script exits).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
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
from surgeon.adapterhub_format import surgeon_name  # noqa: E402

SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=32000)
BATCH, SEQ = 4, 128
QUICK_BATCH, QUICK_SEQ = 2, 32
TOLERANCE = 1e-4
ADAPTER = "a"  # the worker's adapter name
SPECS = {"pfeiffer": "inject adapter config=pfeiffer", "houlsby": "inject adapter config=houlsby",
         "parallel": "inject adapter config=parallel"}
DROP = "\ndrop adapters in layers.[0-3]"
LIBRARY = {"pfeiffer": "SeqBnConfig", "houlsby": "DoubleSeqBnConfig", "parallel": "ParBnConfig"}
TRAIN = ["pfeiffer", "houlsby", "parallel", "full"]
INFER = ["plain", "pfeiffer", "pfeiffer_drop"]
WORKER = Path(__file__).resolve().parent / "_adapterhub_worker.py"
DEFAULT_PYTHON = os.environ.get("ADAPTERHUB_PYTHON", "/work/venvs/adapterhub/bin/python")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_cpu_s() -> float | None:
    """CPU seconds every process of the machine has used (all but idle and iowait), /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float | None:
    """utime + stime of a live process (/proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --- the library's side: a worker subprocess in AdapterHub's venv --------------------------------

class Library:
    """benchmarks/_adapterhub_worker.py, one JSON line each way per command."""

    def __init__(self, python: str) -> None:
        self.log = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env, bufsize=1)

    def send(self, **msg) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        answer = json.loads(line) if line.strip() else {"ok": False, "error": "the worker exited"}
        if not answer.get("ok"):
            self.log.seek(0)
            tail = self.log.read()[-3000:]
            raise SystemExit(f"AdapterHub worker failed: {answer.get('error')}\n{answer.get('traceback', '')}{tail}")
        return answer

    def __call__(self, **msg) -> dict:
        self.send(**msg)
        return self.receive()

    def cpu_s(self) -> float | None:
        return process_cpu_s(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(cmd="quit")
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --- surgeon's side ------------------------------------------------------------------------------

class Base:
    def __init__(self, shape: dict) -> None:
        self.shape = shape
        self.state: dict[str, torch.Tensor] = {}

    def config(self):
        from transformers import LlamaConfig

        config = LlamaConfig(**self.shape)
        config._attn_implementation = "sdpa"
        return config

    def build(self) -> nn.Module:
        """A plain Llama with the shared base weights (the first call draws them, seed 0)."""
        from transformers import LlamaForCausalLM

        if not self.state:
            torch.manual_seed(0)
            model = LlamaForCausalLM(self.config())
            self.state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
            return model
        model = LlamaForCausalLM(self.config())
        model.load_state_dict(self.state)
        return model


def surgeon_model(base: Base, variant: str) -> tuple[nn.Module, list[nn.Parameter], object]:
    """(model, trainable parameters, job or None) for a variant: a config, full, plain, pfeiffer_drop."""
    model = base.build()
    if variant in ("full", "plain"):
        return model, list(model.parameters()), None
    spec = SPECS["pfeiffer"] + DROP if variant == "pfeiffer_drop" else SPECS[variant]
    job = surgeon.apply(spec, model, seed=0)
    return model, list(job.trainable_parameters().values()), job


def copy_adapter(job, path: Path) -> int:
    """The worker's adapter tensors (AdapterHub's names) into surgeon's adapter; every tensor must match."""
    from safetensors.torch import load_file

    theirs = load_file(str(path))
    ours = job.trainable_parameters()
    mapped = {surgeon_name(n, ADAPTER): t for n, t in theirs.items()}
    if set(mapped) != set(ours):
        missing, extra = sorted(set(ours) - set(mapped))[:3], sorted(set(mapped) - set(ours))[:3]
        raise SystemExit(f"surgeon and AdapterHub hold different adapter tensors: not in AdapterHub {missing}, "
                         f"not in surgeon {extra}")
    with torch.no_grad():
        for name, tensor in mapped.items():
            if tuple(ours[name].shape) != tuple(tensor.shape):
                raise SystemExit(f"{name}: surgeon {tuple(ours[name].shape)} vs AdapterHub {tuple(tensor.shape)}")
            ours[name].copy_(tensor)
    return len(mapped)


def sanity_check(base: Base, library: Library, tmp: Path, ids: torch.Tensor, configs: list[str]) -> dict:
    """Per config (and pfeiffer with the drop): the same random adapter weights in both libraries
    give the same loss (within TOLERANCE) and logits; not timed."""
    from safetensors.torch import load_file

    with torch.no_grad():
        base_loss = base.build().eval()(ids, labels=ids).loss.item()
    results = {}
    cases = [(c, None) for c in configs] + ([("pfeiffer", [0, 1, 2, 3])] if "pfeiffer" in configs else [])
    for config, skip in cases:
        answer = library(cmd="sanity", config=config, skip=skip)
        model, _, job = surgeon_model(base, "pfeiffer_drop" if skip else config)
        synced = copy_adapter(job, tmp / "sanity_adapter.safetensors")
        model.eval()
        with torch.no_grad():
            out = model(ids, labels=ids)
        theirs = load_file(str(tmp / "sanity_logits.safetensors"))["logits"]
        name = config + ("_drop0-3" if skip else "")
        results[name] = {"loss_surgeon": out.loss.item(), "loss_adapterhub": answer["loss"],
                         "loss_diff": abs(out.loss.item() - answer["loss"]),
                         "max_abs_logits_diff": (out.logits - theirs).abs().max().item(),
                         "adapter_effect_on_loss": abs(out.loss.item() - base_loss), "tensors": synced}
        if results[name]["loss_diff"] > TOLERANCE:
            raise SystemExit(f"{name}: surgeon and AdapterHub disagree: loss {out.loss.item():.6f} vs "
                             f"{answer['loss']:.6f} (tolerance {TOLERANCE:g})")
        del model, job, out, theirs
    return {"base_loss": base_loss, "cases": results}


class Variant:
    """One surgeon-side variant (timed here) or one AdapterHub-side variant (timed in the worker)."""

    def __init__(self, side: str, name: str, kind: str, run) -> None:
        self.side, self.name, self.kind, self.run = side, name, kind, run
        self.times: list[float] = []
        self.loss = float("nan")


def surgeon_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> tuple[float, float]:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    return seconds, loss.item()


def surgeon_infer_step(model: nn.Module, ids: torch.Tensor) -> tuple[float, float]:
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids)
    return time.perf_counter() - start, float("nan")


def interleave(variants: list[Variant], steps: int, warmup: int) -> None:
    """Rounds of one step per variant, the list alternating surgeon / AdapterHub and rotating by one
    every round; the first `warmup` rounds are not timed."""
    for round_no in range(warmup + steps):
        shift = round_no % len(variants)
        for v in variants[shift:] + variants[:shift]:
            time.sleep(0.01)  # let the other process's OpenMP threads stop spinning
            seconds, loss = v.run()
            v.loss = loss
            if round_no >= warmup:
                v.times.append(seconds)


# --- report --------------------------------------------------------------------------------------

def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarize(variants: dict[tuple[str, str], Variant]) -> dict:
    med = {f"{s}/{n}": median(v.times) for (s, n), v in variants.items()}
    best = {f"{s}/{n}": min(v.times) if v.times else float("nan") for (s, n), v in variants.items()}
    out: dict = {"median_s": med, "min_s": best, "ratios": {}}
    names = sorted({n for _, n in variants},
                   key=lambda n: (n.startswith("infer"), (TRAIN if n.startswith("train") else INFER).index(n[6:])))
    for n in names:
        if ("surgeon", n) in variants and ("adapterhub", n) in variants:
            out["ratios"][f"{n} surgeon/adapterhub"] = ratio(med[f"surgeon/{n}"], med[f"adapterhub/{n}"])
            out["ratios"][f"{n} surgeon/adapterhub (best)"] = ratio(best[f"surgeon/{n}"], best[f"adapterhub/{n}"])
    for side in ("surgeon", "adapterhub"):
        for ref in ("train:full", "infer:plain"):
            if (side, ref) not in variants:
                continue
            for (s, n) in variants:
                if s == side and n.split(":")[0] == ref.split(":")[0] and n != ref:
                    out["ratios"][f"{side} {n} / {side} {ref}"] = ratio(med[f"{side}/{n}"], med[f"{side}/{ref}"])
                    if side == "adapterhub" and ("surgeon", ref) in variants:
                        out["ratios"][f"adapterhub {n} / surgeon {ref}"] = ratio(med[f"{side}/{n}"],
                                                                                  med[f"surgeon/{ref}"])
    return out


def print_tables(figures: dict, variants: dict[tuple[str, str], Variant]) -> None:
    from rich.console import Console
    from rich.table import Table

    med, best = figures["median_s"], figures["min_s"]
    counts = figures["trainable_params"]
    ms = lambda s: f"{s * 1e3:.0f} ms" if s == s else "-"  # noqa: E731
    x = lambda v: f"{v:.2f}x" if v == v else "-"  # noqa: E731
    console = Console(width=max(140, Console().width))
    b, s = figures["batch"], figures["seq"]
    versions = figures["versions"]
    train = [n for n in TRAIN if ("surgeon", f"train:{n}") in variants or ("adapterhub", f"train:{n}") in variants]
    if train:
        table = Table(title=f"train step, batch {b}x{s}, fp32, {figures['threads']} threads: medians of "
                            f"{figures['steps']} (surgeon: transformers {versions['surgeon']['transformers']}; "
                            f"AdapterHub {versions['adapterhub']['adapters']}: transformers "
                            f"{versions['adapterhub']['transformers']})")
        for col in ("config", "surgeon", "AdapterHub", "surgeon / AH", "best-of-n s / AH", "surgeon / full",
                    "AH / AH full", "AH / surgeon full", "trainable", "last loss"):
            table.add_column(col, justify="left" if col == "config" else "right")
        full_s, full_a = med.get("surgeon/train:full", float("nan")), med.get("adapterhub/train:full", float("nan"))
        for n in train:
            key = f"train:{n}"
            sm, am = med.get(f"surgeon/{key}", float("nan")), med.get(f"adapterhub/{key}", float("nan"))
            sb, ab = best.get(f"surgeon/{key}", float("nan")), best.get(f"adapterhub/{key}", float("nan"))
            label = n if n == "full" else f"{n} ({LIBRARY[n].removesuffix('Config')})"
            losses = {f"{variants[(side, key)].loss:.4f}" for side in ("surgeon", "adapterhub") if (side, key) in variants}
            trainable = {counts["surgeon"].get(n, 0), counts["adapterhub"].get(n, 0)}
            table.add_row(label, ms(sm), ms(am), x(ratio(sm, am)), x(ratio(sb, ab)),
                          "-" if n == "full" else x(ratio(sm, full_s)),
                          "-" if n == "full" else x(ratio(am, full_a)), x(ratio(am, full_s)),
                          " / ".join(f"{c:,}" for c in sorted(trainable)), " / ".join(sorted(losses)))
        console.print(table)
    infer = [n for n in INFER if ("surgeon", f"infer:{n}") in variants]
    if infer:
        table = Table(title=f"inference (eval, no_grad), batch {b}x{s}: medians of {figures['steps']}")
        for col in ("model", "surgeon", "AdapterHub", "surgeon / AH", "best-of-n s / AH",
                    "surgeon / plain", "AH / AH plain", "AH / surgeon plain"):
            table.add_column(col, justify="left" if col == "model" else "right")
        labels = {"plain": "plain model", "pfeiffer": "pfeiffer, no drop", "pfeiffer_drop": "pfeiffer, drop 0-3"}
        ps, pa = med["surgeon/infer:plain"], med["adapterhub/infer:plain"]
        for n in infer:
            key = f"infer:{n}"
            sm, am = med[f"surgeon/{key}"], med[f"adapterhub/{key}"]
            sb, ab = best[f"surgeon/{key}"], best[f"adapterhub/{key}"]
            table.add_row(labels[n], ms(sm), ms(am), x(ratio(sm, am)), x(ratio(sb, ab)),
                          "-" if n == "plain" else x(ratio(sm, ps)), "-" if n == "plain" else x(ratio(am, pa)),
                          x(ratio(am, ps)))
        console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 2; quick 1)")
    parser.add_argument("--configs", default="pfeiffer,houlsby,parallel,full,inference",
                        help="comma-separated subset of pfeiffer, houlsby, parallel, full, inference (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: 2 steps, 1 warm-up, batch {QUICK_BATCH}x{QUICK_SEQ}")
    parser.add_argument("--python", default=DEFAULT_PYTHON,
                        help=f"AdapterHub venv's python (default {DEFAULT_PYTHON}; or $ADAPTERHUB_PYTHON)")
    parser.add_argument("--threads", type=int, default=cores(), help="torch threads in both processes (default: cores)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(TRAIN) - {"inference"})
    if unknown:
        parser.error(f"unknown --configs {unknown}: choose from {', '.join(TRAIN + ['inference'])}")
    if steps < 1 or warmup < 0 or args.threads < 1:
        parser.error("--steps and --threads must be at least 1, --warmup at least 0")
    if not Path(args.python).exists():
        parser.error(f"{args.python} does not exist: AdapterHub's venv (see tests/data/adapterhub/README.md)")
    batch, seq = (QUICK_BATCH, QUICK_SEQ) if args.quick else (BATCH, SEQ)
    train_configs = [c for c in TRAIN if c in configs]
    adapter_configs = [c for c in train_configs if c != "full"]
    inference = "inference" in configs

    torch.set_num_threads(args.threads)
    say = (lambda *a, **k: None) if args.json else (lambda *a, **k: print(*a, **k, flush=True))
    wall_start = time.perf_counter()
    load_before = load_average()
    import transformers

    say(f"surgeon side: torch {torch.__version__}, transformers {transformers.__version__}, surgeon "
        f"{surgeon.__version__}; torch.set_num_threads({args.threads}) -> torch.get_num_threads() = "
        f"{torch.get_num_threads()}; load average {load_before} on {cores()} cores")

    from safetensors.torch import save_file

    base = Base(SHAPE)
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    library = Library(args.python)
    try:
        with tempfile.TemporaryDirectory(prefix="adapters_vs_adapterhub_") as folder:
            tmp = Path(folder)
            first = base.build()
            save_file(base.state, str(tmp / "base.safetensors"))
            save_file({"ids": ids.contiguous()}, str(tmp / "ids.safetensors"))
            del first
            say(f"AdapterHub side ({args.python}) builds its models ...")
            library.send(cmd="init", tmp=str(tmp), threads=args.threads, shape=SHAPE, train=train_configs,
                         infer=inference)
            info = library.receive()
            say(f"AdapterHub side: torch {info['versions']['torch']}, transformers {info['versions']['transformers']}, "
                f"adapters {info['versions']['adapters']}; torch.get_num_threads() = {info['threads']}; "
                f"attention {info['attn_implementation']}")
            left = {k: v for k, v in info["library_trainable_not_adapter"].items() if v}
            if left:
                say(f"  train_adapter left trainable besides the adapter (set to frozen here): {left}")

            sanity = None
            if adapter_configs or inference:
                say("sanity check (same base weights, same random adapter weights in both; not timed) ...")
                sanity = sanity_check(base, library, tmp, ids, adapter_configs or ["pfeiffer"])
                for name, c in sanity["cases"].items():
                    say(f"  {name:16s} loss surgeon {c['loss_surgeon']:.6f}  AdapterHub {c['loss_adapterhub']:.6f}  "
                        f"|diff| {c['loss_diff']:.1e} (tolerance {TOLERANCE:g}); max |logits diff| "
                        f"{c['max_abs_logits_diff']:.1e}; the adapter moves the loss by {c['adapter_effect_on_loss']:.3f}; "
                        f"{c['tensors']} tensors")

            say("building surgeon's models (the library's initial adapter weights copied in) ...")
            variants: dict[tuple[str, str], Variant] = {}
            counts: dict[str, dict[str, int]] = {"surgeon": {}, "adapterhub": dict(info["trainable_params"])}
            order: list[Variant] = []
            for n in train_configs:
                model, params, job = surgeon_model(base, n)
                if job is not None:
                    copy_adapter(job, tmp / f"init_{n}.safetensors")
                model.train()
                optimizer = torch.optim.AdamW(params, lr=1e-4)
                counts["surgeon"][n] = sum(p.numel() for p in params)
                ours = Variant("surgeon", f"train:{n}", "train",
                               lambda m=model, o=optimizer: surgeon_train_step(m, o, ids))
                theirs = Variant("adapterhub", f"train:{n}", "train",
                                 lambda n=n: (lambda a: (a["s"], a["loss"]))(library(cmd="step", variant=n)))
                order += [ours, theirs]
            infer_order: list[Variant] = []
            if inference:
                for n in INFER:
                    model, _, job = surgeon_model(base, n)
                    if job is not None:
                        copy_adapter(job, tmp / "init_infer.safetensors")
                    model.eval()
                    ours = Variant("surgeon", f"infer:{n}", "infer", lambda m=model: surgeon_infer_step(m, ids))
                    theirs = Variant("adapterhub", f"infer:{n}", "infer",
                                     lambda n=n: (library(cmd="infer", variant=n)["s"], float("nan")))
                    infer_order += [ours, theirs]
            for v in order + infer_order:
                variants[(v.side, v.name)] = v

            machine0, own0, worker0 = machine_cpu_s(), time.process_time(), library.cpu_s()
            timed_start = time.perf_counter()
            if order:
                say(f"train step (batch {batch}x{seq}): {warmup} warm-up + {steps} timed rounds, "
                    f"{len(order)} variants, surgeon / AdapterHub alternating, order rotating ...")
                interleave(order, steps, warmup)
            if infer_order:
                say(f"inference (eval, no_grad): {warmup} warm-up + {steps} timed rounds, {len(infer_order)} variants ...")
                interleave(infer_order, steps, warmup)
            timed_wall = time.perf_counter() - timed_start
            machine1, own1, worker1 = machine_cpu_s(), time.process_time(), library.cpu_s()
    finally:
        library.close()

    other = None
    if None not in (machine0, machine1, worker0, worker1):
        other = max(0.0, (machine1 - machine0) - (own1 - own0) - (worker1 - worker0))
    load_after = load_average()
    figures = {
        "benchmark": "adapters_vs_adapterhub",
        "threads": torch.get_num_threads(), "threads_adapterhub": info["threads"], "cores": cores(),
        "versions": {"surgeon": {"torch": torch.__version__, "transformers": transformers.__version__,
                                 "surgeon": surgeon.__version__, "python": platform.python_version()},
                     "adapterhub": info["versions"]},
        "attn_implementation": {"surgeon": "sdpa", "adapterhub": info["attn_implementation"]},
        "model": SHAPE, "batch": batch, "seq": seq, "steps": steps, "warmup": warmup, "quick": args.quick,
        "configs": configs, "sanity": sanity,
        **summarize(variants),
        "all_s": {f"{s}/{n}": [round(t, 5) for t in v.times] for (s, n), v in variants.items()},
        "final_loss": {f"{s}/{n}": v.loss for (s, n), v in variants.items() if v.kind == "train"},
        "trainable_params": counts,
        "library_trainable_not_adapter": info["library_trainable_not_adapter"],
        "wall_s": time.perf_counter() - wall_start, "timed_wall_s": timed_wall,
        "loadavg_before_after": [load_before, load_after],
        "other_processes_cpu_s": other,
    }
    goal = {n: figures["ratios"][f"train:{n} surgeon/adapterhub"] <= 1.0 for n in train_configs if n != "full"}
    if inference:
        goal |= {f"infer:{n}": figures["ratios"][f"infer:{n} surgeon/adapterhub"] <= 1.0 for n in INFER[1:]}
    figures["goal_surgeon_at_most_adapterhub"] = goal

    if not args.json:
        print_tables(figures, variants)
        slower = [n for n, ok in goal.items() if not ok]
        print(f"goal (surgeon's median step <= AdapterHub's, every adapter configuration): "
              f"{'met' if not slower else 'NOT met for ' + ', '.join(slower)}")
        share = f"{other / (cores() * timed_wall):.0%}" if other is not None and timed_wall else "?"
        print(f"wall time {figures['wall_s']:.1f} s (timed part {timed_wall:.1f} s); 1/5/15-min load average before "
              f"{load_before}, after {load_after} ({cores()} cores: a load above that means other processes shared "
              f"the CPU); other processes used {other if other is None else round(other, 1)} CPU s during the timed "
              f"part ({share} of {cores()} cores x wall)")
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
