"""PolyNorm: fused path vs the released formula, both against an fp64 ground truth."""

import io

import pytest
import torch

import polycom
from polycom.functional import poly_norm
from polycom.ops import _common
from polycom.ops.poly_norm import poly_norm_fused
from polycom.ops.reference import poly_norm_reference

from _numerics import (
    assert_close,
    assert_no_worse_than_reference,
    forward_and_grads,
    largest_difference,
    saved_bytes,
)

EPS = 1e-6
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("output", "grad x", "grad weight", "grad bias")


def _parameters(order, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.rand(order, generator=generator) + 0.2).to(dtype)
    bias = (torch.randn(1, generator=generator) * 0.5).to(dtype)
    return weight, bias


@pytest.fixture(params=["default", "tiny", "tiny-serial", "functional"], ids=["blocks-default", "blocks-tiny", "blocks-tiny-serial", "functional"])
def block_elements(request, monkeypatch):
    """Run the blocked eager CPU kernels with their normal block size and with blocks of a
    few rows (the multi-block loop and its last, partial block), and the functional form
    that torch.compile and other devices use, in eager mode."""
    if request.param.startswith("tiny"):
        monkeypatch.setattr(_common, "BLOCK_ELEMENTS", 300)
        monkeypatch.setattr(_common, "BLOCK_THREADS", 1 if request.param == "tiny-serial" else 2)
    if request.param == "functional":
        monkeypatch.setattr(_common, "BLOCKED_EAGER", False)
    return request.param


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_gradcheck_fp64(order, block_elements):
    torch.manual_seed(order)
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(order, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, b: poly_norm_fused(a, w, b, EPS), (x, weight, bias))


@pytest.mark.parametrize("order", [1, 3, 4])
def test_matches_fp64_reference_exactly(order, block_elements):
    torch.manual_seed(0)
    x = torch.randn(7, 50, dtype=torch.float64)
    weight, bias = (t.double() for t in _parameters(order))
    g = torch.randn(7, 50, dtype=torch.float64)
    fused = forward_and_grads(poly_norm_fused, (x, weight, bias), g, eps=EPS)
    reference = forward_and_grads(poly_norm_reference, (x, weight, bias), g, eps=EPS)
    for name, a, e in zip(NAMES, fused, reference):
        assert_close(a, e, atol=1e-10 * max(1.0, float(e.abs().max())), name=name)


SHAPES = [(64,), (6, 33), (3, 5, 40), (2, 3, 4, 21), (5, 123, 123)]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity_against_fp64_truth(shape, dtype):
    _check_parity(shape, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("shape", [(6, 33), (2, 3, 4, 21)], ids=str)
def test_parity_with_many_blocks(shape, dtype, monkeypatch):
    """Blocks of a few rows: the eager loop, including its last partial block."""
    monkeypatch.setattr(_common, "BLOCK_ELEMENTS", 100)
    _check_parity(shape, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_parity_functional_path(dtype, monkeypatch):
    """The functional form (what torch.compile traces) in eager mode."""
    monkeypatch.setattr(_common, "BLOCKED_EAGER", False)
    _check_parity((3, 5, 40), dtype)


def _check_parity(shape, dtype):
    torch.manual_seed(sum(shape))
    x = torch.randn(shape).to(dtype)
    g = torch.randn(shape).to(dtype)
    weight, bias = _parameters(3, dtype)
    truth = forward_and_grads(poly_norm_reference, (x.double(), weight.double(), bias.double()), g.double(), eps=EPS)
    fused = forward_and_grads(poly_norm_fused, (x, weight, bias), g, eps=EPS)
    reference = forward_and_grads(poly_norm_reference, (x, weight, bias), g, eps=EPS)
    for name, f, r, t in zip(NAMES, fused, reference, truth):
        assert f.dtype == dtype, f"{name} came back as {f.dtype}, expected {dtype}"
        assert_no_worse_than_reference(name, f, r, t, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(
    "make_view",
    [
        lambda base: base.transpose(-1, -2),  # last dim strided
        lambda base: base[:, ::2],  # every other column
        lambda base: base[1:-1, 3:],  # sliced rows and columns
    ],
    ids=["transposed", "strided", "sliced"],
)
def test_non_contiguous_inputs(make_view, dtype):
    torch.manual_seed(1)
    base = torch.randn(40, 58).to(dtype)
    x = make_view(base)
    assert not x.is_contiguous()
    g = torch.randn(x.shape).to(dtype)
    weight, bias = _parameters(3, dtype)
    truth = forward_and_grads(poly_norm_reference, (x.double(), weight.double(), bias.double()), g.double(), eps=EPS)
    fused = forward_and_grads(lambda a, w, b: poly_norm_fused(make_view(a), w, b, EPS), (base, weight, bias), g)
    reference = forward_and_grads(poly_norm_reference, (x, weight, bias), g, eps=EPS)
    truth_base_grad = torch.zeros(base.shape, dtype=torch.float64)
    make_view(truth_base_grad).copy_(truth[1])
    reference_base_grad = torch.zeros(base.shape, dtype=dtype)
    make_view(reference_base_grad).copy_(reference[1])
    assert_no_worse_than_reference("output", fused[0], reference[0], truth[0], dtype)
    assert_no_worse_than_reference("grad x", fused[1], reference_base_grad, truth_base_grad, dtype)
    for name, f, r, t in zip(NAMES[2:], fused[2:], reference[2:], truth[2:]):
        assert_no_worse_than_reference(name, f, r, t, dtype)


@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float64], ids=str)
def test_all_zero_rows(dtype, block_elements):
    torch.manual_seed(2)
    x = torch.randn(6, 40).to(dtype)
    x[1] = 0
    x[4] = 0
    g = torch.randn(6, 40).to(dtype)
    weight, bias = _parameters(3, dtype)
    truth = forward_and_grads(poly_norm_reference, (x.double(), weight.double(), bias.double()), g.double(), eps=EPS)
    fused = forward_and_grads(poly_norm_fused, (x, weight, bias), g, eps=EPS)
    for value in fused:
        assert torch.isfinite(value).all()
    # a zero row maps to the bias, and its input gradient is g * weight[-1] / sqrt(eps)
    assert torch.equal(fused[0][1], torch.full((40,), float(bias), dtype=dtype))
    for name, f, t in zip(NAMES, fused, truth):
        scale = float(t.abs().max())
        assert_close(f, t, atol=scale * 2 * _tolerance(dtype), name=name)


def _tolerance(dtype):
    from _numerics import RELATIVE_TOLERANCE

    return RELATIVE_TOLERANCE[dtype]


def test_zero_size_inputs():
    weight, bias = _parameters(3)
    for shape in [(0, 16), (4, 0), (2, 0, 8)]:
        x = torch.randn(shape, requires_grad=True)
        w = weight.clone().requires_grad_(True)
        b = bias.clone().requires_grad_(True)
        y = poly_norm_fused(x, w, b, EPS)
        assert y.shape == x.shape and y.dtype == x.dtype
        y.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(w.grad, torch.zeros(3)) and torch.equal(b.grad, torch.zeros(1))


def test_fp16_large_magnitudes_stay_finite():
    """|x| up to 1e3 in fp16: x^6 ~ 1e18 overflows fp16 but not the fp32 statistics."""
    torch.manual_seed(3)
    x = ((torch.rand(16, 256) * 2 - 1) * 1e3).half()
    x[0, 0] = 1000.0
    x[3] = 0
    g = torch.randn(16, 256).half()
    weight, bias = _parameters(3, torch.float16)
    fused = forward_and_grads(poly_norm_fused, (x, weight, bias), g, eps=EPS)
    truth = forward_and_grads(poly_norm_reference, (x.double(), weight.double(), bias.double()), g.double(), eps=EPS)
    naive_output = poly_norm_reference(x, weight, bias, EPS)
    assert not torch.isfinite(naive_output).all(), "the released formula in fp16 overflows here (x^3 > 65504)"
    for name, f, t in zip(NAMES, fused, truth):
        assert torch.isfinite(f).all(), f"{name} is not finite"
        scale = float(t.abs().max())
        assert_close(f, t, atol=scale * _tolerance(torch.float16), name=name)


@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_parameters_with_low_precision_input(input_dtype):
    """Mixed precision (autocast keeps fp32 parameters): output in the input's dtype,
    each gradient in the dtype of the tensor it belongs to."""
    torch.manual_seed(4)
    act = polycom.PolyNorm()
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
        poly_norm_reference, (x.detach().double(), act.weight.detach().double(), act.bias.detach().double()), g.double(), eps=EPS
    )
    for name, value, t in zip(NAMES, (y, x.grad, act.weight.grad, act.bias.grad), truth):
        dtype = input_dtype if name in ("output", "grad x") else torch.float32
        assert_close(value, t, atol=float(t.abs().max()) * _tolerance(dtype), name=name)


def test_skips_unneeded_gradients():
    torch.manual_seed(5)
    x = torch.randn(5, 30)
    weight, bias = _parameters(3)
    g = torch.randn(5, 30)
    full = forward_and_grads(poly_norm_fused, (x, weight, bias), g, eps=EPS)
    only_x = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(poly_norm_fused(only_x, weight, bias, EPS), (only_x,), g)
    assert torch.equal(dx, full[1])
    only_w = weight.clone().requires_grad_(True)
    (dw,) = torch.autograd.grad(poly_norm_fused(x, only_w, bias, EPS), (only_w,), g)
    assert torch.equal(dw, full[2])
    y = poly_norm_fused(x, weight, None, EPS)
    assert_close(y, full[0] - bias, atol=1e-6, name="output without bias")


def test_double_backward_is_refused():
    x = torch.randn(3, 8, requires_grad=True)
    weight, bias = _parameters(3)
    (dx,) = torch.autograd.grad(poly_norm_fused(x, weight, bias, EPS).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        dx.sum().backward()


def test_functional_and_module_use_the_fused_path():
    torch.manual_seed(6)
    x = torch.randn(4, 16)
    weight, bias = _parameters(3)
    assert torch.equal(poly_norm(x, weight, bias), poly_norm_fused(x, weight, bias, EPS))
    assert_close(poly_norm(x, weight, bias, fused=False), poly_norm_fused(x, weight, bias, EPS), atol=1e-5)
    act = polycom.PolyNorm()
    assert act(x).grad_fn.name().startswith("PolyNormFunction")


class ReleasedPolyNorm(torch.nn.Module):
    """Verbatim from the authors' release (Megatron patch)."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3) / 3)
        self.bias = torch.nn.Parameter(torch.zeros(1))
        self.eps = eps

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self.weight[0] * self._norm(x**3) + self.weight[1] * self._norm(x**2) + self.weight[2] * self._norm(x) + self.bias


def test_released_state_dict_loads_and_matches():
    torch.manual_seed(7)
    released = ReleasedPolyNorm()
    with torch.no_grad():
        released.weight.copy_(torch.randn(3))
        released.bias.copy_(torch.randn(1))
    buffer = io.BytesIO()
    torch.save(released.state_dict(), buffer)
    buffer.seek(0)
    ours = polycom.PolyNorm()
    ours.load_state_dict(torch.load(buffer), strict=True)
    x = torch.randn(3, 7, 96, dtype=torch.float64)
    released, ours = released.double(), ours.double()
    assert_close(ours(x), released(x), atol=1e-12, name="PolyNorm(released state dict)")


def test_compile_fullgraph_parity():
    """torch.compile(fullgraph=True) raises on any graph break; parity with eager."""
    torch._dynamo.reset()
    torch.manual_seed(8)
    x = torch.randn(16, 48)
    weight, bias = _parameters(3)
    g = torch.randn(16, 48)
    compiled = torch.compile(lambda a, w, b: poly_norm_fused(a, w, b, EPS), fullgraph=True)
    got = forward_and_grads(compiled, (x, weight, bias), g)
    expected = forward_and_grads(poly_norm_fused, (x, weight, bias), g, eps=EPS)
    for name, a, e in zip(NAMES, got, expected):
        assert_close(a, e, atol=2e-5 * max(1.0, float(e.abs().max())), name=f"compiled {name}")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_saved_for_backward_bytes(dtype):
    """Fused: the input plus r fp32 values per row (<= 1.1x). Naive released formula: ~6x."""
    x = torch.randn(256, 1024).to(dtype).requires_grad_(True)
    weight, bias = (t.requires_grad_(True) for t in _parameters(3, dtype))
    input_bytes = x.numel() * x.element_size()
    fused = saved_bytes(lambda: poly_norm_fused(x, weight, bias, EPS)) / input_bytes
    naive = saved_bytes(lambda: poly_norm_reference(x, weight, bias, EPS)) / input_bytes
    assert fused <= 1.1, f"fused PolyNorm saves {fused:.3f}x the input for backward (target <= 1.1x)"
    assert naive > 4.0, f"the naive formula saves {naive:.2f}x (documented ~6x)"


@pytest.mark.parametrize("make", [polycom.PolyNorm, polycom.PolyReLU])
def test_inference_mode_with_pool_threads(make, monkeypatch):
    # The eager kernels write from pool threads; those must run in the caller's inference mode.
    monkeypatch.setattr(_common, "BLOCK_THREADS", 2)
    monkeypatch.setattr(_common, "BLOCK_ELEMENTS", 1 << 10)
    torch.manual_seed(0)
    act = make()
    x = torch.randn(64, 96)
    with torch.no_grad():
        reference = (poly_norm_reference(x, act.weight, act.bias) if isinstance(act, polycom.PolyNorm)
                     else polycom.functional.poly_relu(x, act.weight, act.bias, fused=False))
    with torch.inference_mode():
        out = act(x)
    assert torch.allclose(out, reference, atol=1e-5, rtol=1e-5)
