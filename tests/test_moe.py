import math

import pytest
import torch

from polycom import PolyCom
from polycom.config import ModelConfig
from polycom.model import Transformer
from polycom.model.moe import MoEFeedForward

torch.set_num_threads(1)


def moe_config(**kw):
    base = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, activation="polynorm", n_experts=4, top_k=2)
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def reference_moe(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token loop: the obvious definition the batched dispatch must equal."""
    flat = x.reshape(-1, x.shape[-1])
    probs = moe.router(flat).float().softmax(-1)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        weights, experts = probs[t].topk(moe.top_k)
        if moe.normalize_top_k:
            weights = weights / weights.sum()
        for w, e in zip(weights, experts):
            out[t] += w * moe.experts[int(e)](flat[t : t + 1], moe.activation)[0]
    return out.reshape(x.shape)


@pytest.mark.parametrize("kw", [dict(), dict(moe_polycom_coeffs="per_expert"), dict(activation="swiglu", moe_normalize_top_k=True), dict(top_k=1, n_experts=3)])
def test_dispatch_equals_token_loop(kw):
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config(**kw))
    x = torch.randn(3, 7, 16)
    out, aux = moe(x)
    assert torch.allclose(out, reference_moe(moe, x), atol=1e-5)
    counts = moe.last_expert_counts
    assert int(counts.sum()) == 21 * moe.top_k and counts.shape == (moe.n_experts,)


def test_aux_losses_formulas():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config(moe_load_balance_weight=0.01, moe_z_loss_weight=0.001))
    x = torch.randn(50, 16)
    out, aux = moe(x)
    logits = moe.router(x).float()
    probs = logits.softmax(-1)
    top = probs.topk(2, dim=-1).indices
    fraction = torch.bincount(top.reshape(-1), minlength=4).float() / top.numel()
    lb = 4 * (fraction * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    assert torch.allclose(moe.last_load_balance_loss, lb) and torch.allclose(moe.last_z_loss, z)
    assert torch.allclose(aux, 0.01 * lb + 0.001 * z)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform router: balance loss exactly 1, z-loss (log E)^2
    _, aux = moe(x)
    assert moe.last_load_balance_loss.item() == pytest.approx(1.0)
    assert moe.last_z_loss.item() == pytest.approx(math.log(4) ** 2)


def test_aux_loss_in_model_and_router_gets_gradient():
    torch.manual_seed(0)
    model = Transformer(moe_config())
    x = torch.randint(0, 64, (2, 9))
    out = model(x, targets=x)
    assert out.aux_loss.item() > 0 and torch.allclose(out.loss, out.lm_loss + out.aux_loss)
    assert out.load_balance_loss.item() >= 2 * 0.99  # two layers, each >= ~1
    out.aux_loss.backward()  # the auxiliary losses alone must train the router
    assert model.blocks[0].ffn.router.weight.grad.abs().sum() > 0


def test_polycom_coefficients_shared_or_per_expert():
    shared = Transformer(moe_config())
    per_expert = Transformer(moe_config(moe_polycom_coeffs="per_expert"))
    assert sum(isinstance(m, PolyCom) for m in shared.blocks[0].ffn.modules()) == 1
    assert sum(isinstance(m, PolyCom) for m in per_expert.blocks[0].ffn.modules()) == 4
    assert per_expert.num_parameters() - shared.num_parameters() == 2 * 3 * 4  # 2 layers x 3 extra sets x (r+1)


def test_moe_learns_a_simple_task():
    torch.manual_seed(0)
    model = Transformer(moe_config(vocab_size=16, activation="swiglu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.arange(16).repeat(4, 1)[:, :15]
    y = (x + 1) % 16
    first = None
    for _ in range(40):
        out = model(x, targets=y)
        first = first if first is not None else out.lm_loss.item()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.lm_loss.item() < 0.3 * first
