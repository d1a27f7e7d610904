"""The CPU thread machinery of the quantization kernels (surgeon/quant/codec.py): a persistent
pool that chunks are handed out to dynamically, per-thread scratch buffers, and output buffers
advised onto transparent huge pages."""

from __future__ import annotations

import itertools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

# Python glue between torch ops holds the GIL (~5 us an op): past a few threads they queue for it.
_MAX_WORKERS = 8
# Threads only for more chunks than this (4M parameters for 4-bit): below, waking a second thread
# and passing the GIL back and forth cost more than they save (measured on 2 vCPUs).
_MIN_PARALLEL_CHUNKS = 17


class _Pool:
    """A few persistent threads; recreated after a fork (threads do not survive one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._size = 0
        self._pid = 0

    def get(self, size: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._pid != os.getpid() or self._size < size:
                # the old executor is not shut down: a concurrent caller may still submit to it; its
                # idle threads exit once it is garbage collected
                self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="surgeon-quant")
                self._size, self._pid = size, os.getpid()
            return self._executor


_POOL = _Pool()
_SCRATCH = threading.local()


def scratch(name: str, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread reusable buffer of at least `size` elements (CPU only; elsewhere a fresh one)."""
    if device.type != "cpu":
        return torch.empty(size, dtype=dtype, device=device)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(name)
    if buf is None or buf.numel() < size or buf.dtype != dtype:
        with torch.inference_mode(False):  # kept across calls: never an inference tensor
            buf = buffers[name] = torch.empty(size, dtype=dtype)
    return buf[:size]


_HUGE_PAGES = os.environ.get("SURGEON_QUANT_HUGEPAGES", "1") not in ("0", "false", "no")
_HUGE_MIN_BYTES = 32 << 20  # glibc serves these with a fresh mmap of their own (threshold max 32 MiB)
_MADV_HUGEPAGE = 14
_libc = None


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty; a large CPU buffer is first advised to use transparent huge pages (Linux).

    A fresh 90 MB output costs ~30 ms of 4 KiB page faults on first write on a small VM, more than
    the dequantize itself; with 2 MiB pages it costs ~2 ms. Only the page-aligned interior of a buffer
    that has a mapping of its own is advised. Off with SURGEON_QUANT_HUGEPAGES=0."""
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if _HUGE_PAGES and device.type == "cpu" and nbytes >= _HUGE_MIN_BYTES and os.name == "posix":
        global _libc
        try:
            import ctypes

            if not sys.platform.startswith("linux"):
                return out
            if _libc is None:
                _libc = ctypes.CDLL(None, use_errno=True)
            start, end = out.data_ptr(), out.data_ptr() + nbytes
            huge = 1 << 21
            first, last = (start + huge - 1) & ~(huge - 1), end & ~(huge - 1)
            if last > first:
                _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_HUGEPAGE)
        except Exception:  # noqa: BLE001 - only a hint
            pass
    return out


@contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """torch ops of this thread on one thread (CPU), the previous setting restored afterwards."""
    previous = torch.get_num_threads()
    if device.type != "cpu" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_chunks(work: Callable[[int, int], None], total: int, chunk: int, device: torch.device,
                min_parallel: int | None = None) -> None:
    """Call work(start, stop) over [0, total) in steps of `chunk`, on up to get_num_threads() threads.

    Chunks are handed out dynamically, so a core taken by another process only slows its own share.
    Each worker runs torch single-threaded while it works (torch.set_num_threads is per thread for
    OpenMP; the process-wide default is restored when it is done). Fewer than `min_parallel` chunks
    run in the calling thread, also single-threaded: on a small VM an OpenMP team that has gone idle
    takes milliseconds to wake, far more than such a job."""
    if total <= 0:
        return
    min_parallel = _MIN_PARALLEL_CHUNKS if min_parallel is None else min_parallel
    nchunks = -(-total // chunk)
    workers = min(torch.get_num_threads(), nchunks, _MAX_WORKERS) if device.type == "cpu" else 1
    if workers <= 1 or nchunks < min_parallel:
        with single_threaded(device):
            for start in range(0, total, chunk):
                work(start, min(start + chunk, total))
        return
    counter = itertools.count()
    inference = torch.is_inference_mode_enabled()  # thread-local: the outputs may be inference tensors

    def loop() -> None:
        with single_threaded(device), torch.inference_mode(inference), torch.no_grad():
            while (i := next(counter)) < nchunks:
                work(i * chunk, min((i + 1) * chunk, total))

    executor = _POOL.get(workers)
    futures = [executor.submit(loop) for _ in range(workers)]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
