"""``polycom retrofit``: swap a trained HF model's activation to PolyCom, calibrate, recover.

    polycom retrofit --model smollm2-135m --activation polynorm --steps 20 --data ptb --out runs/retrofit

Everything a user can get wrong (model path, missing tokenizer, model with no known MLP,
activation name, option values, --seq-len beyond the model's context length, a tokenizer
larger than the model's vocabulary) is checked BEFORE the output folder is created: one line, exit code 2,
nothing written. Results: ``retrofit.json`` (perplexities, steps, times, settings,
per-layer calibration, curve), ``retrofit.md`` (table), ``curve.png`` (with matplotlib);
every file is written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at run time

from ..errors import UserError
from .retrofit import CALIBRATION_CHOICES, DATA_CHOICES, TRAIN_CHOICES, RetrofitConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = RetrofitConfig(model="", out="")
    parser.add_argument("--model", required=True, help="smollm2-135m, a local Hugging Face model folder, or a .gguf file")
    parser.add_argument("--activation", default=d.activation, help="registered PolyCom activation (polynorm, polyrelu)")
    parser.add_argument("--steps", type=int, default=d.steps, help="recovery training steps (default %(default)s)")
    parser.add_argument("--data", default=d.data, choices=DATA_CHOICES, help="evaluation/calibration/training text")
    parser.add_argument("--out", required=True, help="output folder (created after all inputs are checked)")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per window (default %(default)s)")
    parser.add_argument("--eval-windows", type=int, default=d.eval_windows, help="validation windows (default %(default)s)")
    parser.add_argument("--calib-windows", type=int, default=d.calib_windows, help="calibration windows (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="training windows per step (default %(default)s)")
    parser.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="on matrices only (default %(default)s)")
    parser.add_argument("--train", default=d.train, choices=TRAIN_CHOICES,
                        help="what recovery trains: mlp = FFN weights + coefficients (default), coeffs, all")
    parser.add_argument("--calibration", default=d.calibration, choices=CALIBRATION_CHOICES,
                        help="parallel: each layer on the original model's inputs; sequential: on the calibrated "
                             "swapped model's inputs, layer by layer in one pass (default %(default)s)")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every N steps for the curve (0: end only)")
    parser.add_argument("--control", action="store_true", help="also train the ORIGINAL model the same way (domain-adaptation control)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch default)")


def _config(args) -> RetrofitConfig:
    cfg = RetrofitConfig(model=args.model, out=args.out, activation=args.activation, steps=args.steps, data=args.data,
                         seq_len=args.seq_len, eval_windows=args.eval_windows, calib_windows=args.calib_windows,
                         batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, lr=args.lr,
                         warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, train=args.train,
                         eval_every=args.eval_every, calibration=args.calibration, control=args.control, seed=args.seed, threads=args.threads)
    cfg.validate()
    return cfg


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args) -> int:
    import torch

    cfg = _config(args)
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UserError(f"--out {cfg.out!r} exists and is not a folder")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    from ..utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
    from .convert import find_ffn_sites, supported_families_text
    from .registry import register
    from .retrofit import check_model_fits, render_curve_png, render_markdown, retrofit
    from .smollm2 import load_model

    register()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our log lines are the progress; errors stay one line
    model, tokenizer, source = load_model(cfg.model)
    if not find_ffn_sites(model):
        raise UserError(f"no MLP this converter knows in {type(model).__name__} (model_type "
                        f"{getattr(model.config, 'model_type', '?')!r}); supported families: {supported_families_text()}")
    if getattr(model.config, "polycom", None):
        raise UserError(f"{cfg.model!r} is already converted to {model.config.polycom.get('activation')}; give the original model")
    check_model_fits(model, tokenizer, cfg)
    _log(f"loaded {source['name']} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters)")

    result = retrofit(model, tokenizer, cfg, source=source, log=_log)

    os.makedirs(cfg.out, exist_ok=True)
    atomic_write_json(os.path.join(cfg.out, "retrofit.json"), result)
    atomic_write_text(os.path.join(cfg.out, "retrofit.md"), render_markdown(result))
    png = render_curve_png(result)
    if png is not None:
        atomic_write_bytes(os.path.join(cfg.out, "curve.png"), png)
    ppl = result["perplexity"]
    print(" | ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    print(f"wrote {os.path.join(cfg.out, 'retrofit.json')}")
    return 0
