"""``polycom bench``: dispatch to the benchmark subcommands.

- ``activations``: :mod:`polycom.bench.bench_activations` (op timings, saved bytes).
- ``training``: :mod:`polycom.bench.bench_training`, imported only when asked for; that
  module provides ``add_arguments(parser)`` and ``run(args) -> int`` like every command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from ..cli import guarded
from ..errors import UserError

SUBCOMMANDS = {
    "activations": ("polycom.bench.bench_activations", "time PolyNorm/PolyReLU (naive, fused, compiled) and baselines; bytes saved for backward"),
    "training": ("polycom.bench.bench_training", "training-step time and tokens/s per activation"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        # Arguments are left to the subcommand's own module, imported when it runs, so a
        # missing optional module (or its heavy imports) never breaks the other one.
        p = sub.add_parser(name, help=help_text, description=help_text, add_help=False, prefix_chars="\0")
        p.add_argument("benchmark_args", nargs=argparse.REMAINDER)
        p.set_defaults(_benchmark_module=module_name, _benchmark_name=name)


def _load(module_name: str, name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise UserError(f"the '{name}' benchmark is not available in this install ({module_name} is missing)") from None
        if exc.name and not exc.name.startswith("polycom"):
            raise UserError(
                f"the '{name}' benchmark needs the optional dependency {exc.name!r}; install it with: pip install 'polycom[train]'"
            ) from None
        raise


def run(args: argparse.Namespace) -> int:
    module_name = getattr(args, "_benchmark_module", None)
    if module_name is None:
        raise UserError("choose a benchmark: " + ", ".join(SUBCOMMANDS) + " (e.g. polycom bench activations --quick)")
    name = args._benchmark_name
    module = _load(module_name, name)
    parser = argparse.ArgumentParser(prog=f"polycom bench {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.benchmark_args)) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polycom.bench", description="benchmarks: " + ", ".join(SUBCOMMANDS))
    add_arguments(parser)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return guarded(lambda: run(args), interrupted="interrupted")
