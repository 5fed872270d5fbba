"""Numerics helpers for the op tests: errors against an fp64 ground truth, with the place.

A failing comparison says how large the largest difference is, where it is, and what the
two values were there, instead of a bare "not close".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import torch

# Tight tolerances, relative to the largest |value| of the fp64 truth: about two
# roundings of the dtype (the fused ops compute in fp32 and round once at the end).
RELATIVE_TOLERANCE: Dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-9,
}


@dataclass
class Difference:
    """The largest |actual - expected| and where it occurs."""

    value: float
    index: Tuple[int, ...]
    actual: float
    expected: float

    def __str__(self) -> str:
        return f"max |diff| = {self.value:.3e} at index {self.index} (actual {self.actual:.6g}, expected {self.expected:.6g})"


def largest_difference(actual: torch.Tensor, expected: torch.Tensor) -> Difference:
    """Largest absolute difference in fp64; a non-finite value where the truth is finite counts as inf."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    if actual.numel() == 0:
        return Difference(0.0, (), 0.0, 0.0)
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    diff = (a - e).abs()
    # NaN/inf in actual where expected is finite is the worst possible difference.
    diff = torch.where(torch.isfinite(a) | ~torch.isfinite(e), diff, torch.full_like(diff, float("inf")))
    diff = torch.nan_to_num(diff, nan=float("inf"))
    flat_index = int(torch.argmax(diff))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), diff.shape))
    return Difference(float(diff.reshape(-1)[flat_index]), index, float(a[index]), float(e[index]))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, name: str = "value") -> Difference:
    """Assert max |actual - expected| <= atol; the message says how much, where and the values."""
    difference = largest_difference(actual, expected)
    assert difference.value <= atol, f"{name}: {difference}; allowed {atol:.3e}"
    return difference


def assert_no_worse_than_reference(
    name: str,
    fused: torch.Tensor,
    reference: torch.Tensor,
    truth: torch.Tensor,
    dtype: torch.dtype,
    slack: float = 1.0,
) -> None:
    """The fused value must be within the dtype's tight tolerance of the fp64 truth, or no
    further from it than the released formula (times ``slack``) -- whichever is larger.

    Both errors are measured against the same fp64 truth, so bf16 tolerances stay tight.
    """
    assert fused.dtype == reference.dtype or reference.dtype != dtype, f"{name}: dtype {fused.dtype} vs {reference.dtype}"
    scale = float(truth.detach().abs().max()) if truth.numel() else 0.0
    tight = RELATIVE_TOLERANCE[dtype] * max(scale, 1e-30)
    fused_error = largest_difference(fused, truth)
    reference_error = largest_difference(reference, truth)
    allowed = max(tight, slack * reference_error.value)
    assert fused_error.value <= allowed, (
        f"{name} [{dtype}]: fused {fused_error}; released formula max |diff| = {reference_error.value:.3e}; "
        f"allowed {allowed:.3e} (tight {tight:.3e})"
    )


def forward_and_grads(
    function: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_output: torch.Tensor,
    **kwargs,
) -> Tuple[torch.Tensor, ...]:
    """(output, grad of each input) for ``function(*inputs, **kwargs)`` with a given dL/dy."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    output = function(*leaves, **kwargs)
    grads = torch.autograd.grad(output, leaves, grad_output)
    return (output.detach(),) + tuple(g.detach() for g in grads)


def saved_bytes(function: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``function`` runs.

    Measured with torch.autograd.graph.saved_tensors_hooks; a storage saved twice (x kept
    by two ops) is counted once, as it occupies memory once.
    """
    storages = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), tensor.device)] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(storages.values())
