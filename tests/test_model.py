import math

import pytest
import torch
from torch import nn

from polycom import PolyCom, PolyNorm
from polycom.config import ACTIVATIONS, ModelConfig, load_config
from polycom.model import Transformer, count_parameters, model_flops_per_token
from polycom.model.ffn import FeedForward
from polycom.training.optim import LRSchedule, parameter_groups
from polycom.config import TrainConfig

torch.set_num_threads(1)


def small(**kw):
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, **kw)
    cfg.validate()
    return cfg


def test_forward_loss_and_hidden_states():
    torch.manual_seed(0)
    model = Transformer(small(activation="polynorm"))
    x = torch.randint(0, 97, (3, 11))
    out = model(x, targets=x, output_hidden_states=True)
    assert out.logits.shape == (3, 11, 97)
    assert abs(out.lm_loss.item() - math.log(97)) < 0.3  # near-uniform at init
    assert torch.equal(out.loss, out.lm_loss + out.aux_loss) and out.aux_loss.item() == 0.0
    assert len(out.hidden_states) == 3 and torch.equal(out.hidden_states[-1], out.hidden_states[-1])
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_causal():
    torch.manual_seed(0)
    model = Transformer(small(activation="swiglu"))
    x = torch.randint(0, 97, (1, 10))
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % 97
    a, b = model(x).logits, model(y).logits
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6) and not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("kw", [dict(activation="polynorm"), dict(activation="swiglu", n_kv_heads=2, qk_norm=True),
                                dict(activation="polyrelu", n_experts=4, top_k=2)])
def test_kv_cache_matches_full_forward_and_generate(kw):
    torch.manual_seed(0)
    model = Transformer(small(**kw)).eval()
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(x).logits
        first = model(x[:, :5], use_cache=True)
        chunk = model(x[:, 5:9], kv_cache=first.kv_cache)  # a chunk after a cache (explicit mask)
        one = model(x[:, 9:10], kv_cache=chunk.kv_cache)
    assert torch.allclose(full[:, 5:9], chunk.logits, atol=1e-5)
    assert torch.allclose(full[:, 9], one.logits[:, 0], atol=1e-5)
    generated = model.generate(x[:, :4], max_new_tokens=6)
    seq = x[:, :4]
    for _ in range(6):  # greedy without a cache
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq)


def test_ffn_kinds_and_no_biases():
    plain = Transformer(small(activation="polynorm"))
    gated = Transformer(small(activation="swiglu"))
    gated_poly = Transformer(small(activation="polynorm", ffn="gated"))
    ffn = plain.blocks[0].ffn
    assert isinstance(ffn, FeedForward) and ffn.kind == "plain" and not hasattr(ffn, "gate") and isinstance(ffn.act, PolyNorm)
    assert gated.blocks[1].ffn.kind == "gated" and isinstance(gated.blocks[1].ffn.gate, nn.Linear)
    g = gated_poly.blocks[0].ffn
    assert g.kind == "gated" and isinstance(g.act, PolyNorm)
    x = torch.randn(2, 5, 32)
    assert torch.allclose(g(x), g.down(g.act(g.gate(x)) * g.up(x)))
    assert sum(isinstance(m, PolyCom) for m in plain.modules()) == 2
    for model in (plain, gated, gated_poly):
        assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))


def test_init_std_and_tied_embeddings():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=500, d_model=128, n_layers=2, n_heads=4, init_std=0.014, tie_embeddings=True)
    model = Transformer(cfg)
    assert abs(model.blocks[0].attn.wq.weight.std().item() - 0.014) < 0.001
    assert abs(model.blocks[0].attn.wo.weight.std().item() - 0.014 / 2) < 0.001  # 1/sqrt(2 n_layers)
    assert model.lm_head.weight is model.tok_embeddings.weight
    assert model.num_parameters() == count_parameters(cfg)["total"]


CONFIGS = [
    dict(activation="swiglu"), dict(activation="polynorm"), dict(activation="polynorm", ffn="gated"),
    dict(activation="gelu", tie_embeddings=True), dict(activation="relu2", qk_norm=True, n_kv_heads=2),
    dict(activation="polynorm", n_experts=4, top_k=2), dict(activation="polyrelu", n_experts=3, top_k=1, moe_polycom_coeffs="per_expert"),
    dict(activation="swiglu", n_experts=4, top_k=2, ffn_hidden_size=48),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_count_parameters_is_exact(kw):
    cfg = small(**kw)
    model = Transformer(cfg)
    counts = count_parameters(cfg)
    assert counts["total"] == model.num_parameters()
    ffn_actual = sum(p.numel() for b in model.blocks for p in b.ffn.parameters())
    assert counts["ffn"] == ffn_actual
    attn_actual = sum(p.numel() for b in model.blocks for p in b.attn.parameters())
    assert counts["attention"] == attn_actual


@pytest.mark.parametrize("preset", ["tiny", "small", "paper-dense-1b", "paper-moe-1b7b"])
def test_matched_variants_ffn_counts_within_one_percent(preset):
    base = load_config(preset).model
    base.vocab_size = base.vocab_size or 4096
    counts = {}
    for act in ACTIVATIONS:
        cfg = load_config(preset, [f"model.activation={act}"]).model
        cfg.vocab_size = base.vocab_size
        counts[act] = count_parameters(cfg)["ffn"]
    counts["polynorm_gated"] = count_parameters(load_config(preset, ["model.activation=polynorm", "model.ffn=gated", f"model.vocab_size={base.vocab_size}"]).model)["ffn"]
    low, high = min(counts.values()), max(counts.values())
    assert (high - low) / low < 0.01, counts


def test_paper_presets_on_meta_device():
    dense = load_config("paper-dense-1b", ["model.activation=swiglu"]).model
    dense_poly = load_config("paper-dense-1b", ["model.activation=polynorm"]).model
    assert dense.intermediate_size == 5504 and dense_poly.intermediate_size == 8256
    moe = load_config("paper-moe-1b7b").model
    assert moe.intermediate_size == 1536 and load_config("paper-moe-1b7b", ["model.activation=swiglu"]).model.intermediate_size == 1024
    for cfg in (dense, dense_poly, moe):
        with torch.device("meta"):
            model = Transformer(cfg)
        assert all(p.is_meta for p in model.parameters())
        assert model.num_parameters() == count_parameters(cfg)["total"]
    assert 1.2e9 < count_parameters(dense)["total"] < 1.5e9
    moe_counts = count_parameters(moe)
    assert 6.5e9 < moe_counts["total"] < 7.5e9 and 1.0e9 < moe_counts["active"] < 1.5e9
    with torch.device("meta"):
        polys = [m for m in Transformer(moe).modules() if isinstance(m, PolyCom)]
    assert len(polys) == moe.n_layers  # one coefficient set per layer, shared by 64 experts (released)


def test_model_flops_per_token():
    cfg = small(activation="swiglu")
    counts = count_parameters(cfg)
    expected = 6 * (counts["total"] - counts["embedding"]) + 12 * cfg.n_layers * cfg.d_model * 16
    assert model_flops_per_token(cfg, 16) == expected


def test_weight_decay_only_on_matrices():
    model = Transformer(small(activation="polynorm", n_experts=2, top_k=1))
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    no_decay_ids = {id(p) for p in no_decay["params"]}
    for m in model.modules():
        if isinstance(m, (PolyCom, nn.RMSNorm)):
            assert all(id(p) in no_decay_ids for p in m.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lr_schedule_warmup_cosine_floor():
    s = LRSchedule(TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1))
    assert s.lr(0) == pytest.approx(1e-4) and s.lr(9) == pytest.approx(1e-3)
    assert s.lr(10) == pytest.approx(1e-3) and s.lr(60) == pytest.approx(0.55e-3)
    assert s.lr(110) == pytest.approx(1e-4) and s.lr(500) == pytest.approx(1e-4)
    assert all(s.lr(i) >= s.lr(i + 1) for i in range(10, 120))
    s.lr_scale = 0.5
    assert s.lr(110) == pytest.approx(0.5e-4)
