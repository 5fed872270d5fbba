"""``polycom report DIR``: re-render a compare report (summary.json, plots, report.md,
report.html) from the folder's sweep database alone."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a compare output folder (holds sweep.sqlite)")


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from .db import DB_NAME
    from .report import render_report

    out = Path(args.dir)
    if not (out / DB_NAME).is_file():
        raise UserError(f"{out} has no {DB_NAME}; give the --out folder of a `polycom compare` run")
    paths = render_report(out)
    print(f"report: {paths['html']}")
    print(f"        {paths['markdown']}")
    print(f"        {paths['summary']}")
    return 0
