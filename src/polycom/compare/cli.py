"""``polycom compare --config configs/pilot.toml --out runs/pilot [--set key=value ...] [--stop-if-behind MARGIN]``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/pilot.toml",
                        help="compare config TOML (default: configs/pilot.toml; a bundled preset name works too)")
    parser.add_argument("--out", required=True, help="output folder: sweep database, run folders, report")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a config value: activations=swiglu,gelu,polynorm, seeds=3, "
                             "thresholds.adopt_min_speedup=1.2, train.max_steps=300, model.d_model=128, ... (several after one --set, or repeat --set)")
    parser.add_argument("--stop-if-behind", dest="stop_if_behind", type=float, default=None, metavar="MARGIN",
                        help="futility rule: stop a candidate whose validation loss trails the baseline's at the same "
                             "tokens by more than MARGIN nats (after futility.min_budget_share of the budget)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress display")


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from . import run_compare
    from .config import load_compare_config

    if args.stop_if_behind is not None and args.stop_if_behind < 0:
        raise UserError(f"--stop-if-behind must be >= 0 (nats of validation loss), got {args.stop_if_behind}")
    cfg = load_compare_config(args.config, args.overrides, stop_if_behind=args.stop_if_behind)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    start = time.monotonic()
    created = not out.exists()
    try:
        paths = run_compare(cfg, out, progress=args.progress)
    except UserError:
        if created:
            _remove_if_unused(out)
        raise
    elapsed = time.monotonic() - start
    _print_verdict(out)
    print(f"\ncompare finished in {elapsed / 60:.1f} min")
    print(f"report: {paths['html']}")
    print(f"        {paths['markdown']}")
    print(f"        {paths['summary']}")
    return 0


def _remove_if_unused(out: Path) -> None:
    """Remove a folder this invocation created if nothing but its lock file is in it."""
    from ..utils.io import remove_if_empty

    lock = out / ".compare.lock"
    if out.is_dir() and all(child == lock for child in out.iterdir()):
        lock.unlink(missing_ok=True)
        remove_if_empty(out)


def _print_verdict(out: Path) -> None:
    import json

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    from .verdict import display_name

    print(f"\nverdict (baseline {display_name(summary['baseline'])}):")
    for v in summary["verdict"]:
        print(f"  {display_name(v['activation'])}: {v['decision'].upper()} - {v['reason']}")
    if summary.get("incomplete_runs"):
        print(f"  incomplete runs: {', '.join(summary['incomplete_runs'])} (re-run the same command to finish them)")
