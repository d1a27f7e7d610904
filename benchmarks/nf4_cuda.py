"""NF4 on CUDA, surgeon vs bitsandbytes' CUDA kernels, in one run (a GPU machine; not a test).

    python benchmarks/nf4_cuda.py [--reps 50]

Rows: quantize and dequantize (bf16 out, double quantization, block 64) of a 4096x4096 and an
11008x4096 bf16 weight; the bandwidth floor for a dequantize (a device copy of the bytes it reads
and writes); the forward+backward of a quantized linear layer (batch 4 x 128, bf16 compute)
against bitsandbytes' Linear4bit and a plain bf16 nn.Linear. Times are medians of CUDA-event
timings after warm-up; ratios are surgeon / other (below 1: surgeon is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from surgeon.methods.weights.quantize import QuantizedLinear  # noqa: E402
from surgeon.quant import quantize  # noqa: E402


def cuda_ms(fn, reps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def codec_rows(shape: tuple[int, int], reps: int, bnbf) -> dict:
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    q = quantize(w, "nf4", blocksize=64, double=True)
    out = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
    row = {"shape": "x".join(map(str, shape)),
           "surgeon_quantize_ms": cuda_ms(lambda: quantize(w, "nf4", blocksize=64, double=True), reps),
           "surgeon_dequantize_ms": cuda_ms(lambda: q.dequantize(torch.bfloat16, out=out), reps)}
    moved = q.nbytes + out.numel() * out.element_size()
    src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    row["copy_floor_ms"] = cuda_ms(lambda: dst.copy_(src), reps)  # reads and writes `moved` bytes
    if bnbf is not None:
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        row["bnb_quantize_ms"] = cuda_ms(lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                                     compress_statistics=True), reps)
        row["bnb_dequantize_ms"] = cuda_ms(lambda: bnbf.dequantize_4bit(packed, state), reps)
        row["codes_equal_bnb"] = bool(torch.equal(q.codes, packed.view(-1)))
    return row


def linear_rows(reps: int, bnb) -> dict:
    torch.manual_seed(0)
    dense = torch.nn.Linear(4096, 11008, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(4, 128, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ours = QuantizedLinear(quantize(dense.weight.detach(), "nf4", blocksize=64, double=True), None,
                           torch.bfloat16, "linear")

    def step(layer):
        def run():
            layer(x).sum().backward()
            x.grad = None
        return run

    row = {"surgeon_fwd_bwd_ms": cuda_ms(step(ours), reps), "bf16_fwd_bwd_ms": cuda_ms(step(dense), reps)}
    if bnb is not None:
        theirs = bnb.nn.Linear4bit(4096, 11008, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                   quant_type="nf4")
        theirs.weight = bnb.nn.Params4bit(dense.weight.detach().cpu(), requires_grad=False, quant_type="nf4",
                                          compress_statistics=True, blocksize=64)
        theirs = theirs.cuda()
        row["bnb_fwd_bwd_ms"] = cuda_ms(step(theirs), reps)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description="NF4 on CUDA: surgeon vs bitsandbytes")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark runs on a GPU machine")
        return 1
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnb = bnbf = None
    figures = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "bitsandbytes": getattr(bnb, "__version__", None),
               "codec": [codec_rows(s, args.reps, bnbf) for s in ((4096, 4096), (11008, 4096))],
               "linear": linear_rows(args.reps, bnb)}
    for row in figures["codec"]:
        line = (f"{row['shape']:>11}: quantize {row['surgeon_quantize_ms']:.3f} ms, dequantize "
                f"{row['surgeon_dequantize_ms']:.3f} ms ({row['surgeon_dequantize_ms'] / row['copy_floor_ms']:.1f}x "
                f"the copy floor {row['copy_floor_ms']:.3f} ms)")
        if "bnb_quantize_ms" in row:
            line += (f"; bitsandbytes {row['bnb_quantize_ms']:.3f} / {row['bnb_dequantize_ms']:.3f} ms "
                     f"(ratios {row['surgeon_quantize_ms'] / row['bnb_quantize_ms']:.2f}x / "
                     f"{row['surgeon_dequantize_ms'] / row['bnb_dequantize_ms']:.2f}x); codes equal: "
                     f"{row['codes_equal_bnb']}")
        print(line)
    lin = figures["linear"]
    print(f"4096->11008 fwd+bwd (4x128, bf16): surgeon {lin['surgeon_fwd_bwd_ms']:.3f} ms, "
          f"bf16 nn.Linear {lin['bf16_fwd_bwd_ms']:.3f} ms"
          + (f", bitsandbytes Linear4bit {lin['bnb_fwd_bwd_ms']:.3f} ms" if "bnb_fwd_bwd_ms" in lin else ""))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
