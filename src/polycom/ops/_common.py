"""Shared plumbing of the fused ops: compute dtype, blocking, autocast, compile check.

Two execution paths compute the same closed forms:

- eager on CPU: rows are processed in cache-sized blocks with a few reused workspace
  buffers and ``out=``/in-place ops, so each full-width tensor is streamed from memory
  about once per pass and no large temporary is allocated;
- under ``torch.compile`` and off-CPU: plain functional ops on the whole tensor, which
  Inductor fuses into a reduction kernel and a pointwise kernel per pass.
"""

from __future__ import annotations

import contextlib

import torch

# Elements per block of the eager CPU path: a block's workspaces (three or four of them)
# are 1 MiB each in fp32 and stay in L2/L3. Blocking matters twice on CPU: an elementwise
# op over a 32 MiB tensor streams it through DRAM, and a fresh 32 MiB temporary costs
# ~8 ms of page faults here (glibc hands large blocks back to the OS on free), more than
# the arithmetic. Measured on 2 cores at 4096x2048 fp32: 128..256 rows x 2048 per block
# is the sweet spot (64 rows: +20% time, 1024 rows: +25%).
BLOCK_ELEMENTS = 1 << 18

# Tests switch this off to run the functional (compile/off-CPU) path in eager mode.
BLOCKED_EAGER = True


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
