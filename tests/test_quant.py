"""surgeon.quant against bitsandbytes (bit for bit) and against a committed bitsandbytes reference.

Every equality check compares with bitsandbytes' own output (`quantize_4bit` / `dequantize_4bit` on
CPU) or with `tests/data/nf4_reference.safetensors`, which holds bitsandbytes' output for two fixed
inputs, so these tests fail when the codec drifts; none compares the codec with itself.

The reference file was written once, with bitsandbytes 0.50.2 and torch 2.13.0 on an x86-64 (AVX2)
CPU, by:

    python tests/test_quant.py --write-reference

(`write_reference` below). The test that reads it does not import bitsandbytes.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from surgeon.quant import QTYPES, QuantizedTensor, code_4bit, dynamic_map, quantize

REFERENCE = Path(__file__).parent / "data" / "nf4_reference.safetensors"

try:
    import bitsandbytes.functional as bnb_functional
except Exception as error:  # noqa: BLE001 - ImportError, or a broken native library
    bnb_functional = None
    BNB_MISSING = f"bitsandbytes cannot be imported ({type(error).__name__}: {error})"
else:
    BNB_MISSING = ""

needs_bnb = pytest.mark.skipif(bnb_functional is None, reason=BNB_MISSING or "bitsandbytes")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so NaN payloads and the sign of zero count)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.numel() == b.numel() and torch.equal(bits(a), bits(b))


def same_dequantized(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal, except that +0 and -0 count as one value.

    FP4's code 8 is -0 in bitsandbytes' codebook, and its CPU kernels disagree on it: the AVX2 path
    returns -0, the AVX-512 path +0. Every other bit still has to match (NaN payloads included).
    """
    return same_bits(torch.where(a == 0, 0.0, a).to(a.dtype), torch.where(b == 0, 0.0, b).to(b.dtype))


def sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Normal values with a per-row scale, so blocks differ in absmax; a few exact zeros and ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * (torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g) * 3 + 0.01)
    flat = x.view(-1)
    flat[::97] = 0.0
    flat[5::101] = flat[5::101].sign() * flat.abs().max()  # ties at +-absmax
    return x.to(dtype)


def bnb_quantize(x: torch.Tensor, qtype: str, blocksize: int, double: bool):
    return bnb_functional.quantize_4bit(x, blocksize=blocksize, quant_type=qtype, compress_statistics=double)


def bnb_dequantize(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    state.dtype = dtype
    # bitsandbytes' torch fallback (odd last dim) is torch.compile'd: eager is the same math, faster here
    stance = getattr(torch.compiler, "set_stance", None)
    if stance is None:  # pragma: no cover - torch < 2.6
        return bnb_functional.dequantize_4bit(packed, state)
    with stance("force_eager"):
        return bnb_functional.dequantize_4bit(packed, state)


def assert_same_as_bnb(q: QuantizedTensor, packed: torch.Tensor, state, double: bool) -> None:
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (packed.numel(),)
    assert same_bits(q.codes, packed.view(-1)), "codes differ"
    if double:
        assert q.absmax.dtype == torch.uint8
        assert same_bits(q.absmax, state.absmax), "8-bit absmax codes differ"
        assert same_bits(q.absmax_scale, state.state2.absmax), "double-quant scales differ"
        assert same_bits(q.absmax_offset, state.offset.reshape(())), "double-quant offset differs"
    else:
        assert q.absmax.dtype == torch.float32
        assert same_bits(q.absmax, state.absmax), "absmax differs"


# --------------------------------------------------------------------------------------------
# against bitsandbytes

SHAPES = [(64, 64), (300, 257), (33,), (4097,), (7, 9, 11), (48, 130)]  # 300*257: 1204.7 blocks of 64


@needs_bnb
def test_codebooks_are_bitsandbytes():
    for qtype in ("nf4", "fp4"):
        assert same_bits(code_4bit(qtype), bnb_functional.get_4bit_type(qtype, device="cpu"))
    assert same_bits(dynamic_map(), bnb_functional.create_dynamic_map())


@needs_bnb
@pytest.mark.parametrize("double", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantize_is_bitsandbytes(shape, blocksize, dtype, qtype, double):
    x = sample(shape, dtype, seed=blocksize)
    packed, state = bnb_quantize(x, qtype, blocksize, double)
    q = quantize(x, qtype, blocksize=blocksize, double=double)
    assert q.shape == shape and q.dtype == dtype and q.blocksize == blocksize and q.double == double
    assert_same_as_bnb(q, packed, state, double)


@needs_bnb
@pytest.mark.parametrize("blocksize", [32, 512, 1024, 2048, 4096])
def test_quantize_other_blocksizes_are_bitsandbytes(blocksize):
    for double in (False, True):
        for qtype in ("nf4", "fp4"):
            x = sample((40, 257), torch.bfloat16, seed=blocksize)
            packed, state = bnb_quantize(x, qtype, blocksize, double)
            assert_same_as_bnb(quantize(x, qtype, blocksize=blocksize, double=double), packed, state, double)


@needs_bnb
@pytest.mark.parametrize("double", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dequantize_fp32_is_bitsandbytes(shape, blocksize, qtype, double):
    x = sample(shape, torch.bfloat16, seed=1)
    packed, state = bnb_quantize(x, qtype, blocksize, double)
    q = quantize(x, qtype, blocksize=blocksize, double=double)
    ours = q.dequantize(torch.float32)
    theirs = bnb_dequantize(packed, state, torch.float32).reshape(shape)  # bnb transposes numel <= 2
    assert ours.shape == shape and ours.dtype == torch.float32
    assert same_dequantized(ours, theirs)
    # and into a preallocated buffer
    buffer = torch.full(shape, float("nan"))
    assert q.dequantize(torch.float32, out=buffer) is buffer
    assert same_dequantized(buffer, theirs)


@needs_bnb
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 64), (300, 257), (4097,)], ids=lambda s: "x".join(map(str, s)))
def test_dequantize_half_is_bitsandbytes(shape, qtype, out_dtype):
    """fp32 math rounded once to bf16/fp16 is what bitsandbytes' CPU kernels return in that dtype."""
    for double in (False, True):
        x = sample(shape, out_dtype, seed=2)
        packed, state = bnb_quantize(x, qtype, 64, double)
        ours = quantize(x, qtype, blocksize=64, double=double).dequantize(out_dtype)
        assert ours.dtype == out_dtype
        assert same_dequantized(ours, bnb_dequantize(packed, state, out_dtype).reshape(shape))


@needs_bnb
@pytest.mark.parametrize("small_chunks", [False, True], ids=["default-chunks", "small-chunks"])
def test_many_chunks_and_threads_are_bitsandbytes(monkeypatch, small_chunks):
    """Several chunks on several threads (the thread pool), with a partial block at the end."""
    import surgeon.quant.codec as codec
    import surgeon.quant.threads as threads

    if small_chunks:  # ~100 chunks, and threads from 2 chunks on
        monkeypatch.setattr(codec, "_QUANT_CHUNK", 8192)
        monkeypatch.setattr(codec, "_DEQUANT_CHUNK", 4096)
        monkeypatch.setattr(codec, "_INT8_CHUNK", 8192)
        monkeypatch.setattr(threads, "_MIN_PARALLEL_CHUNKS", 2)
    x = sample((1031, 777), torch.bfloat16, seed=3)  # 801087 elements: odd numel, a partial block
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for double in (False, True):
                packed, state = bnb_quantize(x, "nf4", 64, double)
                q = quantize(x, "nf4", blocksize=64, double=double)
                assert_same_as_bnb(q, packed, state, double)
                assert same_bits(q.dequantize(torch.float32), bnb_dequantize(packed, state, torch.float32))
                assert same_bits(q.dequantize(torch.bfloat16), bnb_dequantize(packed, state, torch.bfloat16))
    finally:
        torch.set_num_threads(previous)


@needs_bnb
@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_special_values_are_bitsandbytes(qtype):
    """NaN / inf blocks, an all-zero tensor (double quant of identical absmaxes), signed zeros, subnormals."""
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    x[3, 5], x[10, 0], x[20, 7] = float("nan"), float("inf"), -float("inf")
    tiny = torch.zeros(64, 128)
    tiny[0, :64] = -0.0
    tiny[1, 1], tiny[2, 2] = 1e-41, -3e-39
    for t in (x, torch.zeros(64, 128), tiny, torch.zeros(3, 5)):
        for double in (False, True):
            packed, state = bnb_quantize(t, qtype, 64, double)
            q = quantize(t, qtype, blocksize=64, double=double)
            assert_same_as_bnb(q, packed, state, double)
            assert same_dequantized(q.dequantize(torch.float32), bnb_dequantize(packed, state, torch.float32).reshape(t.shape))


def midpoint_ties(qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A block with absmax 1.0 holding every codebook midpoint exactly (so x / absmax is the
    midpoint), and the codes bitsandbytes' rule gives them: ties go to the lower value."""
    code = code_4bit(qtype)
    order = sorted(range(16), key=lambda i: (code[i].item(), i))  # FP4: +0 (code 0) before -0 (code 8)
    values = [code[i] for i in order]
    mids = [(a + b) / 2 for a, b in zip(values, values[1:])]  # fp32 arithmetic, as bitsandbytes
    x = torch.zeros(64)
    x[0] = 1.0
    x[1:16] = torch.stack(mids)
    expected = torch.tensor([order[-1]] + order[:15] + [order[7]] * 48)
    return x, expected


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_midpoint_ties_go_to_the_lower_code(qtype):
    x, expected = midpoint_ties(qtype)
    zero = expected[-1]
    for data, want in ((x, expected), (x[:31], expected[:31])):  # a full block, and a partial (division)
        q = quantize(data, qtype, blocksize=64)
        got = torch.stack([q.codes >> 4, q.codes & 15], 1).view(-1)[: data.numel()]
        assert got.tolist() == want[: data.numel()].tolist()
        if data.numel() % 2:
            assert int(q.codes[-1]) & 15 == int(zero)
    if bnb_functional is not None:
        packed, state = bnb_quantize(x, qtype, 64, False)
        assert same_bits(quantize(x, qtype).codes, packed.view(-1))


def division_sensitive(qtype: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of 64 whose values sit where x * fl(1 / absmax) and x / absmax fall on different sides
    of a codebook midpoint: bitsandbytes multiplies by the reciprocal in full blocks and divides in
    the last, partial block. Returns the tensor and the codes that rule gives (one per element)."""
    code = code_4bit(qtype)
    order = torch.argsort(code, stable=True)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    rows, expected = [], []
    for a in (3.0, 7.0, 0.3, 11.0, 1.7, 2.9):
        absmax = torch.tensor(a)
        picked = []
        for m in bounds:
            up = down = m * absmax
            near = [up]
            for _ in range(8):  # the 8 floats either side of m * absmax
                up, down = torch.nextafter(up, torch.tensor(1e9)), torch.nextafter(down, torch.tensor(-1e9))
                near += [up, down]
            x = torch.stack(near)
            split = torch.bucketize(x * absmax.reciprocal(), bounds) != torch.bucketize(x / absmax, bounds)
            picked.append(x[split])
        block = torch.cat([absmax.view(1), *picked])[:63]
        rows.append(block)
    blocks = [torch.nn.functional.pad(r, (0, 64 - r.numel())) for r in rows[:-1]] + [rows[-1]]  # last: partial
    x = torch.cat(blocks)
    for block in blocks:
        absmax = block.abs().max()
        by_reciprocal = order[torch.bucketize(block * absmax.reciprocal(), bounds)]
        by_division = order[torch.bucketize(block / absmax, bounds)]
        assert not torch.equal(by_reciprocal, by_division)  # the block does tell the two apart
        expected.append(by_reciprocal if block.numel() == 64 else by_division)
    return x, torch.cat(expected)


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_reciprocal_in_full_blocks_division_in_the_last(qtype):
    x, expected = division_sensitive(qtype)
    assert x.numel() % 64 and x.numel() > 64
    q = quantize(x, qtype, blocksize=64)
    got = torch.stack([q.codes >> 4, q.codes & 15], 1).view(-1)[: x.numel()]
    assert got.tolist() == expected.tolist()
    if bnb_functional is not None:
        packed, _ = bnb_quantize(x, qtype, 64, False)
        assert same_bits(q.codes, packed.view(-1))


# --------------------------------------------------------------------------------------------
# against the committed reference (no bitsandbytes)


def write_reference(path: Path = REFERENCE) -> None:
    """Write bitsandbytes' output for two fixed inputs (run once; needs bitsandbytes)."""
    import bitsandbytes
    import bitsandbytes.functional as F

    small = sample((37, 53), torch.float32, seed=11)  # 1961: odd, 30.6 blocks of 64, odd last dim
    big = sample((96, 90), torch.bfloat16, seed=12)  # 8640: 270 blocks of 32 -> 2 double-quant blocks
    out: dict[str, torch.Tensor] = {"small.x": small, "big.x": big}
    packed, state = F.quantize_4bit(small, blocksize=64, quant_type="nf4")
    out["small.nf4.codes"], out["small.nf4.absmax"] = packed.view(-1), state.absmax
    state.dtype = torch.float32
    out["small.nf4.dequant_fp32"] = F.dequantize_4bit(packed, state).contiguous()
    packed, state = F.quantize_4bit(small, blocksize=128, quant_type="fp4")
    out["small.fp4.codes"], out["small.fp4.absmax"] = packed.view(-1), state.absmax
    packed, state = F.quantize_4bit(big, blocksize=32, quant_type="nf4", compress_statistics=True)
    out["big.nf4d.codes"], out["big.nf4d.absmax"] = packed.view(-1), state.absmax
    out["big.nf4d.absmax_scale"], out["big.nf4d.absmax_offset"] = state.state2.absmax, state.offset.reshape(1)
    out["big.nf4d.dequant_bf16"] = F.dequantize_4bit(packed, state).contiguous()  # bf16: the input's dtype
    div, _ = division_sensitive("nf4")
    out["div.x"] = div
    packed, state = F.quantize_4bit(div, blocksize=64, quant_type="nf4")
    out["div.nf4.codes"], out["div.nf4.absmax"] = packed.view(-1), state.absmax
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path),
              metadata={"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__,
                        "cpu": torch.backends.cpu.get_cpu_capability()})


def test_reference_file_without_bitsandbytes():
    """Bit identity with bitsandbytes' stored output; runs where bitsandbytes is not installed."""
    assert REFERENCE.stat().st_size < 100_000
    ref = load_file(str(REFERENCE))

    q = quantize(ref["small.x"], "nf4", blocksize=64)
    assert same_bits(q.codes, ref["small.nf4.codes"]) and same_bits(q.absmax, ref["small.nf4.absmax"])
    assert same_bits(q.dequantize(torch.float32), ref["small.nf4.dequant_fp32"])

    q = quantize(ref["div.x"], "nf4", blocksize=64)
    assert same_bits(q.codes, ref["div.nf4.codes"]) and same_bits(q.absmax, ref["div.nf4.absmax"])

    q = quantize(ref["small.x"], "fp4", blocksize=128)
    assert same_bits(q.codes, ref["small.fp4.codes"]) and same_bits(q.absmax, ref["small.fp4.absmax"])

    q = quantize(ref["big.x"], "nf4", blocksize=32, double=True)
    assert q.absmax.numel() == 270 and q.absmax_scale.numel() == 2
    assert same_bits(q.codes, ref["big.nf4d.codes"])
    offset = ref["big.nf4d.absmax_offset"].reshape(())
    # The offset is torch's mean() of 270 floats; its summation order is torch's business (it could
    # differ by an ulp on another CPU's vector width). If so, check the rest given bitsandbytes' offset.
    if not same_bits(q.absmax_offset, offset):
        assert torch.allclose(q.absmax_offset, offset, rtol=1e-6, atol=0)
        from surgeon.quant.codec import _quantize_dynamic

        plain = quantize(ref["big.x"], "nf4", blocksize=32)
        codes8, scale, _ = _quantize_dynamic(plain.absmax, offset)
        q = QuantizedTensor("nf4", q.shape, q.dtype, 32, q.codes, codes8, True, scale, offset)
    assert same_bits(q.absmax, ref["big.nf4d.absmax"])
    assert same_bits(q.absmax_scale, ref["big.nf4d.absmax_scale"])
    assert same_bits(q.dequantize(torch.bfloat16), ref["big.nf4d.dequant_bf16"])


# --------------------------------------------------------------------------------------------
# properties that need no reference

_NF4_SORTED = sorted(code_4bit("nf4").tolist())
NF4_MAX_HALF_GAP = max((b - a) / 2 for a, b in zip(_NF4_SORTED, _NF4_SORTED[1:]))  # 0.1385


@pytest.mark.parametrize("blocksize", [16, 64, 256])
def test_nf4_round_trip_error_is_bounded_by_the_codebook(blocksize):
    """|x - dq(x)| <= absmax * (largest half gap between neighbouring NF4 values), per block."""
    x = sample((129, 70), torch.float32, seed=5)  # 9030: partial last block for every blocksize
    q = quantize(x, "nf4", blocksize=blocksize)
    err = (x - q.dequantize(torch.float32)).abs().view(-1)
    n = x.numel()
    absmax = torch.nn.functional.pad(x.view(-1).abs(), (0, -n % blocksize)).view(-1, blocksize).amax(1)
    bound = (absmax * NF4_MAX_HALF_GAP * (1 + 1e-6)).repeat_interleave(blocksize)[:n]
    assert bool((err <= bound).all())
    # values at +-absmax come back exactly, exact zeros stay zero
    flat = x.view(-1)
    at_max = flat.abs() == absmax.repeat_interleave(blocksize)[:n]
    assert bool((err[at_max] == 0).all()) and bool((q.dequantize(torch.float32).view(-1)[flat == 0] == 0).all())
    normal = torch.randn(256, 256, generator=torch.Generator().manual_seed(blocksize))
    rel = (normal - quantize(normal, "nf4", blocksize=blocksize).dequantize(torch.float32)).norm() / normal.norm()
    assert 0.05 < rel < 0.12, rel  # NF4 on normal data: ~0.09 of the signal at blocksize 64


def test_double_quant_absmax_is_close_and_codes_unchanged():
    x = sample((512, 200), torch.bfloat16, seed=6)  # 1600 blocks -> 7 blocks of 256
    plain, double = quantize(x, "nf4"), quantize(x, "nf4", double=True)
    assert torch.equal(plain.codes, double.codes)  # 4-bit codes come from the exact absmax
    approx = double.block_absmax()
    assert approx.dtype == torch.float32 and approx.shape == plain.absmax.shape
    # error <= (half the largest gap of the 8-bit map + one LUT bin) * max|absmax - mean| of its 256-block
    exact = plain.absmax
    y = exact - exact.mean()
    spread = torch.nn.functional.pad(y.abs(), (0, -y.numel() % 256)).view(-1, 256).amax(1).repeat_interleave(256)
    grid = dynamic_map()
    step = float((grid[1:] - grid[:-1]).max()) / 2 + 2 / 65535
    bound = spread[: y.numel()] * step * (1 + 1e-5) + 1e-6 * float(exact.mean())
    assert bool(((approx - exact).abs() <= bound).all())
    assert float(((approx - exact).abs() / exact).median()) < 0.01


def test_odd_numel_pads_the_last_nibble_with_the_code_of_zero():
    for qtype, zero_code in (("nf4", 7), ("fp4", 0)):
        x = torch.tensor([0.5, -1.0, 0.25])
        q = quantize(x, qtype)
        assert q.codes.shape == (2,)
        assert int(q.codes[1]) & 0xF == zero_code
        assert q.dequantize(torch.float32).shape == (3,)


def test_int8_round_trip():
    x = sample((100, 300), torch.float32, seed=7)  # 30000: partial last block of 64
    for blocksize in (64, 128):
        q = quantize(x, "int8", blocksize=blocksize)
        n = x.numel()
        assert q.codes.dtype == torch.uint8 and q.codes.shape == (n,) and q.absmax.dtype == torch.float32
        signed = q.codes.view(torch.int8).to(torch.float64)
        assert float(signed.abs().max()) == 127
        absmax = torch.nn.functional.pad(x.view(-1).abs(), (0, -n % blocksize)).view(-1, blocksize).amax(1)
        assert torch.equal(q.absmax, absmax)
        exact = x.view(-1).double() * 127 / absmax.double().repeat_interleave(blocksize)[:n]
        assert float((signed - exact).abs().max()) <= 0.5 + 1e-4  # nearest integer code
        err = (x - q.dequantize(torch.float32)).abs().view(-1)
        assert bool((err <= absmax.repeat_interleave(blocksize)[:n] / 254 * (1 + 1e-5)).all())
        for dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(q.dequantize(dtype), q.dequantize(torch.float32).to(dtype))  # one rounding
    big = sample((1200, 1900), torch.bfloat16, seed=7)  # 2.28M: past the threading threshold for int8
    q = quantize(big, "int8", blocksize=64)
    n = big.numel()
    absmax = big.float().view(-1, 64).abs().amax(1)
    exact = big.view(-1).double() * 127 / absmax.double().repeat_interleave(64)
    assert float((q.codes.view(torch.int8).double() - exact).abs().max()) <= 0.5 + 1e-4 and n % 64 == 0
    double = quantize(x, "int8", blocksize=64, double=True)
    assert torch.equal(double.codes, quantize(x, "int8", blocksize=64).codes)
    assert float((double.dequantize(torch.float32) - x).abs().max()) < 0.05 * float(x.abs().max())


def test_half_precision_output_is_fp32_rounded_once():
    x = sample((64, 96), torch.bfloat16, seed=8)
    for qtype in ("nf4", "fp4"):
        q = quantize(x, qtype, double=True)
        full = q.dequantize(torch.float32)
        for dtype in (torch.bfloat16, torch.float16):
            assert same_bits(q.dequantize(dtype), full.to(dtype))


def bits_expected(numel: int, qtype: str, blocksize: int, double: bool) -> float:
    code_bits = 8 if qtype == "int8" else 4
    blocks = math.ceil(numel / blocksize)
    if not double:
        return code_bits + 32 * blocks / numel
    return code_bits + (8 * blocks + 32 * math.ceil(blocks / 256) + 32 + 32 * 256) / numel


def test_bits_per_parameter():
    x = torch.randn(4096, 4096).to(torch.bfloat16)
    n = x.numel()
    plain = quantize(x, "nf4", blocksize=64)
    assert plain.nbytes == n // 2 + 4 * n // 64
    assert plain.nbytes * 8 / n == 4 + 32 / 64 == 4.5
    double = quantize(x, "nf4", blocksize=64, double=True)
    expected = 4 + 8 / 64 + 32 / (64 * 256) + (32 + 32 * 256) / n  # codes, 8-bit absmax, scales, offset+map
    assert double.nbytes * 8 / n == pytest.approx(expected, rel=1e-12)
    assert round(double.bits_per_parameter, 3) == 4.127
    assert double.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 + 1024
    for qtype, blocksize, dbl in (("fp4", 128, False), ("int8", 64, False), ("int8", 256, True)):
        q = quantize(x[:512], qtype, blocksize=blocksize, double=dbl)
        assert q.nbytes * 8 / q.numel == pytest.approx(bits_expected(q.numel, qtype, blocksize, dbl), rel=1e-12)


@pytest.mark.parametrize("blocksize", [0, 1, 8, 15, 48, 63, 100, 8192, -64, 64.0, True, "64"])
def test_invalid_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a power of two from 16 to 4096"):
        quantize(torch.randn(128), "nf4", blocksize=blocksize)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="unknown quantization type 'nf8'"):
        quantize(torch.randn(128), "nf8")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize(torch.arange(128), "nf4")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize(torch.randn(128, dtype=torch.float64), "nf4")
    q = quantize(torch.randn(8, 16), "nf4", blocksize=16)
    with pytest.raises(ValueError, match="out must be"):
        q.dequantize(torch.float32, out=torch.empty(16, 8))
    with pytest.raises(ValueError, match="out must be"):
        q.dequantize(torch.float32, out=torch.empty(8, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        q.dequantize(torch.float32, out=torch.empty(16, 8).T)
    with pytest.raises(ValueError, match="dequantize to"):
        q.dequantize(torch.int8)
    assert QTYPES == ("nf4", "fp4", "int8")


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("double", [False, True], ids=["plain", "double"])
def test_tensors_round_trip_through_safetensors(tmp_path, qtype, double):
    x = sample((33, 41), torch.bfloat16, seed=9)
    q = quantize(x, qtype, blocksize=32, double=double)
    names = {"codes", "absmax"} | ({"absmax_scale", "absmax_offset", "absmax_code"} if double else set())
    assert set(q.tensors()) == names
    path = tmp_path / "q.safetensors"
    save_file({k: v.contiguous() for k, v in q.tensors().items()}, str(path), metadata=q.metadata())
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    loaded = load_file(str(path))
    back = QuantizedTensor.from_safetensors(loaded, metadata)
    again = QuantizedTensor.from_tensors(qtype, (33, 41), "bfloat16", 32, double, loaded)
    for r in (back, again):
        assert (r.qtype, r.shape, r.dtype, r.blocksize, r.double) == (qtype, (33, 41), torch.bfloat16, 32, double)
        assert r.nbytes == q.nbytes
        assert same_bits(r.dequantize(torch.float32), q.dequantize(torch.float32))
    bad = dict(loaded, codes=loaded["codes"][:-1])
    with pytest.raises(ValueError, match="codes"):
        QuantizedTensor.from_tensors(qtype, (33, 41), torch.bfloat16, 32, double, bad)
    if double:
        with pytest.raises(ValueError, match="dynamic map"):
            QuantizedTensor.from_tensors(qtype, (33, 41), torch.bfloat16, 32, True,
                                         dict(loaded, absmax_code=loaded["absmax_code"].flip(0)))


def test_to_device_and_constructor_compatibility():
    q = quantize(torch.randn(40, 64), "nf4", double=True)
    moved = q.to("cpu")
    assert moved is not q and moved.codes is q.codes  # already there: the same tensors
    # what surgeon/methods/weights/quantize.py does: rebuild from the stored fields
    rebuilt = QuantizedTensor(qtype=q.qtype, shape=q.shape, dtype=q.dtype, blocksize=q.blocksize, codes=q.codes,
                              absmax=q.absmax, double=q.double, absmax_scale=q.absmax_scale,
                              absmax_offset=q.absmax_offset)
    assert same_bits(rebuilt.dequantize(torch.bfloat16), q.dequantize(torch.bfloat16))


def test_small_and_empty_tensors():
    for n in (1, 2, 3, 17):
        x = torch.linspace(-1, 1, n)
        for qtype in QTYPES:
            q = quantize(x, qtype, blocksize=16, double=True)
            assert q.dequantize(torch.float32).shape == (n,)
            assert float((q.dequantize(torch.float32) - x).abs().max()) <= 0.2
    q = quantize(torch.empty(0, 8), "nf4", double=True)
    assert q.codes.numel() == 0 and q.dequantize(torch.bfloat16).shape == (0, 8)


def test_inference_mode_and_grad(monkeypatch):
    import surgeon.quant.threads as threads

    monkeypatch.setattr(threads, "_MIN_PARALLEL_CHUNKS", 2)  # the worker threads, not inline
    x = sample((700, 800), torch.float32, seed=10).requires_grad_()  # several chunks
    with torch.inference_mode():
        q = quantize(x, "nf4", double=True)
        w = q.dequantize(torch.bfloat16)
    assert w.shape == (700, 800)
    q2 = quantize(x, "nf4", double=True)
    assert torch.equal(q2.codes, q.codes) and not q2.dequantize(torch.float32).requires_grad


if __name__ == "__main__":
    if "--write-reference" in sys.argv:
        write_reference()
        print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size} bytes)")
