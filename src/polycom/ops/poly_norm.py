r"""Fused PolyNorm: closed-form backward, saves only the input and per-row statistics.

Forward, for one row x of width n and order r (``weight[r-k]`` multiplies power k, the
released layout)::

    m_{2k} = mean(x^{2k})                  k = 1..r   (row statistics, one pass)
    s_k    = sqrt(m_{2k} + eps)            (RMS of x^k, so N(x^k) = x^k / s_k)
    c_k    = w_k / s_k                     w_k = weight[r-k]
    y      = sum_k c_k x^k + b             (a per-row polynomial in x: Horner, r passes)

Backward, with g = dL/dy and the per-row dot products G_k = mean(g * x^k)::

    dL/dx_j = sum_i g_i dy_i/dx_j,   dy_i/dx_j = sum_k w_k [ k x_i^{k-1} d_ij / s_k
                                                    - x_i^k / s_k^2 * ds_k/dx_j ],
    ds_k/dx_j = k x_j^{2k-1} / (n s_k)

    =>  dx = g * sum_k k c_k x^{k-1}  -  x * sum_k d_k x^{2k-2},
        d_k = k c_k G_k / (m_{2k} + eps) = k w_k G_k / s_k^3

    dw_k = sum over rows of n G_k / s_k         (= sum(g * N(x^k)))
    db   = sum(g)

Both polynomials in dx are evaluated by Horner (the second in x^2), so the backward pass
recomputes x^k on the fly from the saved input instead of keeping r normalised powers:
the saved state is x in its own dtype plus the r per-row values 1/s_k in fp32 (and the
r-element weight), about 1.0x the input's bytes. The naive released formula keeps ~6x
(x^2, x^3, their normalisers and products) for autograd.

Numerics: bf16/fp16 inputs are computed in fp32 (fp64 inputs in fp64) and the output is
returned in the input's dtype; gradients come back in the dtype of the tensor they belong
to. The statistics are fp32, so fp16 inputs with |x| up to 1e3 (x^6 = 1e18) and indeed
up to fp16's maximum (65504^6 ~ 8e28) stay finite. In fp32, mean(x^{2r}) overflows once
|x| > ~2.6e6 for r = 3 -- as the released formula does.

Execution (see :mod:`polycom.ops._common`): eager on CPU, rows are processed in
cache-sized blocks with reused workspaces and ``out=`` ops, spread over two threads
(forward+backward 6.3x faster than the naive formula at 4096x2048 fp32 on 2 shared
cores, 6-13x over widths 1024..8256, 2-5x in bf16; bench/activations.md). Under
``torch.compile`` and off-CPU the functional block functions below run once on the whole
tensor and Inductor fuses the statistics into one reduction and the polynomial into one
pointwise kernel (0.8x the time of compiled ``F.rms_norm`` with a gain, forward+backward).

Double backward (gradient penalties, Hessian-vector products, ``create_graph=True``) is
not supported: the backward is ``once_differentiable`` and differentiating it raises
``RuntimeError``. The reference, ``polycom.functional.poly_norm(..., fused=False)``, is
plain autograd ops and supports it (checked with ``torch.autograd.gradgradcheck``).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ._common import compute_dtype, for_each_block, no_autocast, rows_per_block, use_blocked_eager

__all__ = ["poly_norm_fused", "PolyNormFunction"]


# ---------------------------------------------------------------------------------------
# Functional form: whole tensor, for torch.compile (Inductor fuses it) and other devices.
# ---------------------------------------------------------------------------------------


def _row_inverse_rms(x: torch.Tensor, order: int, eps: float) -> torch.Tensor:
    """1/s_k = rsqrt(mean(x^{2k}) + eps) for k = 1..order, shape (rows, order), one pass."""
    x_squared = x * x
    power = x_squared
    sums = [x_squared.sum(-1)]
    for _ in range(1, order):
        power = power * x_squared
        sums.append(power.sum(-1))
    return torch.rsqrt(torch.stack(sums, -1) * (1.0 / x.shape[-1]) + eps)


def _horner(x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """sum_k coefficients[:, k-1] * x^{k-1} (per-row coefficients, k = 1..order)."""
    order = coefficients.shape[-1]
    acc = coefficients[:, order - 1 : order]
    for k in range(order - 1, 0, -1):
        acc = torch.addcmul(coefficients[:, k - 1 : k], acc, x)
    return acc


def _forward_functional(x, weight_ascending, bias, eps):
    """(y, 1/s) with y = b + x * sum_k c_k x^{k-1}; inputs already in the compute dtype."""
    inverse_rms = _row_inverse_rms(x, weight_ascending.shape[0], eps)
    acc = _horner(x, inverse_rms * weight_ascending)
    y = acc * x if bias is None else torch.addcmul(bias, acc, x)
    return y, inverse_rms


def _backward_coefficients(inverse_rms, weight_ascending, grad_dot_powers, width):
    """Per-row k c_k and d_k = k c_k G_k / (m_2k + eps) = k c_k (S_k / n) (1/s_k)^2."""
    order = weight_ascending.shape[0]
    powers = torch.arange(1, order + 1, dtype=inverse_rms.dtype, device=inverse_rms.device)
    k_times_c = inverse_rms * weight_ascending * powers
    d = k_times_c * grad_dot_powers * inverse_rms * inverse_rms * (1.0 / width)
    return k_times_c, d


def _grad_dot_powers_functional(x, grad, order):
    """S[:, k-1] = sum(g * x^k) per row (n * G_k)."""
    moment = grad * x
    sums = [moment.sum(-1)]
    for _ in range(1, order):
        moment = moment * x
        sums.append(moment.sum(-1))
    return torch.stack(sums, -1)


def _backward_functional(x, grad, inverse_rms, weight_ascending, need_input_grad):
    """(dx or None, S); inputs already in the compute dtype."""
    grad_dot_powers = _grad_dot_powers_functional(x, grad, weight_ascending.shape[0])
    if not need_input_grad:
        return None, grad_dot_powers
    k_times_c, d = _backward_coefficients(inverse_rms, weight_ascending, grad_dot_powers, x.shape[-1])
    slope = _horner(x, k_times_c)  # sum_k k c_k x^{k-1}
    correction = _horner(x * x, d) if weight_ascending.shape[0] > 1 else d  # sum_k d_k x^{2k-2}
    return grad * slope - x * correction, grad_dot_powers


# ---------------------------------------------------------------------------------------
# Blocked eager form (CPU): same formulas, row blocks, reused workspaces, out= ops.
# ---------------------------------------------------------------------------------------


def _horner_into(out: torch.Tensor, x: torch.Tensor, coefficients: torch.Tensor) -> None:
    """out = sum_k coefficients[:, k-1] * x^{k-1}, for order >= 2, with no temporaries."""
    order = coefficients.shape[-1]
    torch.addcmul(coefficients[:, order - 2 : order - 1], x, coefficients[:, order - 1 : order], out=out)
    for k in range(order - 2, 0, -1):
        torch.addcmul(coefficients[:, k - 1 : k], out, x, out=out)


def _forward_blocked(rows2d, weight_ascending, bias, eps, dtype):
    num_rows, width = rows2d.shape
    order = weight_ascending.shape[0]
    block = rows_per_block(num_rows, width)
    convert = rows2d.dtype != dtype
    out = torch.empty_like(rows2d, memory_format=torch.contiguous_format)
    inverse_rms = torch.empty((num_rows, order), dtype=dtype, device=rows2d.device)

    def workspace():
        def buffer():
            return torch.empty((block, width), dtype=dtype)

        return (buffer() if convert else None, buffer(), buffer() if order > 1 else None, buffer() if convert and order > 1 else None)

    def process(start, stop, work):
        x_work, square_work, power_work, acc_work = work
        size = stop - start
        x = rows2d[start:stop]
        if convert:
            x = x_work[:size].copy_(x)
        # statistics: sum(x^2), sum(x^4), ..., one streaming pass over the block
        square = torch.mul(x, x, out=square_work[:size])
        sums: List[torch.Tensor] = [square.sum(-1)]
        if order > 1:
            power = torch.mul(square, square, out=power_work[:size])
            sums.append(power.sum(-1))
            for _ in range(2, order):
                sums.append(power.mul_(square).sum(-1))
        block_inverse_rms = torch.rsqrt(torch.stack(sums, -1).mul_(1.0 / width).add_(eps))
        inverse_rms[start:stop] = block_inverse_rms
        coefficients = block_inverse_rms * weight_ascending
        # y = b + x * (c_1 + x * (c_2 + ...)); the last step writes (and casts) the output
        target = out[start:stop]
        if order == 1:
            acc = coefficients[:, 0:1]
        else:
            acc = acc_work[:size] if convert else target
            _horner_into(acc, x, coefficients)
        if bias is None:
            torch.mul(acc, x, out=target)
        else:
            torch.addcmul(bias, acc, x, out=target)

    for_each_block(num_rows, block, workspace, process)
    return out, inverse_rms


def _backward_blocked(rows2d, grad2d, inverse_rms, weight_ascending, need_input_grad, dtype):
    num_rows, width = rows2d.shape
    order = weight_ascending.shape[0]
    block = rows_per_block(num_rows, width)
    convert_x = rows2d.dtype != dtype
    convert_grad = grad2d.dtype != dtype
    grad_dot_powers = torch.empty_like(inverse_rms)
    grad_input = torch.empty_like(rows2d, memory_format=torch.contiguous_format) if need_input_grad else None
    two_buffers = need_input_grad and order > 1

    def workspace():
        def buffer():
            return torch.empty((block, width), dtype=dtype)

        return (
            buffer() if convert_x else None,
            buffer() if convert_grad else None,
            buffer(),
            buffer() if two_buffers else None,
            buffer() if two_buffers else None,
        )

    def process(start, stop, work):
        x_work, grad_work, moment_work, slope_work, correction_work = work
        size = stop - start
        x = rows2d[start:stop]
        if convert_x:
            x = x_work[:size].copy_(x)
        grad = grad2d[start:stop]
        if convert_grad:
            grad = grad_work[:size].copy_(grad)
        # S_k = sum(g x^k): one streaming pass
        moment = torch.mul(grad, x, out=moment_work[:size])
        sums: List[torch.Tensor] = [moment.sum(-1)]
        for _ in range(1, order):
            sums.append(moment.mul_(x).sum(-1))
        block_dots = torch.stack(sums, -1)
        grad_dot_powers[start:stop] = block_dots
        if not need_input_grad:
            return
        k_times_c, d = _backward_coefficients(inverse_rms[start:stop], weight_ascending, block_dots, width)
        # dx = g * sum_k k c_k x^{k-1} - x * sum_k d_k x^{2k-2}
        if order == 1:
            scaled = torch.mul(grad, k_times_c, out=moment_work[:size])
            correction = d
        else:
            slope = slope_work[:size]
            _horner_into(slope, x, k_times_c)
            square = torch.mul(x, x, out=moment_work[:size])
            correction = correction_work[:size]
            _horner_into(correction, square, d)  # Horner in x^2
            scaled = slope.mul_(grad)
        torch.addcmul(scaled, x, correction, value=-1, out=grad_input[start:stop])

    for_each_block(num_rows, block, workspace, process)
    return grad_input, grad_dot_powers


# ---------------------------------------------------------------------------------------
# The autograd function
# ---------------------------------------------------------------------------------------


class PolyNormFunction(torch.autograd.Function):
    """Autograd function of :func:`poly_norm_fused`; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float):
        with no_autocast(x.device):
            return _poly_norm_forward(ctx, x, weight, bias, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        with no_autocast(grad_output.device):
            return _poly_norm_backward(ctx, grad_output)


def _poly_norm_forward(ctx, x, weight, bias, eps):
    order = weight.shape[0]
    width = x.shape[-1] if x.dim() > 0 else 1
    rows2d = x.reshape(math.prod(x.shape[:-1]), width)
    dtype = compute_dtype(x, weight, bias)
    weight_ascending = weight.to(dtype).flip(0)
    bias_c = None if bias is None else bias.to(dtype)
    ctx.shape = x.shape
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.bias_shape = None if bias is None else bias.shape
    if rows2d.numel() == 0:
        inverse_rms = torch.zeros((rows2d.shape[0], order), dtype=dtype, device=x.device)
        out = torch.empty_like(rows2d)
    elif use_blocked_eager(x.device):
        out, inverse_rms = _forward_blocked(rows2d, weight_ascending, bias_c, eps, dtype)
    else:
        y, inverse_rms = _forward_functional(rows2d.to(dtype), weight_ascending, bias_c, eps)
        out = y.to(x.dtype)
    ctx.save_for_backward(rows2d, inverse_rms, weight)
    return out.reshape(x.shape)


def _poly_norm_backward(ctx, grad_output):
    rows2d, inverse_rms, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_input = grad_weight = grad_bias = None
    dtype = inverse_rms.dtype
    grad2d = grad_output.reshape(rows2d.shape)
    if need_b:
        grad_bias = grad2d.sum(dtype=dtype).reshape(ctx.bias_shape).to(ctx.bias_dtype)
    if not (need_x or need_w):
        return grad_input, grad_weight, grad_bias, None
    weight_ascending = weight.to(dtype).flip(0)
    if rows2d.numel() == 0:
        grad_dot_powers = torch.zeros_like(inverse_rms)
        grad_input = torch.zeros_like(rows2d) if need_x else None
    elif use_blocked_eager(rows2d.device):
        grad_input, grad_dot_powers = _backward_blocked(rows2d, grad2d, inverse_rms, weight_ascending, need_x, dtype)
    else:
        grad_input, grad_dot_powers = _backward_functional(
            rows2d.to(dtype), grad2d.to(dtype), inverse_rms, weight_ascending, need_x
        )
        if need_x:
            grad_input = grad_input.to(rows2d.dtype)
    if need_w:
        # dw_k = sum over rows of n G_k / s_k = sum_rows S_k * (1/s_k)
        grad_weight = (grad_dot_powers * inverse_rms).sum(0).flip(0).to(weight.dtype)
    if need_x:
        grad_input = grad_input.reshape(ctx.shape)
    return grad_input, grad_weight, grad_bias, None


def poly_norm_fused(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    r"""PolyNorm(x) = sum_{k=1..r} weight[r-k] * N(x^k) + bias over the last dim, fused.

    Args:
        x: input of any shape (the last dim is normalised), any float dtype.
        weight: shape (r,), ``weight[0]`` multiplies the highest power (released layout).
        bias: shape (1,) or None.
        eps: added to mean(x^{2k}) inside the square root.

    Returns a tensor of ``x``'s shape and dtype. See the module docstring for the
    closed-form backward and the memory/precision guarantees.
    """
    if weight.dim() != 1 or weight.shape[0] < 1:
        raise ValueError(f"poly_norm weight must have shape (order,), order >= 1; got {tuple(weight.shape)}")
    return PolyNormFunction.apply(x, weight, bias, float(eps))
