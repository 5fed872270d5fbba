import pytest
import torch

from polycom import PolyCom, PolyNorm, PolyReLU, get_activation, list_activations, register_activation


def test_released_layout_and_init():
    for cls in (PolyNorm, PolyReLU):
        act = cls()
        assert act.weight.shape == (3,) and act.bias.shape == (1,)
        assert torch.allclose(act.weight, torch.full((3,), 1 / 3)) and act.bias.item() == 0.0
        assert all(p.dim() >= 1 for p in act.parameters()), "0-d parameters break FSDP2"


def test_registry_knows_baselines_and_rejects_unknown():
    for name in ("relu", "gelu", "gelu_tanh", "silu", "relu2", "swiglu", "geglu", "polyrelu", "polynorm"):
        assert name in list_activations()
    with pytest.raises(ValueError, match="known: .*polynorm"):
        get_activation("nope")
    gate, up = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(get_activation("swiglu")(gate, up), torch.nn.functional.silu(gate) * up)


def test_register_user_activation():
    register_activation("my_tanh_test", lambda: torch.nn.Tanh(), overwrite=True)
    x = torch.randn(3)
    assert torch.allclose(get_activation("MY_TANH_TEST")(x), torch.tanh(x))


@pytest.mark.parametrize("composition", ["type1", "type2"])
@pytest.mark.parametrize("inner", ["relu", "identity", "sigmoid", "silu", "norm"])
def test_polycom_generic_matches_definition(inner, composition):
    torch.manual_seed(0)
    act = PolyCom(order=4, inner=inner, composition=composition).double()
    with torch.no_grad():
        act.weight.copy_(torch.randn(4))
        act.bias.fill_(0.3)
    x = torch.randn(5, 7, dtype=torch.float64)
    rho = {
        "relu": torch.relu,
        "identity": lambda z: z,
        "sigmoid": torch.sigmoid,
        "silu": torch.nn.functional.silu,
        "norm": lambda z: z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6),
    }[inner]
    expected = torch.full_like(x, 0.3)
    for i in range(1, 5):
        a_i = act.weight[4 - i]
        expected = expected + a_i * (rho(x) ** i if composition == "type1" else rho(x**i))
    assert torch.allclose(act(x), expected, atol=1e-10)
