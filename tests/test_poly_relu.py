"""PolyReLU: fused path vs the released formula, both against an fp64 ground truth."""

import io

import pytest
import torch

import polycom
from polycom.functional import poly_relu
from polycom.ops import _common
from polycom.ops.poly_relu import poly_relu_fused
from polycom.ops.reference import poly_relu_reference

from _numerics import (
    RELATIVE_TOLERANCE,
    assert_close,
    assert_no_worse_than_reference,
    forward_and_grads,
    saved_bytes,
)

LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("output", "grad x", "grad weight", "grad bias")


def _parameters(order, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.rand(order, generator=generator) + 0.2).to(dtype)
    bias = (torch.randn(1, generator=generator) * 0.5).to(dtype)
    return weight, bias


@pytest.mark.parametrize("path", ["blocks-default", "blocks-tiny", "functional"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_gradcheck_fp64(order, path, monkeypatch):
    if path == "blocks-tiny":
        monkeypatch.setattr(_common, "BLOCK_ELEMENTS", 7)
    if path == "functional":  # the form torch.compile traces, run eagerly
        monkeypatch.setattr(_common, "BLOCKED_EAGER", False)
    torch.manual_seed(order)
    # keep inputs away from relu's kink at 0, where finite differences are meaningless
    x = torch.randn(4, 9, dtype=torch.float64)
    x = (x + 0.1 * x.sign()).requires_grad_(True)
    weight = torch.randn(order, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(poly_relu_fused, (x, weight, bias))


SHAPES = [(64,), (6, 33), (3, 5, 40), (2, 3, 4, 21), (5, 123, 123)]


def _check_parity(shape, dtype, scale=1.0):
    torch.manual_seed(sum(shape))
    x = (torch.randn(shape) * scale).to(dtype)
    x.view(-1)[:3] = 0  # relu's kink: the gradient there is 0 on both paths
    g = torch.randn(shape).to(dtype)
    weight, bias = _parameters(3, dtype)
    truth = forward_and_grads(poly_relu_reference, (x.double(), weight.double(), bias.double()), g.double())
    fused = forward_and_grads(poly_relu_fused, (x, weight, bias), g)
    reference = forward_and_grads(poly_relu_reference, (x, weight, bias), g)
    for name, f, r, t in zip(NAMES, fused, reference, truth):
        assert f.dtype == dtype, f"{name} came back as {f.dtype}, expected {dtype}"
        assert_no_worse_than_reference(name, f, r, t, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity_against_fp64_truth(shape, dtype):
    _check_parity(shape, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(6, 33), (2, 3, 4, 21)], ids=str)
def test_parity_with_many_blocks(shape, dtype, monkeypatch):
    monkeypatch.setattr(_common, "BLOCK_ELEMENTS", 50)
    _check_parity(shape, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_parity_functional_path(dtype, monkeypatch):
    monkeypatch.setattr(_common, "BLOCKED_EAGER", False)
    _check_parity((3, 5, 40), dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(
    "make_view",
    [lambda base: base.transpose(-1, -2), lambda base: base[:, ::2], lambda base: base[1:-1, 3:]],
    ids=["transposed", "strided", "sliced"],
)
def test_non_contiguous_inputs(make_view, dtype):
    torch.manual_seed(1)
    base = torch.randn(40, 58).to(dtype)
    x = make_view(base)
    assert not x.is_contiguous()
    g = torch.randn(x.shape).to(dtype)
    weight, bias = _parameters(3, dtype)
    fused = forward_and_grads(lambda a, w, b: poly_relu_fused(make_view(a), w, b), (base, weight, bias), g)
    truth = forward_and_grads(poly_relu_reference, (x.double(), weight.double(), bias.double()), g.double())
    reference = forward_and_grads(poly_relu_reference, (x, weight, bias), g)
    truth_base_grad = torch.zeros(base.shape, dtype=torch.float64)
    make_view(truth_base_grad).copy_(truth[1])
    reference_base_grad = torch.zeros(base.shape, dtype=dtype)
    make_view(reference_base_grad).copy_(reference[1])
    assert_no_worse_than_reference("output", fused[0], reference[0], truth[0], dtype)
    assert_no_worse_than_reference("grad x", fused[1], reference_base_grad, truth_base_grad, dtype)
    for name, f, r, t in zip(NAMES[2:], fused[2:], reference[2:], truth[2:]):
        assert_no_worse_than_reference(name, f, r, t, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_all_zero_rows_give_the_bias(dtype):
    x = torch.zeros(3, 17).to(dtype)
    weight, bias = _parameters(3, dtype)
    fused = forward_and_grads(poly_relu_fused, (x, weight, bias), torch.ones(3, 17).to(dtype))
    assert torch.equal(fused[0], bias.expand(3, 17))
    assert torch.equal(fused[1], torch.zeros(3, 17, dtype=dtype)), "relu's gradient at 0 is 0"
    assert torch.equal(fused[2], torch.zeros(3, dtype=dtype))
    assert float(fused[3]) == 51.0


def test_zero_size_inputs():
    weight, bias = _parameters(3)
    for shape in [(0,), (0, 16), (4, 0)]:
        x = torch.randn(shape, requires_grad=True)
        w = weight.clone().requires_grad_(True)
        b = bias.clone().requires_grad_(True)
        y = poly_relu_fused(x, w, b)
        assert y.shape == x.shape and y.dtype == x.dtype
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(w.grad, torch.zeros(3)) and torch.equal(b.grad, torch.zeros(1))


def test_fp16_range_is_no_worse_than_the_released_formula():
    """relu(x)^3 > 65504 for x > ~40.3 (the released formula's intermediate overflows
    there); with weight 1/3 the output itself exceeds fp16 for x > ~58. The fused path
    computes in fp32, so it is finite wherever the true value fits in fp16."""
    x = torch.linspace(-100, 100, 4001).half()
    act = polycom.PolyReLU().half()
    weight, bias = act.weight.detach(), act.bias.detach()
    g = torch.ones_like(x)
    fused = forward_and_grads(poly_relu_fused, (x, weight, bias), g)
    reference = forward_and_grads(poly_relu_reference, (x, weight, bias), g)
    truth = forward_and_grads(poly_relu_reference, (x.double(), weight.double(), bias.double()), g.double())
    fp16_max = torch.finfo(torch.float16).max
    for name, f, r, t in zip(NAMES[:2], fused[:2], reference[:2], truth[:2]):
        fits = t.abs() < fp16_max * (1 - 2.0**-11)  # rounds to a finite fp16 value
        assert torch.isfinite(f[fits]).all(), f"fused {name} overflowed where the true value fits in fp16"
        assert (torch.isfinite(f) | ~torch.isfinite(r)).all(), f"fused {name} is inf where the released formula is finite"
        relative = ((f[fits].double() - t[fits]).abs() / t[fits].abs().clamp_min(1.0)).max()
        assert relative <= 2.0**-10, f"fused {name}: relative error {relative:.2e} where finite"
    output_finite = torch.isfinite(fused[0])
    released_finite = torch.isfinite(reference[0])
    # the documented thresholds
    assert bool(released_finite[x <= 40].all()) and not bool(released_finite[x >= 41].any())
    assert bool(output_finite[x <= 57.5].all()) and not bool(output_finite[x >= 58].any())


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_parameters_with_low_precision_input(input_dtype):
    torch.manual_seed(4)
    act = polycom.PolyReLU()
    with torch.no_grad():
        act.weight.copy_(torch.tensor([0.5, -0.3, 0.9]))
        act.bias.fill_(0.1)
    x = torch.randn(8, 64).to(input_dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = act(x)
    assert y.dtype == input_dtype
    g = torch.randn(8, 64).to(input_dtype)
    y.backward(g)
    assert x.grad.dtype == input_dtype and act.weight.grad.dtype == torch.float32 and act.bias.grad.dtype == torch.float32
    truth = forward_and_grads(
        poly_relu_reference, (x.detach().double(), act.weight.detach().double(), act.bias.detach().double()), g.double()
    )
    for name, value, t in zip(NAMES, (y, x.grad, act.weight.grad, act.bias.grad), truth):
        dtype = input_dtype if name in ("output", "grad x") else torch.float32
        assert_close(value, t, atol=float(t.abs().max()) * RELATIVE_TOLERANCE[dtype], name=name)


def test_skips_unneeded_gradients():
    torch.manual_seed(5)
    x = torch.randn(5, 30)
    weight, bias = _parameters(3)
    g = torch.randn(5, 30)
    full = forward_and_grads(poly_relu_fused, (x, weight, bias), g)
    only_x = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(poly_relu_fused(only_x, weight, bias), (only_x,), g)
    assert torch.equal(dx, full[1])
    only_w = weight.clone().requires_grad_(True)
    (dw,) = torch.autograd.grad(poly_relu_fused(x, only_w, bias), (only_w,), g)
    assert torch.equal(dw, full[2])
    assert_close(poly_relu_fused(x, weight, None), full[0] - bias, atol=1e-6, name="output without bias")


def test_functional_and_module_use_the_fused_path():
    x = torch.randn(4, 16)
    weight, bias = _parameters(3)
    assert torch.equal(poly_relu(x, weight, bias), poly_relu_fused(x, weight, bias))
    assert_close(poly_relu(x, weight, bias, fused=False), poly_relu_fused(x, weight, bias), atol=1e-5)
    assert polycom.PolyReLU()(x).grad_fn.name().startswith("PolyReLUFunction")


class ReleasedPolyReLU(torch.nn.Module):
    """Verbatim from the authors' release, ReLU in place of the norm."""

    def __init__(self):
        super().__init__()
        self.act_fn = torch.nn.ReLU()
        self.weight = torch.nn.Parameter(torch.ones(3) / 3)
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.weight[0] * self.act_fn(x) ** 3 + self.weight[1] * self.act_fn(x) ** 2 + self.weight[2] * self.act_fn(x) + self.bias


def test_released_state_dict_loads_and_matches():
    torch.manual_seed(7)
    released = ReleasedPolyReLU()
    with torch.no_grad():
        released.weight.copy_(torch.randn(3))
        released.bias.copy_(torch.randn(1))
    buffer = io.BytesIO()
    torch.save(released.state_dict(), buffer)
    buffer.seek(0)
    ours = polycom.PolyReLU()
    ours.load_state_dict(torch.load(buffer), strict=True)
    x = torch.randn(3, 7, 96, dtype=torch.float64)
    released, ours = released.double(), ours.double()
    assert_close(ours(x), released(x), atol=1e-12, name="PolyReLU(released state dict)")


def test_compile_fullgraph_parity():
    torch._dynamo.reset()
    torch.manual_seed(8)
    x = torch.randn(16, 48)
    weight, bias = _parameters(3)
    g = torch.randn(16, 48)
    compiled = torch.compile(poly_relu_fused, fullgraph=True)
    got = forward_and_grads(compiled, (x, weight, bias), g)
    expected = forward_and_grads(poly_relu_fused, (x, weight, bias), g)
    for name, a, e in zip(NAMES, got, expected):
        assert_close(a, e, atol=2e-5 * max(1.0, float(e.abs().max())), name=f"compiled {name}")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_saved_for_backward_bytes(dtype):
    """Fused: the input only (<= 1.1x). Naive released formula: relu, relu^2, relu^3 (~3x)."""
    x = torch.randn(256, 1024).to(dtype).requires_grad_(True)
    weight, bias = (t.requires_grad_(True) for t in _parameters(3, dtype))
    input_bytes = x.numel() * x.element_size()
    fused = saved_bytes(lambda: poly_relu_fused(x, weight, bias)) / input_bytes
    naive = saved_bytes(lambda: poly_relu_reference(x, weight, bias)) / input_bytes
    assert fused <= 1.1, f"fused PolyReLU saves {fused:.3f}x the input for backward (target <= 1.1x)"
    assert naive > 2.5, f"the naive formula saves {naive:.2f}x"
