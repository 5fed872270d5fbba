"""``polycom compare``: the pilot experiment that ends in a decision report.

Matched runs of several activations (the first is the baseline) and seeds on real text,
recorded in an SQLite database in the output folder (resumable), measured for quality,
cost and stability, compared with statistics over seeds, and summarised in a report
that opens with a verdict per candidate: adopt / pilot-further / reject.

Modules: ``config`` (CompareConfig), ``db`` (the sweep database), ``sweep`` (runs,
resumption, futility rule), ``measure`` (post-training measurements), ``stats``
(intervals, tests, tokens to target), ``summary`` (summary.json), ``verdict``
(the decision), ``plots`` and ``report`` (report.md / report.html), ``cli`` and
``report_cli`` (the two commands).
"""

from .config import CompareConfig, Futility, Measure, Thresholds, load_compare_config

__all__ = ["CompareConfig", "Thresholds", "Futility", "Measure", "load_compare_config", "run_compare"]


def run_compare(cfg: CompareConfig, out_dir, progress: bool = True, on_run_done=None):
    """Run (or resume) the sweep, then render the report; returns the report's paths."""
    from .report import render_report
    from .sweep import run_sweep

    run_sweep(cfg, out_dir, progress=progress, on_run_done=on_run_done)
    return render_report(out_dir)
