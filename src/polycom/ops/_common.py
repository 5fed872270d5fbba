"""Shared plumbing of the fused ops: compute dtype, block size, autocast, compile check."""

from __future__ import annotations

import contextlib

import torch

# Elements per block of the eager CPU path. Each block's temporaries (about a dozen of
# them) are 1 MiB in fp32 and stay in L2/L3, so the full-width tensors are read from
# and written to memory about once per pass instead of once per elementwise op. A fresh
# 32 MiB temporary also costs ~8 ms of page faults on this machine (glibc returns large
# blocks to the OS), more than the arithmetic itself. Measured on 2 cores at 4096x2048
# fp32: 128..256 rows x 2048 per block is the sweet spot (64 rows: +20%, 1024: +25%).
BLOCK_ELEMENTS = 1 << 18


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
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


def rows_per_block(num_rows: int, row_width: int, device: torch.device) -> int:
    """Rows handled together in eager mode: everything at once off-CPU or when compiling."""
    if device.type != "cpu" or is_compiling():
        return max(num_rows, 1)
    return max(1, min(num_rows, BLOCK_ELEMENTS // max(row_width, 1)))


def elements_per_block(numel: int, device: torch.device) -> int:
    """Elements handled together by an elementwise op in eager mode (see rows_per_block)."""
    if device.type != "cpu" or is_compiling():
        return max(numel, 1)
    return max(1, min(numel, BLOCK_ELEMENTS))


def no_autocast(device: torch.device):
    """The fused ops choose their own precision (fp32 inside); autocast must not recast them."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()
