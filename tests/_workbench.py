"""Shared helpers for the workbench tests: micro configs that train in seconds on 2 cores."""

from __future__ import annotations

from polycom.config import RunConfig, apply_overrides


def micro_config(cache_dir, *overrides: str) -> RunConfig:
    """A ~0.1M-parameter model on a 200k-character slice of PTB with a 512-token BPE."""
    cfg = RunConfig()
    apply_overrides(cfg, [
        "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "data.corpus=ptb", "data.vocab_size=512", "data.max_train_chars=200000", "data.max_val_chars=40000",
        f"data.cache_dir={cache_dir}",
        "train.batch_size=8", "train.seq_len=32", "train.max_steps=12", "train.warmup_steps=2",
        "train.lr=3e-3", "train.eval_every=4", "train.eval_batches=2", "train.log_every=1",
        "train.checkpoint_every=4", "train.num_threads=1", "train.tensorboard=false",
    ])
    apply_overrides(cfg, overrides)
    return cfg.validate()
