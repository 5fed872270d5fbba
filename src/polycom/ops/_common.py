"""Shared plumbing of the fused ops: compute dtype, blocking, autocast, compile check.

Two execution paths compute the same closed forms:

- eager on CPU: rows are processed in cache-sized blocks with a few reused workspace
  buffers and ``out=``/in-place ops, so each full-width tensor is streamed from memory
  about once per pass and no large temporary is allocated;
- under ``torch.compile`` and off-CPU: plain functional ops on the whole tensor, which
  Inductor fuses into a reduction kernel and a pointwise kernel per pass.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import threading
from typing import Callable

import torch

# Elements per block of the eager CPU path: a block's workspaces (1 MiB each in fp32)
# stay in L2/L3, so every full-width tensor is streamed through memory about once per
# pass, and no large temporary is allocated (a fresh 32 MiB temporary costs ~8 ms of page
# faults here, more than the arithmetic). Blocks are spread over threads by
# for_each_block. Measured at 4096x2048 fp32 on this 2-core machine while other jobs
# shared it, fused fwd+bwd speed-up over the naive formula (median of paired rounds):
#   2^18-element blocks, caller + 1 pool thread   20.5x   <- this setting
#   2^20-element blocks, caller + 1 pool thread   12.1x
#   32767-element blocks (ops run inline, no OpenMP), 2 threads 6.6x, 1 thread 5.1x
#   2^18-element blocks on the calling thread alone             3.9x (0.2x in a bad minute:
#   each of its ~25 OpenMP regions per block waited for a descheduled thread)
BLOCK_ELEMENTS = 1 << 18

# Threads that work on blocks (the caller included); 0: torch.get_num_threads().
BLOCK_THREADS = 0

# Tests switch this off to run the functional (compile/off-CPU) path in eager mode.
BLOCKED_EAGER = True

# Default cap on block threads: the measurements above are for 2 cores, and each block
# thread's ops may still use OpenMP, so more threads would only oversubscribe bigger CPUs.
MAX_DEFAULT_BLOCK_THREADS = 2

_POOL = None
_POOL_PID = None
_POOL_LOCK = threading.Lock()


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        # a forked child inherits the executor object but not its threads: start a new one
        if _POOL is None or _POOL_PID != os.getpid():
            _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=MAX_DEFAULT_BLOCK_THREADS, thread_name_prefix="polycom-block")
            _POOL_PID = os.getpid()
        return _POOL


def for_each_block(total: int, block: int, make_workspace: Callable[[], object], process: Callable[[int, int, object], None]) -> None:
    """Call ``process(start, stop, workspace)`` for consecutive blocks of ``range(total)``.

    Blocks are handed out one at a time to the calling thread plus pool threads (up to
    ``BLOCK_THREADS`` in all, by default min(torch threads, MAX_DEFAULT_BLOCK_THREADS)),
    each with its own workspace, so a descheduled thread delays only its current block.
    Blocks must write disjoint outputs. torch releases the GIL while an op computes, so
    the threads overlap.
    """
    starts = range(0, total, block)
    workers = min(BLOCK_THREADS or min(torch.get_num_threads(), MAX_DEFAULT_BLOCK_THREADS), len(starts))
    if workers <= 1:
        workspace = make_workspace()
        for start in starts:
            process(start, min(start + block, total), workspace)
        return
    counter = itertools.count()  # next() on a count is atomic under the GIL
    # Grad mode and inference mode are thread-local: pool threads must run in the caller's
    # inference mode, or in-place writes into outputs made under torch.inference_mode() fail.
    inference = torch.is_inference_mode_enabled()

    def work() -> None:
        # no_grad: out= ops refuse inputs that require grad
        with torch.inference_mode(inference), torch.no_grad():
            workspace = make_workspace()
            while True:
                index = next(counter)
                if index >= len(starts):
                    return
                start = starts[index]
                process(start, min(start + block, total), workspace)

    helpers = [_pool().submit(work) for _ in range(workers - 1)]
    try:
        work()
    finally:
        for helper in helpers:
            helper.result()


def compute_dtype(*tensors) -> torch.dtype:
    """fp64 if any operand is fp64, else fp32: bf16/fp16 are never used for arithmetic."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def is_compiling() -> bool:
    """True while torch.compile traces: then one whole-tensor block lets Inductor fuse."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return False  # pragma: no cover - torch < 2.3


def use_blocked_eager(device: torch.device) -> bool:
    """The cache-blocked workspace kernels: eager mode on CPU only."""
    return BLOCKED_EAGER and device.type == "cpu" and not is_compiling()


def rows_per_block(num_rows: int, row_width: int) -> int:
    """Rows handled together by the blocked eager kernels (at least one)."""
    return max(1, min(num_rows, BLOCK_ELEMENTS // max(row_width, 1)))


def no_autocast(device: torch.device):
    """The fused ops choose their own precision (fp32 inside); autocast must not recast them."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
