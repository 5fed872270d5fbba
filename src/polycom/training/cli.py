"""``polycom train``: pretrain one transformer on real text.

    polycom train --config configs/tiny.toml --set model.activation=polynorm --out runs/x
    polycom train --config tiny --set train.max_steps=200 data.corpus=./my_texts/ --out runs/y
    polycom train --out runs/x --resume           # continue after a stop or a kill
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import list_presets, load_config
from ..errors import UserError
from ..utils.io import remove_if_empty

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"a TOML file or a preset name ({', '.join(list_presets())}); default: tiny, or with --resume the run's saved config")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config fields, e.g. model.activation=polynorm train.max_steps=200")
    parser.add_argument("--out", required=True, help="run folder (config, metrics.jsonl, checkpoint, summary)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--cache-dir", default=None, help="token/tokenizer cache (default: data.cache_dir, $POLYCOM_CACHE or ~/.cache/polycom)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")


def run(args: argparse.Namespace) -> int:
    from .trainer import train

    out_dir = Path(args.out)
    if args.resume:
        saved = out_dir / "config.json"
        if not (out_dir / "checkpoint.pt").exists():
            raise UserError(f"--resume: {out_dir} holds no checkpoint.pt to resume from")
        config_source = args.config if args.config is not None or not saved.is_file() else None
        if config_source is None:  # resume the saved config unless one was named explicitly
            try:
                saved_cfg = json.loads(saved.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise UserError(f"--resume: {saved} is unreadable ({exc}); pass --config again") from None
            from ..config import RunConfig, apply_overrides

            cfg = apply_overrides(RunConfig.from_dict(saved_cfg), args.overrides).validate()
        else:
            cfg = load_config(config_source or "tiny", args.overrides)
    else:
        if (out_dir / "checkpoint.pt").exists():
            raise UserError(f"run folder {out_dir} already holds a run; pass --resume to continue it, or choose a new --out")
        cfg = load_config(args.config or "tiny", args.overrides)
    created = not out_dir.exists()
    try:
        summary = train(cfg, out_dir, resume=args.resume, progress=not args.no_progress, cache_dir=args.cache_dir)
    except UserError:
        if created:
            remove_if_empty(out_dir)  # a user error before training: leave no empty folder behind
        raise
    val = summary["final_val_loss"]
    print(
        f"{summary['status']}: {summary['steps']} steps, {summary['tokens_seen']:,} tokens, "
        f"val loss {val:.4f}" if val is not None else f"{summary['status']}: {summary['steps']} steps",
        f"| {_rate(summary['tokens_per_s'])} tokens/s | {out_dir}",
    )
    return 1 if summary["status"] == "diverged" else 0


def _rate(tokens_per_s) -> str:
    """``1,234`` or ``n/a`` (a run too short to time has no rate)."""
    return "n/a" if tokens_per_s is None else f"{tokens_per_s:,.0f}"
