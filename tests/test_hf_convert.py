"""polycom.hf.convert on tiny random models of every supported family.

Each case: convert, forward, backward (coefficient gradients), a few optimiser steps
(loss falls), save_pretrained + load_converted with identical outputs, generation.
"""

import pytest
import torch
from torch import nn

import polycom.hf as ph
from polycom import PolyCom, PolyNorm
from polycom.errors import UserError
from polycom.hf.tiny import ALL, DENSE, MOE, tiny_model, tokens


pytestmark = pytest.mark.usefixtures("one_thread")

# Every family through the whole cycle, in both placements; MoE families also per expert.
CASES = [(f, "gated", "shared") for f in ALL] + [(f, "paper", "shared") for f in ALL] + \
        [(f, "gated", "per_expert") for f in MOE] + [(f, "paper", "per_expert") for f in MOE]


def _polycoms(model):
    return [m for m in model.modules() if isinstance(m, PolyCom)]


@pytest.mark.parametrize("family,ffn,coefficients", CASES, ids=[f"{f}-{p}-{c}" for f, p, c in CASES])
def test_convert_train_save_reload_generate(tmp_path, family, ffn, coefficients):
    model = tiny_model(family)
    x = tokens(2, 12)
    with torch.no_grad():
        before = model(x).logits
    report = ph.convert(model, activation="polynorm", ffn=ffn, coefficients=coefficients)

    acts = _polycoms(model)
    layers = model.config.num_hidden_layers
    experts = getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", 0) or 0
    shared_expert = 1 if family == "qwen2_moe" else 0
    expected = layers * ((experts if coefficients == "per_expert" else 1) + shared_expert)
    assert len(acts) == expected == report.polycom_modules
    assert len({id(a.weight) for a in acts}) == len(acts), "every FFN (expert) needs its own coefficients"
    assert all(isinstance(a, PolyNorm) for a in acts)
    assert report.params_after - report.params_before == (
        report.ffn_params_after - report.ffn_params_before), "only FFN parameters may change"
    if ffn == "paper" and family not in ("gpt2", "gpt_neox"):
        # parameter-matched: the plain FFN is 3/2 as wide as the gated one
        assert report.ffn_params_after - 4 * expected == report.ffn_params_before
    if ffn == "gated" or family in ("gpt2", "gpt_neox"):
        assert report.ffn_params_after == report.ffn_params_before + 4 * expected

    with torch.no_grad():
        swapped = model(x).logits
    assert torch.isfinite(swapped).all() and not torch.allclose(swapped, before)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(3):
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert any(a.weight.grad is not None and a.weight.grad.abs().sum() > 0 for a in acts)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    model.eval()

    model.save_pretrained(tmp_path)
    reloaded = ph.load_converted(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=0)
    for a, b in zip(_polycoms(model), _polycoms(reloaded)):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    out = reloaded.generate(x[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_gated_shared_reloads_with_plain_from_pretrained(tmp_path, family):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    ph.convert(model, "polyrelu")
    with torch.no_grad():
        for a in _polycoms(model):
            a.weight.add_(torch.randn(3) * 0.1)
    model.save_pretrained(tmp_path)
    assert model.config.polycom["reload_with"] == "AutoModelForCausalLM.from_pretrained"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_paper_width_is_three_halves():
    model = tiny_model("llama")
    report = ph.convert(model, ffn="paper")
    assert report.ffn_hidden_size == 72  # 3/2 of 48
    assert model.config.polycom["ffn_hidden_size"] == 72 and model.config.hidden_act == "polynorm"
    assert isinstance(model.model.layers[0].mlp, ph.PlainFFN)
    assert ph.matched_ffn_hidden_size(2048, 5504, gated=True) == 8256  # the paper's dense 1B


def test_per_expert_coefficients_are_independent():
    model = tiny_model("mixtral")
    ph.convert(model, coefficients="per_expert")
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, ph.PolyComExperts) and experts.per_expert
    with torch.no_grad():
        experts.act_fn[1].weight.fill_(0.7)
    assert torch.allclose(experts.act_fn[0].weight, torch.full((3,), 1 / 3))
    keys = [k for k in model.state_dict() if "experts.act_fn" in k]
    assert len(keys) == 2 * 4 * 2  # layers x experts x (weight, bias)


def test_bad_inputs_raise_one_clear_user_error():
    with pytest.raises(UserError, match="registered: .*polynorm"):
        ph.convert(tiny_model("llama"), activation="swishglu")
    with pytest.raises(UserError, match="ffn must be one of"):
        ph.convert(tiny_model("llama"), ffn="sideways")
    with pytest.raises(UserError, match="per_expert.*mixture-of-experts"):
        ph.convert(tiny_model("llama"), coefficients="per_expert")
    model = tiny_model("qwen2")
    ph.convert(model)
    with pytest.raises(UserError, match="already converted"):
        ph.convert(model)

    class NoMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UserError, match="supported families: Llama, .*Mixtral"):
        ph.convert(NoMLP())


def test_unsupported_family_is_rejected():
    from transformers import AutoModelForCausalLM, BloomConfig

    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(UserError, match="no MLP this converter knows.*supported families"):
        ph.convert(bloom)


@pytest.mark.parametrize("family", DENSE[:1])
def test_conversion_keeps_dtype(family):
    model = tiny_model(family).to(torch.bfloat16)
    ph.convert(model)
    assert all(a.weight.dtype == torch.bfloat16 for a in _polycoms(model))
    with torch.no_grad():
        assert torch.isfinite(model(tokens()).logits.float()).all()
