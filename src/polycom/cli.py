"""The ``polycom`` command line.

Each subcommand lives in the module of its area, which provides
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them up and
turns user errors into one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Optional

from .errors import UserError

# name -> (module, one-line help). Modules are imported lazily when the command runs,
# so `polycom --help` works with only the core library installed.
COMMANDS = {
    "train": ("polycom.training.cli", "pretrain one transformer on real text"),
    "compare": ("polycom.compare.cli", "pilot experiment: matched runs per activation and seed, then a decision report"),
    "report": ("polycom.compare.report_cli", "re-render a compare report from its database"),
    "retrofit": ("polycom.hf.retrofit_cli", "swap the activation of a trained HF model, calibrate, recover"),
    "bench": ("polycom.bench.cli", "benchmarks: activations, training"),
}


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("polycom"):
            raise
        raise UserError(
            f"this command needs the optional dependency {exc.name!r}; install it with: pip install 'polycom[train,hf]'"
        ) from None


def build_parser(argv) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polycom", description="Polynomial Composition activations: library, pilot experiment, report.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"polycom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported (keeps --help fast and extras optional).
        if name == wanted:
            module = _load(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser



def guarded(body: Callable[[], Optional[int]], interrupted: Optional[str] = None) -> int:
    """Run a command's body at the CLI boundary: a :class:`UserError` becomes one
    ``error: ...`` line on stderr and exit code 2 (no traceback); with ``interrupted``
    given, Ctrl-C prints it and exits 130."""
    try:
        return int(body() or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(interrupted, file=sys.stderr)
        return 130


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 0 if not argv else 2
        return args._run(args)

    return guarded(body, interrupted="interrupted; re-run the same command to resume")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
