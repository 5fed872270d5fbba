"""polycom.hf.register(): hidden_act="polynorm" builds, trains, saves and reloads with transformers."""

import pytest
import torch

import polycom.hf  # noqa: F401  (registers on import)
from polycom import PolyNorm, PolyReLU
from polycom.hf.tiny import tiny_config, tokens


pytestmark = pytest.mark.usefixtures("one_thread")


def test_import_registers_names_in_both_tables():
    from transformers.activations import ACT2CLS, ACT2FN

    for name in ("polynorm", "polyrelu", "relu2"):
        assert name in ACT2CLS and name in ACT2FN
    first, second = ACT2FN["polynorm"], ACT2FN["polynorm"]
    assert isinstance(first, PolyNorm) and first is not second, "every lookup must build a fresh module"
    assert isinstance(ACT2FN["polyrelu"], PolyReLU)


@pytest.mark.parametrize("act,cls", [("polynorm", PolyNorm), ("polyrelu", PolyReLU)])
def test_config_builds_per_layer_coefficients_in_state_dict(act, cls):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.hidden_act = act
    model = AutoModelForCausalLM.from_config(config)
    acts = [layer.mlp.act_fn for layer in model.model.layers]
    assert all(isinstance(a, cls) for a in acts)
    assert len({id(a) for a in acts}) == len(acts) and len({id(a.weight) for a in acts}) == len(acts)
    state = model.state_dict()
    for i in range(config.num_hidden_layers):
        assert state[f"model.layers.{i}.mlp.act_fn.weight"].shape == (3,)
        assert state[f"model.layers.{i}.mlp.act_fn.bias"].shape == (1,)
        torch.testing.assert_close(state[f"model.layers.{i}.mlp.act_fn.weight"], torch.full((3,), 1 / 3))


def test_train_save_reload_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.hidden_act = "polynorm"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    x = tokens(4, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        assert model.model.layers[0].mlp.act_fn.weight.grad is not None
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    coeffs = model.model.layers[1].mlp.act_fn.weight.detach().clone()
    assert not torch.allclose(coeffs, torch.full((3,), 1 / 3)), "coefficients did not train"
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.model.layers[1].mlp.act_fn, PolyNorm)
    torch.testing.assert_close(reloaded.model.layers[1].mlp.act_fn.weight, coeffs, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=0)
    generated = reloaded.generate(x[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)


def test_missing_coefficients_get_released_init(tmp_path):
    """A SiLU checkpoint loaded with hidden_act="polynorm": coefficients are absent from the
    file and must get 1/r and 0, not uninitialised memory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, hidden_act="polynorm")
    for layer in model.model.layers:
        torch.testing.assert_close(layer.mlp.act_fn.weight.detach(), torch.full((3,), 1 / 3))
        torch.testing.assert_close(layer.mlp.act_fn.bias.detach(), torch.zeros(1))


def test_register_is_idempotent():
    from transformers.modeling_utils import PreTrainedModel

    before = PreTrainedModel._init_weights
    polycom.hf.register()
    polycom.hf.register()
    assert PreTrainedModel._init_weights is before
