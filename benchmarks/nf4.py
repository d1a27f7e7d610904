"""NF4 on CPU in one run: surgeon's codec vs torchao and bitsandbytes, the copy floor, a quantized
linear layer, and the resident memory of a QLoRA-patched Llama.

    python benchmarks/nf4.py                # tables + one JSON line (full sizes)
    python benchmarks/nf4.py --json         # the JSON line only
    python benchmarks/nf4.py --quick        # small sizes, 2 reps: a smoke test (well under a minute)
    python benchmarks/nf4.py --reps 11      # more timed repetitions per variant

1. codec: a bf16 weight (torch.randn, std 1, seed 0) of 4096x4096 and of 11008x4096, NF4, blocks
   of 64, double quant (second level in blocks of 256) unless said "plain":
     surgeon        surgeon.quant.quantize(w, "nf4", 64, double=True) / qt.dequantize(torch.bfloat16)
     surgeon plain  the same with double=False
     surgeon out=   qt.dequantize(torch.bfloat16, out=buf), buf preallocated (dequantize only)
     torchao        to_nf4(w, block_size=64, scaler_block_size=256) / nf4.get_original_weight()
     bitsandbytes   bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
                    compress_statistics=True) / dequantize_4bit(packed, state) (its CPU kernels)
   Every variant gets one untimed warm-up round, then --reps timed rounds; within a round all
   operations run once, in an order that rotates every round, so machine noise hits all alike;
   gc.collect() before each call (not timed). Medians. Round-trip error: dequantize(quantize(w)) - w
   in fp32 (max abs, mean abs). Codes: torch.equal of surgeon's packed codes with bitsandbytes'
   packed tensor viewed 1-D (also absmax / double-quant state and the dequantized bf16 tensors);
   torchao's codes are compared nibble by nibble (fraction equal).
2. copy floor of a dequantize, per shape: `out.copy_(w)` (out a preallocated bf16 tensor of the
   weight's shape: reads and writes 2 bytes/param) plus `buf.copy_(qt.codes)` (a preallocated
   uint8 buffer: reads and writes the 0.5 byte/param of packed codes); floor = the sum of the two
   medians. It moves at least the bytes any dequantize must move (read the codes, write the bf16
   output), so "x floor" is a conservative multiple. Timed in the same rounds as the codec.
3. linear: forward + backward of one 4096x4096 layer (bias=False, weights frozen as in QLoRA,
   input 4 x 128 x 4096 with requires_grad, loss = out.float().pow(2).mean()): surgeon's
   QuantizedLinear (`quantize base nf4 double compute=bf16` applied to nn.Sequential(nn.Linear)
   holding the bf16 weight, bf16 input), the same nn.Linear in bf16 (bf16 input), surgeon with
   compute=fp32 (same codes, fp32 input) and the nn.Linear in fp32 (fp32 input). Also timed in the
   same rounds: the layer's own dequantize (`layer.dequantized()`, which its forward and its backward
   each call once), to show the share of the step it takes. 2 warm-up steps each, --reps timed
   steps each, round-robin with a rotating order; medians. NB: a CPU without AVX512-BF16/AMX runs
   bf16 matmuls on a slow path, so the bf16 rows can be far slower than the fp32 ones.
4. memory: one subprocess per variant builds a Llama (hidden 1024, intermediate 2816, 8 layers,
   16 heads, vocab 32000, torch.manual_seed(0)) in fp32 or bf16 (built in that dtype, via
   torch.set_default_dtype); the qlora variants then run
   surgeon.apply("quantize base nf4 double\\ninject lora r=8 alpha=16 into *.attn.<q,v>", model)
   (originals spilled to a temporary folder, deleted afterwards) and gc.collect(). Reported, as
   growth over the RSS after the imports (torch, transformers, surgeon): current RSS
   (/proc/self/statm) after building and after patching; the same after glibc malloc_trim(0)
   (memory the allocator kept although nothing uses it any more); the peak (VmHWM, reset after the
   imports through /proc/self/clear_refs); and the bytes of all parameters and buffers counted from
   the tensors, of which those held by QuantizedLinear (codes + absmax state).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import faulthandler
import gc
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402

BLOCK, SCALER_BLOCK = 64, 256
QLORA_SPEC = "quantize base nf4 double\ninject lora r=8 alpha=16 into *.attn.<q,v>"
LINEAR_SPEC = "quantize base nf4 double compute={compute}"

FULL = dict(
    shapes=[(4096, 4096), (11008, 4096)],
    linear=dict(out_features=4096, in_features=4096, batch=4, seq=128),
    llama=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
               num_key_value_heads=16, vocab_size=32000),
    reps=7, warmup_linear=2, child_timeout=900,
)
QUICK = dict(
    shapes=[(512, 1024), (1376, 1024)],
    linear=dict(out_features=1024, in_features=1024, batch=2, seq=64),
    llama=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=4096),
    reps=2, warmup_linear=1, child_timeout=120,
)
MEMORY_VARIANTS = ["fp32", "qlora-fp32", "bf16", "qlora-bf16"]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_busy_s() -> tuple[float, float] | None:
    """(CPU seconds all processes of the machine have used, CPU seconds this process and its children
    have used); their deltas over the run tell how much CPU other processes took meanwhile."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
    own = sum(getattr(resource.getrusage(who), k) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for k in ("ru_utime", "ru_stime"))
    return busy / os.sysconf("SC_CLK_TCK"), own


def time_call(fn) -> float:
    """Seconds of one call; the result is dropped after the clock stops."""
    gc.collect()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    del result
    return seconds


def rounds(ops: dict[str, object], reps: int, warmup: int) -> dict[str, list[float]]:
    """Run every op once per round, the order rotating each round; the first `warmup` rounds untimed."""
    names = list(ops)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = time_call(ops[name])
            if r >= warmup:
                times[name].append(seconds)
    return times


# --- 1 + 2: codec and copy floor --------------------------------------------------------------------

def import_torchao_nf4():
    """torchao's to_nf4 (0.18: torchao.quantization.quantize_.workflows.nf4.nf4_tensor), or (None, why)."""
    errors = []
    for module in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor",
                   "torchao.dtypes"):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                mod = __import__(module, fromlist=["to_nf4"])
            return mod.to_nf4, module
        except Exception as err:  # noqa: BLE001 - any failure means "not available"
            errors.append(f"{module}: {type(err).__name__}: {err}")
    return None, "; ".join(errors)


def round_trip_error(deq: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    diff = deq.float().sub_(w.float()).abs_()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item()}


def nibble_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    same = ((a >> 4) == (b >> 4)).sum().item() + ((a & 15) == (b & 15)).sum().item()
    return same / (2 * a.numel())


def bnb_nbytes(packed: torch.Tensor, state) -> int:
    total = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        s2 = state.state2
        total += s2.absmax.numel() * s2.absmax.element_size() + s2.code.numel() * s2.code.element_size()
        total += 4  # offset, fp32
    return total


def torchao_nbytes(t) -> int:
    parts = (t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean, t.nf4)
    return sum(p.numel() * p.element_size() for p in parts)


def bench_codec(shape: tuple[int, int], reps: int, to_nf4, bnbf) -> dict:
    from surgeon.quant import quantize

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    n = w.numel()

    qt = quantize(w, "nf4", BLOCK, double=True)
    qt_plain = quantize(w, "nf4", BLOCK, double=False)
    out_buf = torch.empty(shape, dtype=torch.bfloat16)
    codes_buf = torch.empty_like(qt.codes)

    quant_ops = {
        "surgeon": lambda: quantize(w, "nf4", BLOCK, double=True),
        "surgeon plain": lambda: quantize(w, "nf4", BLOCK, double=False),
    }
    deq_ops = {
        "surgeon": lambda: qt.dequantize(torch.bfloat16),
        "surgeon out=": lambda: qt.dequantize(torch.bfloat16, out=out_buf),
        "surgeon plain": lambda: qt_plain.dequantize(torch.bfloat16),
    }
    nf = packed = state = None
    if to_nf4 is not None:
        nf = to_nf4(w, BLOCK, SCALER_BLOCK)
        quant_ops["torchao"] = lambda: to_nf4(w, BLOCK, SCALER_BLOCK)
        deq_ops["torchao"] = lambda: nf.get_original_weight()
    if bnbf is not None:
        packed, state = bnbf.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4", compress_statistics=True)
        quant_ops["bitsandbytes"] = lambda: bnbf.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4",
                                                              compress_statistics=True)
        deq_ops["bitsandbytes"] = lambda: bnbf.dequantize_4bit(packed, state)
    floor_ops = {"copy bf16": lambda: out_buf.copy_(w), "copy codes": lambda: codes_buf.copy_(qt.codes)}

    ops = {f"quantize/{k}": v for k, v in quant_ops.items()}
    ops |= {f"dequantize/{k}": v for k, v in deq_ops.items()}
    ops |= {f"floor/{k}": v for k, v in floor_ops.items()}
    times = rounds(ops, reps, warmup=1)
    med = {k: median(v) for k, v in times.items()}

    # accuracy and agreement (not timed)
    deq = {"surgeon": qt.dequantize(torch.bfloat16), "surgeon plain": qt_plain.dequantize(torch.bfloat16)}
    if nf is not None:
        deq["torchao"] = nf.get_original_weight()
    if packed is not None:
        deq["bitsandbytes"] = bnbf.dequantize_4bit(packed, state)
    errors = {k: round_trip_error(v, w) for k, v in deq.items()}
    nbytes = {"surgeon": qt.nbytes, "surgeon plain": qt_plain.nbytes}
    agree: dict[str, object] = {}
    if packed is not None:
        flat = packed.view(-1)
        nbytes["bitsandbytes"] = bnb_nbytes(packed, state)
        agree["codes_equal_bnb"] = bool(torch.equal(qt.codes, flat))
        agree["codes_equal_bnb_plain"] = bool(torch.equal(qt_plain.codes, flat))
        agree["absmax_equal_bnb"] = bool(torch.equal(qt.absmax, state.absmax)
                                         and torch.equal(qt.absmax_scale, state.state2.absmax)
                                         and torch.equal(qt.absmax_offset.reshape(()),
                                                         torch.as_tensor(state.offset).float().reshape(())))
        agree["dequantized_equal_bnb"] = bool(torch.equal(deq["surgeon"], deq["bitsandbytes"]))
    if nf is not None:
        nbytes["torchao"] = torchao_nbytes(nf)
        agree["torchao_code_agreement"] = nibble_agreement(nf.quantized_data, qt.codes)

    floor = med["floor/copy bf16"] + med["floor/copy codes"]
    moved = 2 * (2 * n + qt.codes.numel())  # bytes read + written by the two copies
    ratios = {}
    for op in ("quantize", "dequantize"):
        for other in ("bitsandbytes", "torchao"):
            if f"{op}/{other}" in med:
                ratios[f"{op}_surgeon_over_{other}"] = med[f"{op}/surgeon"] / med[f"{op}/{other}"]
    ratios["dequantize_surgeon_over_floor"] = med["dequantize/surgeon"] / floor
    ratios["dequantize_surgeon_out_over_floor"] = med["dequantize/surgeon out="] / floor
    if "dequantize/bitsandbytes" in med:
        ratios["dequantize_bitsandbytes_over_floor"] = med["dequantize/bitsandbytes"] / floor
    return {
        "shape": list(shape), "numel": n,
        "median_s": med, "min_s": {k: min(v) for k, v in times.items()},
        "floor_s": floor, "floor_bytes_moved": moved, "floor_gb_per_s": moved / floor / 1e9,
        "round_trip_error": errors,
        "bits_per_param": {k: v * 8 / n for k, v in nbytes.items()},
        "agreement": agree,
        "ratios": ratios,
        "all_s": {k: [round(x, 6) for x in v] for k, v in times.items()},
    }


# --- 3: quantized linear forward + backward --------------------------------------------------------

def bench_linear(cfg: dict, reps: int, warmup: int) -> dict:
    import copy

    import surgeon

    out_f, in_f, batch, seq = cfg["out_features"], cfg["in_features"], cfg["batch"], cfg["seq"]
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=False)
    base.weight.requires_grad_(False)
    fp32 = copy.deepcopy(base)
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    wrapped, jobs = {}, []
    for compute in ("bf16", "fp32"):  # both quantized from the same bf16 weight: the same codes
        wrapped[compute] = nn.Sequential(copy.deepcopy(bf16))
        with tempfile.TemporaryDirectory(prefix="nf4-bench-") as spill:
            jobs.append(surgeon.apply(LINEAR_SPEC.format(compute=compute), wrapped[compute], originals_dir=spill))
        for p in wrapped[compute].parameters():
            p.requires_grad_(False)

    x = torch.randn(batch, seq, in_f, generator=torch.Generator().manual_seed(1))
    inputs = {"surgeon": x.to(torch.bfloat16).requires_grad_(), "bf16": x.to(torch.bfloat16).requires_grad_(),
              "surgeon fp32": x.clone().requires_grad_(), "fp32": x.clone().requires_grad_()}
    modules = {"surgeon": wrapped["bf16"], "bf16": bf16, "surgeon fp32": wrapped["fp32"], "fp32": fp32}

    def step(name: str):
        def run():
            xi = inputs[name]
            xi.grad = None
            out = modules[name](xi)
            loss = out.float().pow(2).mean()
            loss.backward()
            return loss
        return run

    with torch.no_grad():
        ref = bf16(inputs["bf16"]).float()
        diff = (modules["surgeon"](inputs["surgeon"]).float() - ref).abs()
        check = {"max_abs_out_diff_vs_bf16": diff.max().item(), "mean_abs_out_diff_vs_bf16": diff.mean().item(),
                 "mean_abs_out_bf16": ref.abs().mean().item()}
    ops = {k: step(k) for k in modules}
    # what the layer's forward and backward each dequantize (the weight in the compute dtype)
    ops["dequantize bf16"] = modules["surgeon"][0].dequantized
    ops["dequantize fp32"] = modules["surgeon fp32"][0].dequantized
    times = rounds(ops, reps, warmup=warmup)
    med = {k: median(v) for k, v in times.items()}
    del jobs
    return {
        "layer": repr(modules["surgeon"][0]), "shape": [out_f, in_f], "batch": batch, "seq": seq,
        "median_s": med, "min_s": {k: min(v) for k, v in times.items()},
        "ratios": {"surgeon_over_bf16": med["surgeon"] / med["bf16"], "surgeon_over_fp32": med["surgeon"] / med["fp32"],
                   "surgeon_fp32_over_fp32": med["surgeon fp32"] / med["fp32"],
                   "dequantize_share_surgeon": 2 * med["dequantize bf16"] / med["surgeon"],
                   "dequantize_share_surgeon_fp32": 2 * med["dequantize fp32"] / med["surgeon fp32"]},
        "check": check,
        "all_s": {k: [round(x, 6) for x in v] for k, v in times.items()},
    }


# --- 4: memory (in subprocesses) -------------------------------------------------------------------

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM from /proc/self/status (the peak since the last reset), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def malloc_trim() -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def tensor_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers (each distinct tensor once), and of what QuantizedLinear holds."""
    seen: set[tuple] = set()
    totals = {"params": 0, "buffers": 0, "quantized_buffers": 0}
    for kind, tensors in (("params", model.parameters()), ("buffers", model.buffers())):
        for t in tensors:
            key = (t.data_ptr(), t.numel(), t.dtype)
            if key in seen:
                continue
            seen.add(key)
            totals[kind] += t.numel() * t.element_size()
    for module in model.modules():
        if type(module).__name__ == "QuantizedLinear":
            totals["quantized_buffers"] += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    totals["total"] = totals["params"] + totals["buffers"]
    return totals


def memory_child(variant: str, llama: dict, threads: int) -> dict:
    torch.set_num_threads(threads)
    with contextlib.redirect_stdout(io.StringIO()):
        from transformers import LlamaConfig, LlamaForCausalLM

        import surgeon
    config = LlamaConfig(**llama)
    dtype = torch.bfloat16 if variant.endswith("bf16") else torch.float32
    gc.collect()
    malloc_trim()
    base = rss_bytes()
    peak_reset = reset_peak_rss()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.train()
    gc.collect()
    built = rss_bytes()
    result = {"variant": variant, "dtype": str(dtype).removeprefix("torch."),
              "rss_baseline": base, "built_rss_growth": built - base, "built_tensor_bytes": tensor_bytes(model)}
    job = None
    with tempfile.TemporaryDirectory(prefix="nf4-bench-") as spill:
        if variant.startswith("qlora"):
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                job = surgeon.apply(QLORA_SPEC, model, originals_dir=spill)
            result["apply_s"] = time.perf_counter() - start
            result["trainable_params"] = sum(p.numel() for p in job.trainable_parameters().values())
        gc.collect()
        result["rss_growth"] = rss_bytes() - base
        result["tensor_bytes"] = tensor_bytes(model)
        result["malloc_trim"] = malloc_trim()
        result["rss_growth_after_trim"] = rss_bytes() - base
    result["peak_rss"] = peak_rss_bytes()
    result["peak_rss_growth"] = result["peak_rss"] - base if peak_reset else None  # else: includes the imports
    del job, model
    return result


def run_memory_children(llama: dict, threads: int, timeout: int) -> dict[str, dict]:
    results = {}
    for variant in MEMORY_VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", variant,
               "--memory-llama", json.dumps(llama), "--threads", str(threads)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            results[variant] = {"variant": variant, "error": f"timed out after {timeout} s"}
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            results[variant] = {"variant": variant, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-800:]}"}
        else:
            results[variant] = json.loads(lines[-1])
    return results


# --- report --------------------------------------------------------------------------------------

def print_tables(figures: dict) -> None:
    from rich.console import Console

    console = Console(width=max(140, Console().width))
    ms = lambda s: "-" if s is None else f"{s * 1e3:.1f} ms"  # noqa: E731
    ratio = lambda r: "-" if r is None else f"{r:.2f}x"  # noqa: E731

    if figures["codec"]:
        print_codec_tables(console, figures, ms, ratio)
    if figures["linear"]:
        print_linear_table(console, figures, ms)
    if figures["memory"]:
        print_memory_table(console, figures, ms)


def print_codec_tables(console, figures: dict, ms, ratio) -> None:
    from rich.table import Table

    libs = ["surgeon", "surgeon plain", "surgeon out=", "torchao", "bitsandbytes"]
    t = Table(title=f"NF4 codec, bf16 weight, blocksize {BLOCK}, double quant unless 'plain' "
                    f"(CPU, {figures['threads']} threads, medians of {figures['reps']})")
    t.add_column("measurement")
    for lib in libs:
        t.add_column(lib, justify="right")
    t.add_column("surgeon / bnb", justify="right")
    t.add_column("surgeon / torchao", justify="right")
    for c in figures["codec"]:
        shp = "x".join(map(str, c["shape"]))
        med, r = c["median_s"], c["ratios"]
        for op in ("quantize", "dequantize"):
            t.add_row(f"{op} {shp}" + (" -> bf16" if op == "dequantize" else ""),
                      *(ms(med.get(f"{op}/{lib}")) for lib in libs),
                      ratio(r.get(f"{op}_surgeon_over_bitsandbytes")), ratio(r.get(f"{op}_surgeon_over_torchao")))
        err = c["round_trip_error"]
        t.add_row(f"max |deq(q(w)) - w| {shp}",
                  *("-" if lib not in err else f"{err[lib]['max_abs']:.4f}" for lib in libs), "", "")
        t.add_row(f"mean |deq(q(w)) - w| {shp}",
                  *("-" if lib not in err else f"{err[lib]['mean_abs']:.5f}" for lib in libs), "", "")
        bits = c["bits_per_param"]
        t.add_row(f"bits / param {shp}", *("-" if lib not in bits else f"{bits[lib]:.3f}" for lib in libs), "", "")
        a = c["agreement"]
        if "codes_equal_bnb" in a:
            t.add_row(f"== bitsandbytes {shp}",
                      f"codes {a['codes_equal_bnb']}, absmax {a['absmax_equal_bnb']}, "
                      f"deq {a['dequantized_equal_bnb']}", f"codes {a['codes_equal_bnb_plain']}", "",
                      f"{a['torchao_code_agreement'] * 100:.2f}% codes" if "torchao_code_agreement" in a else "-",
                      "", "", "")
    console.print(t)

    f = Table(title="dequantize vs the copy floor (floor = out.copy_(w_bf16) + codes_buf.copy_(codes), "
                    "both preallocated; goal: surgeon within 3x)")
    for col in ("shape", "copy bf16", "copy codes", "floor", "floor GB/s", "surgeon", "x floor",
                "surgeon out=", "x floor", "bnb", "x floor"):
        f.add_column(col, justify="right")
    for c in figures["codec"]:
        med, r = c["median_s"], c["ratios"]
        f.add_row("x".join(map(str, c["shape"])), ms(med["floor/copy bf16"]), ms(med["floor/copy codes"]),
                  ms(c["floor_s"]), f"{c['floor_gb_per_s']:.1f}",
                  ms(med["dequantize/surgeon"]), ratio(r["dequantize_surgeon_over_floor"]),
                  ms(med["dequantize/surgeon out="]), ratio(r["dequantize_surgeon_out_over_floor"]),
                  ms(med.get("dequantize/bitsandbytes")), ratio(r.get("dequantize_bitsandbytes_over_floor")))
    console.print(f)


def print_linear_table(console, figures: dict, ms) -> None:
    from rich.table import Table

    lin = figures["linear"]
    shp = "x".join(map(str, lin["shape"]))
    lt = Table(title=f"linear {shp} (bias=False, frozen), forward + backward, input {lin['batch']}x{lin['seq']} "
                     f"with requires_grad, medians of {figures['reps']}")
    for col in ("variant", "median", "best", "vs nn.Linear same dtype", "one dequantize", "2 dequantizes / step"):
        lt.add_column(col, justify="right")
    med = lin["median_s"]
    rows = (("surgeon", "surgeon QuantizedLinear nf4 double, compute=bf16 (bf16 input)", "bf16"),
            ("bf16", "nn.Linear bf16 (bf16 input)", None),
            ("surgeon fp32", "surgeon QuantizedLinear nf4 double, compute=fp32 (fp32 input)", "fp32"),
            ("fp32", "nn.Linear fp32 (fp32 input)", None))
    for name, label, deq in rows:
        plain = "bf16" if name in ("surgeon", "bf16") else "fp32"
        share = f"{2 * med['dequantize ' + deq] / med[name] * 100:.0f}%" if deq else "-"
        lt.add_row(label, ms(med[name]), ms(lin["min_s"][name]), f"{med[name] / med[plain]:.2f}x",
                   ms(med["dequantize " + deq]) if deq else "-", share)
    console.print(lt)


def print_memory_table(console, figures: dict, ms) -> None:
    from rich.table import Table

    mem = figures["memory"]
    mt = Table(title="resident memory, Llama " + ", ".join(f"{k}={v}" for k, v in figures["llama"].items())
               + " (one subprocess each; growth over the RSS after imports)")
    for col in ("variant", "RSS after build", "RSS now (after gc)", "after malloc_trim", "peak",
                "params+buffers", "in QuantizedLinear", "apply", "trainable"):
        mt.add_column(col, justify="right")
    mb = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    for v in MEMORY_VARIANTS:
        m = mem.get(v, {})
        if "error" in m:
            mt.add_row(v, f"[red]{m['error'][:100]}[/red]", *[""] * 7)
            continue
        mt.add_row(v, mb(m["built_rss_growth"]), mb(m["rss_growth"]), mb(m["rss_growth_after_trim"]),
                   mb(m["peak_rss_growth"]) if m.get("peak_rss_growth") is not None else "-",
                   mb(m["tensor_bytes"]["total"]), mb(m["tensor_bytes"]["quantized_buffers"]),
                   ms(m.get("apply_s")), f"{m['trainable_params']:,}" if "trainable_params" in m else "-")
    console.print(mt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 reps (a smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default 7, quick 2)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: codec,linear,memory")
    parser.add_argument("--watchdog", type=float, default=None,
                        help="dump every thread's stack and exit after this many seconds (default 3600, quick 300)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--memory-llama", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, json.loads(args.memory_llama), args.threads or cores())))
        return 0

    cfg = QUICK if args.quick else FULL
    reps = args.reps if args.reps is not None else cfg["reps"]
    if reps < 1:
        parser.error("--reps must be at least 1")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    watchdog = args.watchdog if args.watchdog is not None else (300 if args.quick else 3600)
    if watchdog > 0:
        faulthandler.dump_traceback_later(watchdog, exit=True)  # a hang becomes a stack dump, not a stall

    threads = cores()
    torch.set_num_threads(threads)
    say = (lambda *a, **k: None) if args.json else (lambda *a, **k: print(*a, **k, flush=True))
    wall_start = time.perf_counter()
    load_before = load_average()
    cpu_before = cpu_busy_s()

    import surgeon

    to_nf4, torchao_from = import_torchao_nf4()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import bitsandbytes
            import bitsandbytes.functional as bnbf
        bnb_version = bitsandbytes.__version__
    except Exception as err:  # noqa: BLE001
        bnbf, bnb_version = None, f"unavailable: {type(err).__name__}: {err}"
    torchao_version = None
    with contextlib.suppress(Exception):
        import torchao

        torchao_version = torchao.__version__
    import transformers

    say(f"torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bnb_version}, "
        f"torchao {torchao_version}, surgeon {surgeon.__version__}; torch.set_num_threads({threads}) -> "
        f"torch.get_num_threads() = {torch.get_num_threads()}{'; QUICK sizes' if args.quick else ''}")
    say(f"torchao to_nf4: {'from ' + torchao_from if to_nf4 else 'NOT AVAILABLE (' + torchao_from + ')'}")

    figures: dict = {"benchmark": "nf4", "quick": args.quick, "threads": torch.get_num_threads(), "reps": reps,
                     "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                  "bitsandbytes": bnb_version, "torchao": torchao_version,
                                  "surgeon": surgeon.__version__, "python": platform.python_version()},
                     "torchao_to_nf4": torchao_from if to_nf4 else None,
                     "llama": cfg["llama"], "codec": [], "linear": None, "memory": {}}

    if "codec" not in skip:
        for shape in cfg["shapes"]:
            say(f"codec {shape[0]}x{shape[1]}: 1 warm-up + {reps} rounds ...")
            figures["codec"].append(bench_codec(shape, reps, to_nf4, bnbf))
    if "linear" not in skip:
        lc = cfg["linear"]
        say(f"linear {lc['out_features']}x{lc['in_features']} forward+backward, {lc['batch']}x{lc['seq']}: "
            f"{cfg['warmup_linear']} warm-up + {reps} steps each ...")
        figures["linear"] = bench_linear(lc, reps, cfg["warmup_linear"])
    if "memory" not in skip:
        say(f"memory: {len(MEMORY_VARIANTS)} subprocesses ({', '.join(MEMORY_VARIANTS)}) ...")
        figures["memory"] = run_memory_children(cfg["llama"], threads, cfg["child_timeout"])

    summary = {}
    for c in figures["codec"]:
        shp = "x".join(map(str, c["shape"]))
        summary[shp] = {k: round(v, 3) for k, v in c["ratios"].items()}
        summary[shp]["codes_equal_bnb"] = c["agreement"].get("codes_equal_bnb")
    if figures["linear"]:
        summary["linear"] = {k: round(v, 3) for k, v in figures["linear"]["ratios"].items()}
    figures["summary"] = summary
    figures["wall_s"] = time.perf_counter() - wall_start
    figures["loadavg_before_after"] = [load_before, load_average()]
    cpu_after = cpu_busy_s()
    other = None
    if cpu_before and cpu_after:
        other = max(0.0, (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1]))
    figures["other_processes_cpu_s"] = other

    if not args.json:
        if skip:
            say(f"(sections skipped: {', '.join(sorted(skip))})")
        print_tables(figures)
        print(f"wall time {figures['wall_s']:.1f} s; 1/5/15-min load average before {load_before}, after "
              f"{load_average()} ({threads} cores: a load above that means other processes shared the CPU)")
        if other is not None:
            share = other / (figures["wall_s"] * threads)
            print(f"other processes used {other:.1f} CPU-seconds during the run ({share * 100:.0f}% of "
                  f"{threads} cores x wall time)" + ("; figures are unreliable: OpenMP code (bitsandbytes, "
                  "torchao, copies, matmuls) slows down sharply when a core is taken" if share > 0.05 else ""))
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
