import dataclasses

import pytest

from polycom.cli import main
from polycom.config import ACTIVATIONS, ModelConfig, RunConfig, apply_overrides, list_presets, load_config
from polycom.errors import UserError


def test_presets_exist_and_validate():
    assert {"tiny", "small", "paper-dense-1b", "paper-moe-1b7b"} <= set(list_presets())
    for name in ("tiny", "small", "paper-dense-1b", "paper-moe-1b7b"):
        load_config(name)
    by_path = load_config("configs/tiny.toml")
    assert by_path.to_dict() == load_config("tiny").to_dict()


def test_overrides_are_typed():
    cfg = load_config("tiny", ["model.activation=polynorm", "model.n_experts=4", "model.top_k=2", "train.lr=5e-4",
                                "train.max_steps=7", "train.seed=3", "train.eval_every=2", "model.tie_embeddings=true", "data.corpus=ptb"])
    assert cfg.model.activation == "polynorm" and cfg.model.n_experts == 4 and cfg.model.top_k == 2
    assert cfg.train.lr == 5e-4 and isinstance(cfg.train.max_steps, int) and cfg.train.max_steps == 7
    assert cfg.model.tie_embeddings is True and cfg.train.seed == 3 and cfg.train.eval_every == 2


def test_roundtrip_dict():
    cfg = load_config("paper-moe-1b7b")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, needles", [
    ("model.activation=nope", ["model.activation", "polynorm", "swiglu"]),
    ("model.ffn=fancy", ["model.ffn", "auto, plain, gated"]),
    ("model.nope=1", ["model.nope", "model.activation"]),
    ("modle.activation=relu", ["modle", "model"]),
    ("train.max_steps=abc", ["train.max_steps", "integer"]),
    ("train.max_steps=0", ["train.max_steps", ">= 1"]),
    ("train.lr=-1", ["train.lr", "> 0"]),
    ("model.top_k=9", ["model.top_k"]),
    ("data.tokenizer=wordpiece", ["data.tokenizer", "bpe, gpt2"]),
    ("model.activation", ["key=value"]),
])
def test_bad_values_name_field_and_allowed(override, needles):
    extra = ["model.n_experts=4"] if override.startswith("model.top_k") else []
    with pytest.raises(UserError) as info:
        load_config("tiny", extra + [override])
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_plain_ffn_rejects_gated_activation():
    with pytest.raises(UserError, match="model.ffn"):
        load_config("tiny", ["model.activation=swiglu", "model.ffn=plain"])


def test_apply_overrides_generic_dataclass():
    @dataclasses.dataclass
    class Inner:
        rate: float = 1.0
        names: str = "a"

    @dataclasses.dataclass
    class Outer:
        inner: Inner = dataclasses.field(default_factory=Inner)
        flag: bool = False

    obj = apply_overrides(Outer(), ["inner.rate=2.5", "flag=yes", "inner.names=x,y"])
    assert obj.inner.rate == 2.5 and obj.flag is True and obj.inner.names == "x,y"
    with pytest.raises(UserError, match="inner.size"):
        apply_overrides(Outer(), ["inner.size=1"])


def test_every_activation_validates():
    import polycom
    from polycom.config import GATED_ACTIVATIONS
    from polycom.model import Transformer

    for act in ACTIVATIONS:
        cfg = ModelConfig(activation=act, d_model=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=16)
        cfg.validate()  # raises on a bad config
        gated = act in GATED_ACTIVATIONS
        assert cfg.ffn_kind == ("gated" if gated else "plain"), act
        ffn = Transformer(cfg).blocks[0].ffn
        assert ffn.kind == cfg.ffn_kind and hasattr(ffn, "gate") == gated, act
        assert type(ffn.act) is type(polycom.get_activation(act)), (act, type(ffn.act))
        # Matched parameters: the plain FFN is plain_ffn_ratio times wider than the gated one.
        assert ffn.hidden_size == (128 if gated else 192), (act, ffn.hidden_size)


def test_unknown_top_level_key_lists_the_sections(capsys, tmp_path):
    with pytest.raises(UserError) as exc:
        apply_overrides(RunConfig(), ["nope=1"])
    assert "allowed: model, data, train" in str(exc.value) and "nope.model" not in str(exc.value)
    assert main(["train", "--set", "nope=1", "--out", str(tmp_path / "r")]) == 2
    assert "allowed: model, data, train" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_bad_key_and_value_exit_2(tmp_path, capsys):
    assert main(["train", "--config", "tiny", "--set", "model.activation=nope", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.activation" in err and "polynorm" in err
    assert main(["train", "--config", "no-such-preset", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tiny" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nactivation = \n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "a rejected config must not create the run folder"


def test_compare_presets_are_not_run_presets(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('[compare]\nbase = "tiny"\n[train]\nmax_steps = 5\n')
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "polycom compare" in capsys.readouterr().err
    import polycom.config as config_module

    monkeypatch.setattr(config_module, "PRESET_DIR", tmp_path)
    (tmp_path / "run.toml").write_text("[train]\nmax_steps = 5\n")
    assert list_presets() == ["run"] and list_presets(include_compare=True) == ["exp", "run"]
