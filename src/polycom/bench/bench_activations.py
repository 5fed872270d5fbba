"""Activation benchmark: ``polycom bench activations`` / ``python -m polycom.bench activations``.

Times forward, backward and forward+backward (median, p20, p80 over interleaved rounds
after warm-up) and measures the bytes autograd saves for backward, for

- PolyNorm: the released naive formula (eager and compiled), the fused path (eager and
  compiled), and compiled ``F.rms_norm`` with a gain (the bandwidth ceiling of a
  row-normalising op) -- :mod:`polycom.bench.bench_poly_norm`;
- PolyReLU: naive and fused (eager and compiled) -- :mod:`polycom.bench.bench_poly_relu`;
- the paper's baselines as the registry builds them: SwiGLU (silu(gate) * up, given a
  second input of the same shape), GELU and squared ReLU,

at 4096 rows and widths 1024, 2048, 2816, 5504, 8256 (the 1B model's FFN sizes and the
2048 of the issue's targets), fp32 and bf16. Every (rows, width, dtype) group runs in one
process with its cases interleaved, so the ratios compare like with like.

Results: rows appended to ``bench/activations.csv`` (keyed by time, machine, cpu, torch
and polycom version, shape, dtype), this run's tables in ``bench/activations.md``, and the
issue's three targets printed with PASS/FAIL:

- PolyNorm fused eager forward+backward >= 4x faster than the naive formula (4096x2048 fp32);
- PolyNorm fused compiled <= 1.25x compiled ``F.rms_norm`` forward+backward;
- bytes saved for backward by fused PolyNorm <= 1.1x the input's bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..activations import get_activation
from ..errors import UserError
from . import bench_poly_norm, bench_poly_relu
from .harness import append_csv, machine_info, paired_ratio, saved_bytes, summarize, time_rounds

__all__ = ["add_arguments", "run", "main", "benchmark_group", "ALL_CASES", "CSV_FIELDS"]

BASELINE_CASES: Dict[str, str] = {
    "swiglu": "silu(gate) * up (registry 'swiglu'), gate and up both of the given shape",
    "gelu": "GELU, exact erf (registry 'gelu')",
    "relu2": "squared ReLU (registry 'relu2')",
}
ALL_CASES: Dict[str, str] = {**bench_poly_norm.CASES, **bench_poly_relu.CASES, **BASELINE_CASES}

DEFAULT_ROWS = 4096
DEFAULT_WIDTHS = (1024, 2048, 2816, 5504, 8256)
DEFAULT_DTYPES = ("float32", "bfloat16")
TARGET_WIDTH = 2048

SPEEDUP_TARGET = 4.0  # fused eager vs naive, forward+backward
COMPILED_RATIO_TARGET = 1.25  # fused compiled / compiled rms_norm, forward+backward
SAVED_RATIO_TARGET = 1.1  # saved-for-backward bytes / input bytes

CSV_FIELDS = [
    "timestamp", "machine", "cpu", "cpu_count", "torch_threads", "torch", "polycom",
    "case", "rows", "width", "dtype", "rounds",
    "forward_median_ms", "forward_p20_ms", "forward_p80_ms",
    "backward_median_ms", "backward_p20_ms", "backward_p80_ms",
    "fwd_bwd_median_ms", "fwd_bwd_p20_ms", "fwd_bwd_p80_ms",
    "speedup_vs_polynorm_naive", "saved_bytes", "input_bytes", "saved_ratio", "first_call_s",
]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _baseline_cases(x: torch.Tensor, up: torch.Tensor, names: Sequence[str]):
    cases = {}
    for name in names:
        if name not in BASELINE_CASES:
            continue
        module = get_activation(name)
        if name == "swiglu":
            cases[name] = ((lambda m: (lambda: m(x, up)))(module), (x, up))
        else:
            cases[name] = ((lambda m: (lambda: m(x)))(module), (x,))
    return cases


def benchmark_group(
    rows: int, width: int, dtype: torch.dtype, names: Sequence[str], repeats: int, warmup: int, budget_s: Optional[float]
) -> List[Dict[str, object]]:
    """Time every case in ``names`` on one (rows, width, dtype); one result dict per case."""
    torch._dynamo.reset()  # each group compiles fresh and static (no recompile limits)
    generator = torch.Generator().manual_seed(rows * 100003 + width)
    x = torch.randn(rows, width, generator=generator).to(dtype).requires_grad_(True)
    up = torch.randn(rows, width, generator=generator).to(dtype).requires_grad_(True)
    grad_output = torch.randn(rows, width, generator=generator).to(dtype)
    cases = {}
    cases.update(bench_poly_norm.build_cases(x, names))
    cases.update(bench_poly_relu.build_cases(x, names))
    cases.update(_baseline_cases(x, up, names))
    cases = {name: cases[name] for name in names if name in cases}
    timings, first_call = time_rounds(cases, grad_output, warmup=warmup, repeats=repeats, budget_s=budget_s)
    reference = timings.get("polynorm_naive")
    results = []
    for name, (forward, leaves) in cases.items():
        timed = timings[name]
        input_bytes = x.numel() * x.element_size() * (2 if name == "swiglu" else 1)
        saved = saved_bytes(forward)
        for leaf in leaves:
            leaf.grad = None
        row = {"case": name, "rows": rows, "width": width, "dtype": str(dtype).replace("torch.", ""), "rounds": len(timed.forward)}
        for label, seconds in (("forward", timed.forward), ("backward", timed.backward), ("fwd_bwd", timed.total)):
            stats = summarize(seconds)
            row[f"{label}_median_ms"] = stats["median_ms"]
            row[f"{label}_p20_ms"] = stats["p20_ms"]
            row[f"{label}_p80_ms"] = stats["p80_ms"]
        row["speedup_vs_polynorm_naive"] = paired_ratio(reference.total, timed.total) if reference else float("nan")
        row["saved_bytes"] = saved
        row["input_bytes"] = input_bytes
        row["saved_ratio"] = saved / input_bytes
        row["first_call_s"] = first_call[name]
        row["_total"] = timed.total  # per-round seconds, for paired ratios; not written
        results.append(row)
    return results


def _group_ratio(group: Dict[str, Dict], numerator: str, denominator: str) -> Optional[float]:
    if numerator in group and denominator in group:
        return paired_ratio(group[numerator]["_total"], group[denominator]["_total"])
    return None


def evaluate_targets(results: List[Dict[str, object]], rows: int) -> List[Dict[str, object]]:
    """The issue's three targets, each with its measured value, the shape it was measured on, and PASS/FAIL."""
    groups: Dict[Tuple[int, str], Dict[str, Dict]] = {}
    for row in results:
        groups.setdefault((row["width"], row["dtype"]), {})[row["case"]] = row
    fp32 = sorted(width for width, dtype in groups if dtype == "float32")
    headline = (TARGET_WIDTH, "float32") if TARGET_WIDTH in fp32 else ((fp32[0], "float32") if fp32 else None)
    targets = []

    def add(name, value, target, passes, where):
        status = "not measured" if value is None else ("PASS" if passes(value) else "FAIL")
        targets.append({"target": name, "value": value, "goal": target, "status": status, "where": where})

    where = f"{rows}x{headline[0]} {headline[1]}" if headline else "-"
    group = groups.get(headline, {}) if headline else {}
    add("PolyNorm fused eager vs naive, fwd+bwd speedup", _group_ratio(group, "polynorm_naive", "polynorm_fused"),
        f">= {SPEEDUP_TARGET:g}x", lambda v: v >= SPEEDUP_TARGET, where)
    add("PolyNorm fused compiled / compiled rms_norm, fwd+bwd", _group_ratio(group, "polynorm_fused_compiled", "rms_norm_compiled"),
        f"<= {COMPILED_RATIO_TARGET:g}x", lambda v: v <= COMPILED_RATIO_TARGET, where)
    saved = [(row["saved_ratio"], f"{row['rows']}x{row['width']} {row['dtype']}") for row in results if row["case"] == "polynorm_fused"]
    worst = max(saved) if saved else (None, "-")
    add("PolyNorm fused saved-for-backward bytes / input bytes (worst shape)", worst[0],
        f"<= {SAVED_RATIO_TARGET:g}x", lambda v: v <= SAVED_RATIO_TARGET, worst[1])
    return targets


def _format_targets(targets: List[Dict[str, object]]) -> List[str]:
    lines = []
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.2f}x"
        lines.append(f"{t['status']:>4}  {t['target']}: {value} (goal {t['goal']}; {t['where']})")
    return lines


def _cell(row: Dict, label: str) -> str:
    return f"{row[f'{label}_median_ms']:.1f} [{row[f'{label}_p20_ms']:.1f}, {row[f'{label}_p80_ms']:.1f}]"


def render_markdown(results: List[Dict[str, object]], context: Dict[str, object], targets: List[Dict[str, object]]) -> str:
    lines = [
        "# Activation benchmark",
        "",
        f"{context['timestamp']}; {context['machine']}, {context['cpu']} ({context['cpu_count']} cpus, "
        f"{context['torch_threads']} torch threads); torch {context['torch']}, polycom {context['polycom']}.",
        "Times in ms: median [p20, p80] over interleaved rounds after warm-up; forward+backward is the per-round sum.",
        "Speed-up = median over rounds of (naive PolyNorm time / this case's time) in the same round.",
        "Saved = distinct bytes autograd keeps for backward (saved_tensors_hooks) / input bytes.",
        "",
        "## Targets (issue 2)",
        "",
        "| target | measured | goal | status | shape |",
        "|---|---|---|---|---|",
    ]
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.2f}x"
        lines.append(f"| {t['target']} | {value} | {t['goal']} | {t['status']} | {t['where']} |")
    lines += ["", "## Forward+backward median (ms)", ""]
    shapes = sorted({(row["dtype"], row["width"]) for row in results}, key=lambda s: (s[0] != "float32", s[0], s[1]))
    cases = list(dict.fromkeys(row["case"] for row in results))
    by_key = {(row["case"], row["dtype"], row["width"]): row for row in results}
    rows_count = results[0]["rows"] if results else 0
    lines.append("| case | " + " | ".join(f"{rows_count}x{w} {d}" for d, w in shapes) + " |")
    lines.append("|---|" + "---|" * len(shapes))
    for case in cases:
        cells = []
        for d, w in shapes:
            row = by_key.get((case, d, w))
            cells.append("-" if row is None else f"{row['fwd_bwd_median_ms']:.1f}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## All measurements",
        "",
        "| case | shape | dtype | forward | backward | forward+backward | speed-up vs naive PolyNorm | saved / input | first call (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(results, key=lambda r: (r["dtype"] != "float32", r["dtype"], r["width"])):
        lines.append(
            f"| {row['case']} | {row['rows']}x{row['width']} | {row['dtype']} | {_cell(row, 'forward')} | {_cell(row, 'backward')} | "
            f"{_cell(row, 'fwd_bwd')} | {row['speedup_vs_polynorm_naive']:.2f}x | {row['saved_ratio']:.2f}x | {row['first_call_s']:.1f} |"
        )
    lines += ["", "Cases:", ""]
    for case in cases:
        lines.append(f"- `{case}`: {ALL_CASES[case]}")
    lines.append("")
    return "\n".join(lines)


def _parse_list(text: str, convert: Callable, what: str) -> list:
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    try:
        values = [convert(item) for item in items]
    except (ValueError, KeyError):
        raise UserError(f"bad {what} {text!r}") from None
    if not values:
        raise UserError(f"no {what} given")
    return values


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise UserError(f"unknown dtype {name!r}; known: float32, bfloat16, float16")
    return _DTYPES[name]


def _case(name: str) -> str:
    if name not in ALL_CASES:
        raise UserError(f"unknown case {name!r}; known: {', '.join(ALL_CASES)}")
    return name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=None, help=f"rows (tokens) per input (default {DEFAULT_ROWS}; --quick: 256)")
    parser.add_argument("--widths", default=None, help="comma-separated widths (default " + ",".join(map(str, DEFAULT_WIDTHS)) + "; --quick: 512)")
    parser.add_argument("--dtypes", default=None, help="comma-separated: float32, bfloat16, float16 (default float32,bfloat16; --quick: float32)")
    parser.add_argument("--cases", default=",".join(ALL_CASES), help="comma-separated cases (default: all): " + ", ".join(ALL_CASES))
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per shape (default 10; --quick: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per case before timing (compilation happens here)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed rounds per shape before stopping early, after 3 rounds (default 20; --quick: none)")
    parser.add_argument("--out", default="bench/activations.csv", help="CSV to append to; the markdown goes next to it (.md)")
    parser.add_argument("--quick", action="store_true", help="small smoke run: 256x512 fp32, 3 rounds")


def run(args: argparse.Namespace) -> int:
    quick = bool(args.quick)
    rows = args.rows if args.rows is not None else (256 if quick else DEFAULT_ROWS)
    widths = _parse_list(args.widths, int, "widths") if args.widths else ([512] if quick else list(DEFAULT_WIDTHS))
    dtypes = _parse_list(args.dtypes, _dtype, "dtypes") if args.dtypes else ([torch.float32] if quick else [_DTYPES[d] for d in DEFAULT_DTYPES])
    names = _parse_list(args.cases, _case, "cases")
    repeats = args.repeats if args.repeats is not None else (3 if quick else 10)
    budget = args.budget if args.budget is not None else (None if quick else 20.0)
    if rows < 1 or any(w < 1 for w in widths) or repeats < 1 or args.warmup < 0:
        raise UserError("--rows, --widths and --repeats must be >= 1 and --warmup >= 0")
    out = Path(args.out)
    if out.suffix != ".csv":
        raise UserError(f"--out must name a .csv file, got {args.out!r}")
    context = machine_info()
    print(f"activation benchmark: {rows} rows x widths {widths}, {[str(d).replace('torch.', '') for d in dtypes]}, "
          f"{len(names)} cases, up to {repeats} rounds; torch threads {context['torch_threads']}", flush=True)
    results = []
    for dtype in dtypes:
        for width in widths:
            group = benchmark_group(rows, width, dtype, names, repeats=repeats, warmup=args.warmup, budget_s=budget)
            results.extend(group)
            summary = ", ".join(f"{row['case']} {row['fwd_bwd_median_ms']:.1f}" for row in group)
            print(f"  {rows}x{width} {str(dtype).replace('torch.', '')} ({group[0]['rounds']} rounds) fwd+bwd ms: {summary}", flush=True)
    targets = evaluate_targets(results, rows)
    append_csv(out, [{**context, **{k: v for k, v in row.items() if not k.startswith('_')}} for row in results], CSV_FIELDS)
    markdown_path = out.with_suffix(".md")
    from ..utils.io import atomic_write_text

    atomic_write_text(markdown_path, render_markdown(results, context, targets))
    print("targets:")
    for line in _format_targets(targets):
        print("  " + line)
    print(f"wrote {out} and {markdown_path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="polycom bench activations", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    from ..cli import guarded

    return guarded(lambda: run(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
