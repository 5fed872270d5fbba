"""Training-step benchmark: tokens/s and step time per activation, one process, interleaved.

    polycom bench training                         # tiny preset, the five paper activations
    python -m polycom.bench.bench_training --activations swiglu,polynorm --steps 30

Every activation gets the same preset at matched parameters (plain FFNs 3/2 wider than
gated ones) and the same batches. Steps are interleaved round-robin, the order rotating
every round, so load from other processes on a shared machine hits all activations
alike; the ratio to the baseline is the median of per-round ratios (robust to a slow
round) and, for reference, the ratio of medians. A step is exactly the trainer's: forward,
backward, gradient clipping, AdamW update.

Tokens are random ids (the step time does not depend on the text), so the benchmark
needs no corpus or tokenizer. Results: a row per activation appended to
``<out>/training.csv`` (keyed by time, machine, version, commit, preset) and the latest
table written to ``<out>/training.md``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .. import __version__
from ..config import RunConfig, load_config
from ..model import Transformer, count_parameters, model_flops_per_token
from ..utils.io import atomic_write_text

__all__ = ["add_arguments", "run", "main", "benchmark_training"]

DEFAULT_ACTIVATIONS = "swiglu,polynorm,polyrelu,gelu,relu"

CSV_FIELDS = [
    "timestamp", "host", "cpu_threads", "torch", "polycom", "git_commit", "preset", "precision", "batch_size", "seq_len",
    "activation", "ffn", "intermediate_size", "parameters", "ffn_parameters", "steps", "step_time_s", "step_time_p20_s",
    "step_time_p80_s", "tokens_per_s", "ratio_vs_baseline", "ratio_of_medians", "cpu_step_time_s", "cpu_ratio_vs_baseline",
    "model_tflops_per_s", "saved_for_backward_mb",
]


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low, high = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _saved_bytes(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd keeps for backward during one forward (exact, deterministic)."""
    total = 0
    seen = set()

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, targets=y)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def benchmark_training(
    config: RunConfig,
    activations: Sequence[str],
    steps: int = 20,
    warmup: int = 3,
    baseline: str = "swiglu",
    preset: str = "",
    progress: bool = True,
) -> List[Dict]:
    """Time ``steps`` interleaved training steps per activation; return one row per activation."""
    from ..training.optim import LRSchedule, build_optimizer

    tc = config.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    vocab = config.model.vocab_size or config.data.vocab_size
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (tc.batch_size, tc.seq_len + 1), generator=generator) for _ in range(4)]
    runs = {}
    for name in activations:
        model_cfg = RunConfig.from_dict(config.to_dict()).model
        model_cfg.activation = name
        model_cfg.vocab_size = vocab
        model_cfg.validate()
        torch.manual_seed(tc.seed)
        model = Transformer(model_cfg)
        optimizer = build_optimizer(model, tc)
        lr = LRSchedule(tc).lr(tc.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        runs[name] = {"cfg": model_cfg, "model": model, "optimizer": optimizer, "times": [], "cpu_times": []}
        x, y = batches[0][:, :-1], batches[0][:, 1:]
        runs[name]["saved_bytes"] = _saved_bytes(model, x, y)

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if tc.precision == "bf16" else None
    names = list(activations)
    total_rounds = warmup + steps
    for round_index in range(total_rounds):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]  # rotate who goes first
        batch = batches[round_index % len(batches)]
        x, y = batch[:, :-1], batch[:, 1:]
        for name in order:
            run = runs[name]
            model, optimizer = run["model"], run["optimizer"]
            start, cpu_start = time.perf_counter(), time.process_time()
            if autocast is not None:
                with autocast:
                    out = model(x, targets=y)
            else:
                out = model(x, targets=y)
            out.loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
            if round_index >= warmup:
                run["times"].append(elapsed)
                run["cpu_times"].append(cpu_elapsed)
        if progress:
            print(f"\rround {round_index + 1}/{total_rounds}", end="", flush=True)
    if progress:
        print()

    tokens_per_step = tc.batch_size * tc.seq_len
    base = runs.get(baseline)
    rows = []
    for name in names:
        run = runs[name]
        times = run["times"]
        median = statistics.median(times)
        counts = count_parameters(run["cfg"])
        flops = model_flops_per_token(run["cfg"], tc.seq_len)
        row = {
            "activation": name,
            "ffn": run["cfg"].ffn_kind,
            "intermediate_size": run["cfg"].intermediate_size,
            "parameters": counts["total"],
            "ffn_parameters": counts["ffn"],
            "steps": len(times),
            "step_time_s": round(median, 5),
            "step_time_p20_s": round(_quantile(times, 0.2), 5),
            "step_time_p80_s": round(_quantile(times, 0.8), 5),
            "tokens_per_s": round(tokens_per_step / median, 1),
            "model_tflops_per_s": round(flops * tokens_per_step / median / 1e12, 4),
            "saved_for_backward_mb": round(run["saved_bytes"] / 2**20, 2),
            "ratio_vs_baseline": None,
            "ratio_of_medians": None,
            "cpu_step_time_s": round(statistics.median(run["cpu_times"]), 5),
            "cpu_ratio_vs_baseline": None,
        }
        if base is not None:
            per_round = [t / b for t, b in zip(times, base["times"])]
            row["ratio_vs_baseline"] = round(statistics.median(per_round), 4)
            row["ratio_of_medians"] = round(median / statistics.median(base["times"]), 4)
            cpu_per_round = [t / b for t, b in zip(run["cpu_times"], base["cpu_times"])]
            row["cpu_ratio_vs_baseline"] = round(statistics.median(cpu_per_round), 4)
        rows.append(row)
    return rows


def _git_commit() -> str:
    from ..training.trainer import git_commit

    return git_commit()


def _markdown(rows: List[Dict], context: Dict, baseline: str) -> str:
    lines = [
        "# Training-step benchmark",
        "",
        f"Preset `{context['preset']}` (batch {context['batch_size']} x seq {context['seq_len']}, {context['precision']}), "
        f"{context['steps']} timed steps per activation after {context['warmup']} warm-up rounds, interleaved in one process.",
        f"Machine: {context['host']}, {context['cpu_threads']} torch threads; torch {context['torch']}, polycom {context['polycom']} "
        f"({context['git_commit']}); {context['timestamp']}.",
        "",
        f"Ratio = median over rounds of (step time / {baseline} step time in the same round); p20/p80 of wall step time in brackets. "
        "CPU ratio: the same with process CPU time, which other processes' load does not inflate (the robust number on a "
        "shared machine when torch uses 1 thread; with more threads it also counts their spin-waiting).",
        "",
        "| activation | FFN | hidden | params | wall step time (s) [p20, p80] | tokens/s | ratio vs " + baseline + " | ratio of medians | CPU step time (s) | CPU ratio | saved for backward (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if r["ratio_vs_baseline"] is None else f"{r['ratio_vs_baseline']:.3f}"
        rom = "-" if r["ratio_of_medians"] is None else f"{r['ratio_of_medians']:.3f}"
        cpu = "-" if r["cpu_ratio_vs_baseline"] is None else f"{r['cpu_ratio_vs_baseline']:.3f}"
        lines.append(
            f"| {r['activation']} | {r['ffn']} | {r['intermediate_size']} | {r['parameters'] / 1e6:.3f}M | "
            f"{r['step_time_s']:.4f} [{r['step_time_p20_s']:.4f}, {r['step_time_p80_s']:.4f}] | {r['tokens_per_s']:,.0f} | {ratio} | {rom} | {r['cpu_step_time_s']:.4f} | {cpu} | {r['saved_for_backward_mb']:.1f} |"
        )
    lines += ["", "Load from other processes on a shared machine inflates absolute times; the interleaved ratios are the comparable numbers.", ""]
    return "\n".join(lines)


def write_results(rows: List[Dict], out_dir: Path, context: Dict, baseline: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "training.csv"
    existing = csv_path.read_text() if csv_path.is_file() else ""
    if existing and not existing.startswith(",".join(CSV_FIELDS)):
        existing = ""  # an old layout: start a fresh file rather than mixing columns
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    if not existing:
        writer.writeheader()
    for row in rows:
        writer.writerow({**context, **row})
    atomic_write_text(csv_path, existing + buffer.getvalue())
    atomic_write_text(out_dir / "training.md", _markdown(rows, context, baseline))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="preset name or TOML path (default: tiny)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--activations", default=DEFAULT_ACTIVATIONS, help=f"comma-separated (default: {DEFAULT_ACTIVATIONS})")
    parser.add_argument("--baseline", default="swiglu", help="activation the ratios are relative to")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per activation")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the config's / torch default)")
    parser.add_argument("--out", default="bench", help="folder for training.csv and training.md (default: bench)")


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError

    if args.steps < 1 or args.warmup < 0:
        raise UserError("--steps must be >= 1 and --warmup >= 0")
    config = load_config(args.config, args.overrides)
    if args.threads:
        config.train.num_threads = args.threads
    activations = [a.strip() for a in args.activations.split(",") if a.strip()]
    for name in activations:
        probe = RunConfig.from_dict(config.to_dict())
        probe.model.activation = name
        probe.model.validate()
    rows = benchmark_training(config, activations, steps=args.steps, warmup=args.warmup, baseline=args.baseline,
                              preset=args.config, progress=True)
    context = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": f"{platform.node() or 'unknown'} ({platform.machine()}, {os.cpu_count()} cpus)",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "polycom": __version__,
        "git_commit": _git_commit(),
        "preset": Path(args.config).stem,
        "precision": config.train.precision,
        "batch_size": config.train.batch_size,
        "seq_len": config.train.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    write_results(rows, Path(args.out), context, args.baseline)
    print(_markdown(rows, context, args.baseline))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB; wrote {Path(args.out) / 'training.csv'} and {Path(args.out) / 'training.md'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="polycom bench training", description="training tokens/s and step time per activation")
    add_arguments(parser)
    args = parser.parse_args(argv)
    from ..cli import guarded

    return guarded(lambda: run(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
