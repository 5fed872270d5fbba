r"""Fused PolyReLU: closed-form backward, saves only the input.

Forward, elementwise, with rho = relu(x) and ``weight[r-k]`` = w_k multiplying power k
(the released layout)::

    y = sum_{k=1..r} w_k rho^k + b          (Horner in rho: r passes)

Backward, with g = dL/dy::

    dx   = g * [x > 0] * sum_k k w_k rho^{k-1}
         = where(x > 0, g * (w_1 + rho * (2 w_2 + rho * (3 w_3 + ...))), 0)
    dw_k = sum(g * rho^k)                   (over every element)
    db   = sum(g)

(relu's derivative at 0 is taken as 0, as torch.relu's backward does.) The saved state
is x in its own dtype plus the r-element weight: 1.0x the input's bytes, against 3.0x
for the naive formula under autograd (relu, relu^2 and relu^3 are kept).

Numerics and fp16 range: bf16/fp16 inputs are computed in fp32 and the output is cast
back to the input's dtype. PolyReLU's cube leaves fp16's range by nature: rho^3 > 65504
for x > ~40.3, and with the default weights (1/3) the output itself exceeds 65504 for
x > ~58. The released formula, computed in fp16, already overflows at x > ~40.3 (its
rho^3 intermediate), so the fused path is finite on a strictly larger range; beyond ~58
inf is the correct fp16 answer. The input gradient (1/3 + 2/3 x + x^2 with the default
weights) stays finite in fp16 up to x ~ 255.

Execution mirrors :mod:`polycom.ops.poly_norm`: cache-sized blocks with reused
workspaces in eager CPU mode, plain functional ops on the whole tensor (fused by
Inductor) under ``torch.compile`` or off-CPU.

Double backward (gradient penalties, Hessian-vector products, ``create_graph=True``) is
not supported: the backward is ``once_differentiable`` and differentiating it raises
``RuntimeError``. The reference, ``polycom.functional.poly_relu(..., fused=False)``, is
plain autograd ops and supports it (checked with ``torch.autograd.gradgradcheck``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from . import _common
from ._common import compute_dtype, no_autocast, use_blocked_eager

__all__ = ["poly_relu_fused", "PolyReLUFunction"]


# Functional form: whole tensor, for torch.compile (Inductor fuses it) and other devices.


def _forward_functional(x, weight_ascending, bias):
    """b + sum_k w_k relu(x)^k by Horner; inputs already in the compute dtype."""
    order = weight_ascending.shape[0]
    rho = torch.relu(x)
    acc = weight_ascending[order - 1]
    for k in range(order - 1, 0, -1):
        acc = torch.addcmul(weight_ascending[k - 1], acc, rho)
    return acc * rho if bias is None else torch.addcmul(bias, acc, rho)


def _backward_functional(x, grad, weight_ascending, need_input_grad, need_weight_grad):
    """(dx or None, S or None), S[k-1] = sum(g * relu(x)^k)."""
    order = weight_ascending.shape[0]
    rho = torch.relu(x)
    grad_dot_powers = None
    if need_weight_grad:
        moment = grad * rho
        sums = [moment.sum()]
        for _ in range(1, order):
            moment = moment * rho
            sums.append(moment.sum())
        grad_dot_powers = torch.stack(sums)
    if not need_input_grad:
        return None, grad_dot_powers
    # sum_k k w_k rho^{k-1} by Horner; the k = 1 term is where the [x > 0] mask matters.
    k_times_w = weight_ascending * torch.arange(1, order + 1, dtype=x.dtype, device=x.device)
    slope = k_times_w[order - 1]
    for k in range(order - 1, 0, -1):
        slope = torch.addcmul(k_times_w[k - 1], slope, rho)
    grad_input = torch.where(x > 0, grad * slope, torch.zeros((), dtype=x.dtype, device=x.device))
    return grad_input, grad_dot_powers


# Blocked eager form (CPU): same formulas over flat blocks, reused workspaces, out= ops.


def _elements_per_block(numel: int) -> int:
    return max(1, min(numel, _common.BLOCK_ELEMENTS))


def _horner_into(out, rho, coefficients):
    """out = sum_k coefficients[k-1] * rho^{k-1} for order >= 2 (0-d coefficients)."""
    order = coefficients.shape[0]
    torch.addcmul(coefficients[order - 2], rho, coefficients[order - 1], out=out)
    for k in range(order - 2, 0, -1):
        torch.addcmul(coefficients[k - 1], out, rho, out=out)


def _forward_blocked(flat, weight_ascending, bias, dtype):
    numel = flat.numel()
    order = weight_ascending.shape[0]
    block = _elements_per_block(numel)
    convert = flat.dtype != dtype
    out = torch.empty(numel, dtype=flat.dtype, device=flat.device)

    def workspace():
        return torch.empty(block, dtype=dtype), (torch.empty(block, dtype=dtype) if order > 1 else None)

    def process(start, stop, work):
        rho_work, acc_work = work
        size = stop - start
        if convert:
            rho = rho_work[:size].copy_(flat[start:stop]).clamp_min_(0)
        else:
            rho = torch.clamp_min(flat[start:stop], 0, out=rho_work[:size])
        if order == 1:
            acc = weight_ascending[0]
        else:
            acc = acc_work[:size]
            _horner_into(acc, rho, weight_ascending)
        if bias is None:
            torch.mul(acc, rho, out=out[start:stop])
        else:
            torch.addcmul(bias, acc, rho, out=out[start:stop])

    _common.for_each_block(numel, block, workspace, process)
    return out


def _backward_blocked(flat, grad_flat, weight_ascending, need_input_grad, need_weight_grad, dtype):
    numel = flat.numel()
    order = weight_ascending.shape[0]
    block = _elements_per_block(numel)
    convert_x = flat.dtype != dtype
    convert_grad = grad_flat.dtype != dtype
    grad_input = torch.empty(numel, dtype=flat.dtype) if need_input_grad else None
    k_times_w = weight_ascending * torch.arange(1, order + 1, dtype=dtype)
    # one row of partial sums per block, summed in a fixed order afterwards (deterministic)
    partial_sums = torch.empty(((numel + block - 1) // block, order), dtype=dtype) if need_weight_grad else None

    def workspace():
        def buffer():
            return torch.empty(block, dtype=dtype)

        return (
            buffer(),
            buffer() if convert_grad else None,
            buffer() if need_weight_grad else None,
            buffer() if need_input_grad else None,
            buffer() if need_input_grad else None,
        )

    def process(start, stop, work):
        rho_work, grad_work, moment_work, slope_work, mask_work = work
        size = stop - start
        x = flat[start:stop]
        if convert_x:
            rho = rho_work[:size].copy_(x).clamp_min_(0)
        else:
            rho = torch.clamp_min(x, 0, out=rho_work[:size])
        grad = grad_flat[start:stop]
        if convert_grad:
            grad = grad_work[:size].copy_(grad)
        if need_weight_grad:
            moment = torch.mul(grad, rho, out=moment_work[:size])
            sums = [moment.sum()]
            for _ in range(1, order):
                sums.append(moment.mul_(rho).sum())
            partial_sums[start // block] = torch.stack(sums)
        if need_input_grad:
            # dx = g * [x > 0] * sum_k k w_k rho^{k-1}; [x > 0] = sign(rho) as a float
            # (multiplying by a bool mask takes a slow mixed-dtype loop: ~10x a float mul)
            mask = torch.sign(rho, out=mask_work[:size])
            if order == 1:
                slope = torch.mul(grad, k_times_w[0], out=slope_work[:size])
            else:
                slope = slope_work[:size]
                _horner_into(slope, rho, k_times_w)
                slope.mul_(grad)
            torch.mul(slope, mask, out=grad_input[start:stop])

    _common.for_each_block(numel, block, workspace, process)
    grad_dot_powers = partial_sums.sum(0) if need_weight_grad else None
    return grad_input, grad_dot_powers


class PolyReLUFunction(torch.autograd.Function):
    """Autograd function of :func:`poly_relu_fused`; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        with no_autocast(x.device):
            return _poly_relu_forward(ctx, x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        with no_autocast(grad_output.device):
            return _poly_relu_backward(ctx, grad_output)


def _poly_relu_forward(ctx, x, weight, bias):
    flat = x.reshape(-1)
    dtype = compute_dtype(x, weight, bias)
    weight_ascending = weight.to(dtype).flip(0)
    bias_c = None if bias is None else bias.to(dtype)
    ctx.shape = x.shape
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.bias_shape = None if bias is None else bias.shape
    ctx.save_for_backward(flat, weight)
    if flat.numel() == 0:
        return torch.empty_like(x)
    if use_blocked_eager(x.device):
        return _forward_blocked(flat, weight_ascending, bias_c, dtype).reshape(x.shape)
    return _forward_functional(flat.to(dtype), weight_ascending, bias_c).to(x.dtype).reshape(x.shape)


def _poly_relu_backward(ctx, grad_output):
    flat, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dtype = compute_dtype(flat, weight)
    grad_flat = grad_output.reshape(-1)
    grad_input = grad_weight = grad_bias = None
    if need_b:
        grad_bias = grad_flat.sum(dtype=dtype).reshape(ctx.bias_shape).to(ctx.bias_dtype)
    if not (need_x or need_w):
        return grad_input, grad_weight, grad_bias
    weight_ascending = weight.to(dtype).flip(0)
    if flat.numel() == 0:
        grad_dot_powers = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        grad_input = torch.zeros_like(flat) if need_x else None
    elif use_blocked_eager(flat.device):
        grad_input, grad_dot_powers = _backward_blocked(flat, grad_flat, weight_ascending, need_x, need_w, dtype)
    else:
        grad_input, grad_dot_powers = _backward_functional(flat.to(dtype), grad_flat.to(dtype), weight_ascending, need_x, need_w)
        if need_x:
            grad_input = grad_input.to(flat.dtype)
    if need_x:
        grad_input = grad_input.reshape(ctx.shape)
    if need_w:
        grad_weight = grad_dot_powers.flip(0).to(weight.dtype)
    return grad_input, grad_weight, grad_bias


def poly_relu_fused(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    r"""PolyReLU(x) = sum_{k=1..r} weight[r-k] * relu(x)^k + bias, fused.

    Args:
        x: input of any shape and float dtype.
        weight: shape (r,), ``weight[0]`` multiplies the highest power (released layout).
        bias: shape (1,) or None.

    Returns a tensor of ``x``'s shape and dtype; see the module docstring for the
    closed-form backward and where fp16 overflows.
    """
    if weight.dim() != 1 or weight.shape[0] < 1:
        raise ValueError(f"poly_relu weight must have shape (order,), order >= 1; got {tuple(weight.shape)}")
    return PolyReLUFunction.apply(x, weight, bias)
