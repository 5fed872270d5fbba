import json

import pytest
import torch

from polycom.cli import main
from polycom.training import read_metrics, train

from _workbench import micro_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def test_real_training_on_ptb_lowers_validation_loss(cache, tmp_path):
    cfg = micro_config(cache, "model.activation=polynorm", "train.max_steps=60", "train.eval_every=20", "train.log_every=10",
                       "train.checkpoint_every=30", "train.batch_size=16", "train.tensorboard=true")
    summary = train(cfg, tmp_path / "run", progress=False)
    evals = [r["val_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert summary["status"] == "completed" and len(evals) == 3
    assert evals[-1] < evals[0] - 0.2 and evals[-1] < 0.85 * 6.238  # ln(512): clearly below chance
    run = tmp_path / "run"
    for name in ("config.json", "meta.json", "metrics.jsonl", "checkpoint.pt", "model.pt", "summary.json"):
        assert (run / name).is_file(), name
    import importlib.util
    # TensorBoard logging is on when the package is installed (the dev extra installs it).
    assert (run / "tensorboard").is_dir() == (importlib.util.find_spec("tensorboard") is not None)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["version"] and meta["git_commit"] and meta["torch"] == torch.__version__
    assert json.loads((run / "config.json").read_text())["model"]["vocab_size"] == 512
    records = read_metrics(run / "metrics.jsonl")
    train_rec = next(r for r in records if r["kind"] == "train")
    assert {"step", "tokens", "wall_time_s", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= set(train_rec)
    coeffs = [r for r in records if r["kind"] == "coeffs"]
    assert len(coeffs) == 3 and len(coeffs[-1]["layers"]) == 2 and len(coeffs[-1]["layers"][0]["weight"]) == 3
    assert coeffs[-1]["layers"][0]["weight"] != [0.333333] * 3  # the coefficients learn
    for key in ("final_val_loss", "tokens_seen", "step_time_s", "tokens_per_s", "peak_rss_mb", "status", "events"):
        assert key in summary
    assert summary["tokens_seen"] == 60 * 16 * 32
    state = torch.load(run / "model.pt", weights_only=True)
    assert "blocks.0.ffn.act.weight" in state


class Killed(Exception):
    pass


def test_resume_after_kill_and_after_stop_matches_uninterrupted(cache, tmp_path):
    cfg = micro_config(cache, "model.activation=polynorm", "train.max_steps=12", "train.eval_every=3", "train.checkpoint_every=4")
    reference = train(cfg, tmp_path / "ref", progress=False)
    ref_losses = train_losses(tmp_path / "ref")

    def kill_at_9(record):  # dies between checkpoints (last one at step 8)
        if record["step"] == 9:
            raise Killed()

    with pytest.raises(Killed):
        train(cfg, tmp_path / "killed", progress=False, should_stop=kill_at_9)
    resumed = train(cfg, tmp_path / "killed", resume=True, progress=False)
    losses = train_losses(tmp_path / "killed")
    assert sorted(losses) == sorted(ref_losses) == list(range(1, 13))  # records after the checkpoint re-made, no duplicates
    assert max(abs(losses[s] - ref_losses[s]) for s in ref_losses) < 1e-5
    assert abs(resumed["final_val_loss"] - reference["final_val_loss"]) < 1e-5

    stopped = train(cfg, tmp_path / "stopped", progress=False, should_stop=lambda r: "futile" if r["step"] == 6 else None)
    assert stopped["status"] == "stopped" and stopped["stop_reason"] == "futile" and stopped["steps"] == 6
    assert any(e["event"] == "stopped" for e in stopped["events"])
    finished = train(cfg, tmp_path / "stopped", resume=True, progress=False)
    assert finished["status"] == "completed"
    losses = train_losses(tmp_path / "stopped")
    assert max(abs(losses[s] - ref_losses[s]) for s in ref_losses) < 1e-5
    a = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "model.pt", weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_divergence_guard_rolls_back_on_injected_nan(cache, tmp_path):
    cfg = micro_config(cache, "train.max_steps=10", "train.checkpoint_every=4", "train.rollback_lr_factor=0.5")
    injected = []

    def poison_once(step, model):
        if step == 6 and not injected:
            injected.append(step)
            with torch.no_grad():
                model.blocks[0].ffn.up.weight[0, 0] = float("nan")

    summary = train(cfg, tmp_path / "run", progress=False, on_step=poison_once)
    assert summary["status"] == "completed" and summary["steps"] == 10 and summary["rollbacks"] == 1
    assert summary["lr_scale"] == 0.5
    kinds = [e["event"] for e in summary["events"]]
    assert kinds == ["nonfinite", "rollback"]
    rollback = summary["events"][1]
    assert rollback["from_step"] == 6 and rollback["to_step"] == 4
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["event"] for r in records if r["kind"] == "event"] == ["nonfinite", "rollback"]
    losses = train_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 11)) and all(l == l for l in losses.values())  # finite, one record per step
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_divergence_guard_gives_up_after_bounded_retries(cache, tmp_path):
    cfg = micro_config(cache, "train.max_steps=10", "train.checkpoint_every=4", "train.max_rollbacks=2")

    def always_poison(step, model):
        if step >= 5:
            with torch.no_grad():
                model.blocks[0].ffn.up.weight[0, 0] = float("nan")

    summary = train(cfg, tmp_path / "run", progress=False, on_step=always_poison)
    assert summary["status"] == "diverged" and summary["rollbacks"] == 2
    assert [e["event"] for e in summary["events"]].count("rollback") == 2 and summary["events"][-1]["event"] == "diverged"


def test_spike_detection_triggers_rollback(cache, tmp_path):
    cfg = micro_config(cache, "train.max_steps=16", "train.checkpoint_every=4", "train.spike_factor=1.5", "train.spike_window=10")
    done = []

    def blow_up(step, model):
        if step == 13 and not done:
            done.append(step)
            with torch.no_grad():
                model.lm_head.weight.mul_(60.0)  # finite but huge logits: a loss spike

    summary = train(cfg, tmp_path / "run", progress=False, on_step=blow_up)
    assert [e["event"] for e in summary["events"]][:2] == ["spike", "rollback"]
    assert summary["status"] == "completed"


def test_bf16_and_grad_accumulation_and_moe_run(cache, tmp_path):
    cfg = micro_config(cache, "train.max_steps=3", "train.precision=bf16", "train.grad_accum_steps=2", "model.n_experts=4", "model.top_k=2",
                       "model.activation=polynorm", "train.eval_every=3")
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["status"] == "completed" and summary["tokens_seen"] == 3 * 2 * 8 * 32
    rec = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert all("aux_loss" in r and r["aux_loss"] > 0 for r in rec)


def _cli(*args):
    return main(["train", *args, "--no-progress"])


def test_cli_run_exists_resume_and_corrupt_checkpoint(cache, tmp_path, capsys):
    out = tmp_path / "run"
    sets = ["--set", "model.d_model=64", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=32", "data.vocab_size=512",
            "data.max_train_chars=200000", "data.max_val_chars=40000", "train.batch_size=4", "train.seq_len=16",
            "train.max_steps=2", "train.eval_every=2", "train.eval_batches=1", "train.num_threads=1", "train.tensorboard=false"]
    assert _cli("--config", "tiny", *sets, "--out", str(out), "--cache-dir", str(cache)) == 0
    assert "completed" in capsys.readouterr().out
    assert _cli("--config", "tiny", *sets, "--out", str(out), "--cache-dir", str(cache)) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and "\n" not in err
    assert _cli("--out", str(out), "--resume", "--set", "train.max_steps=4", "--cache-dir", str(cache)) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert _cli("--out", str(out), "--resume", "--set", "model.d_model=32", "--cache-dir", str(cache)) == 2
    assert "model.d_model" in capsys.readouterr().err
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert _cli("--out", str(out), "--resume", "--cache-dir", str(cache)) == 2
    err = capsys.readouterr().err.strip()
    assert "corrupt" in err and "\n" not in err
    assert _cli("--out", str(tmp_path / "nothing"), "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_sigkill_at_a_random_moment_then_resume_matches(cache, tmp_path):
    """A real kill -9 of the CLI process mid-run; --resume then reproduces the uninterrupted losses."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sets = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64", "data.vocab_size=512",
            "data.max_train_chars=200000", "data.max_val_chars=40000", "train.batch_size=8", "train.seq_len=64",
            "train.max_steps=30", "train.warmup_steps=2", "train.lr=3e-3", "train.eval_every=5", "train.eval_batches=2",
            "train.log_every=1", "train.checkpoint_every=3", "train.num_threads=1", "train.tensorboard=false"]
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "polycom", "train", "--config", "tiny", "--set", *sets, "--out", str(out),
                             "--cache-dir", str(cache), "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
        if steps and max(steps) >= 6:
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = max(steps)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    if killed_at is None:
        pytest.skip("the run finished before it could be killed (machine too fast for this probe)")
    assert main(["train", "--out", str(out), "--resume", "--cache-dir", str(cache), "--no-progress"]) == 0

    from polycom.config import load_config

    ref_cfg = load_config("tiny", sets)
    train(ref_cfg, tmp_path / "ref", progress=False, cache_dir=cache)
    ref, got = train_losses(tmp_path / "ref"), train_losses(out)
    assert sorted(got) == sorted(ref) == list(range(1, 31))
    assert max(abs(got[s] - ref[s]) for s in ref) < 1e-5


def test_cli_short_run_without_a_rate_prints_na(tmp_path, capsys, monkeypatch):
    import polycom.training.trainer as trainer_module

    def fake_train(cfg, out_dir, **kwargs):
        out_dir.mkdir(parents=True, exist_ok=True)
        return {"status": "completed", "steps": 1, "tokens_seen": 64, "final_val_loss": 5.0, "tokens_per_s": None}

    monkeypatch.setattr(trainer_module, "train", fake_train)
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "n/a tokens/s" in out and "0 tokens/s" not in out, out


def test_cli_user_error_leaves_no_new_run_folder(tmp_path, capsys, monkeypatch):
    import polycom.training.trainer as trainer_module
    from polycom.errors import UserError

    def failing_train(cfg, out_dir, **kwargs):  # a user error after the folder was made
        out_dir.mkdir(parents=True, exist_ok=True)
        raise UserError("bad data")

    monkeypatch.setattr(trainer_module, "train", failing_train)
    out = tmp_path / "r"
    assert main(["train", "--config", "tiny", "--out", str(out), "--no-progress"]) == 2
    assert "bad data" in capsys.readouterr().err and not out.exists()
    out.mkdir()  # a folder that existed before is kept
    assert main(["train", "--config", "tiny", "--out", str(out), "--no-progress"]) == 2
    assert out.is_dir()
    # The real trainer checks the data before it creates the folder.
    monkeypatch.undo()
    missing = tmp_path / "missing"
    assert main(["train", "--config", "tiny", "--set", f"data.corpus={tmp_path / 'nope.txt'}", "--out", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err and not missing.exists()
