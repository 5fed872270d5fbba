"""Measurement plumbing shared by the op benchmarks: timed rounds, saved bytes, machine key,
CSV append and markdown, all written atomically.

Timing protocol (one process, so ratios compare like with like on a shared machine):
warm-up calls first (compilation happens there), then rounds; in every round each case
runs once, forward timed, then backward timed, in an order that rotates every round, so a
burst of load from other processes hits all cases alike. Per case we report the median
and the 20th/80th percentiles over rounds of forward, backward and forward+backward (the
per-round sum). Ratios between two cases are the median over rounds of the per-round
ratio, which survives a slow round better than a ratio of medians.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..utils.io import atomic_write_text

__all__ = ["Timed", "quantile", "time_rounds", "saved_bytes", "machine_info", "append_csv"]


@dataclass
class Timed:
    """Per-round forward and backward seconds of one case."""

    forward: List[float] = field(default_factory=list)
    backward: List[float] = field(default_factory=list)

    @property
    def total(self) -> List[float]:
        return [f + b for f, b in zip(self.forward, self.backward)]


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(seconds: Sequence[float]) -> Dict[str, float]:
    """Median, p20 and p80 in milliseconds."""
    return {
        "median_ms": statistics.median(seconds) * 1e3,
        "p20_ms": quantile(seconds, 0.2) * 1e3,
        "p80_ms": quantile(seconds, 0.8) * 1e3,
    }


def _run_once(forward: Callable[[], torch.Tensor], grad_output: torch.Tensor, leaves: Sequence[torch.Tensor]) -> Tuple[float, float]:
    start = time.perf_counter()
    output = forward()
    middle = time.perf_counter()
    output.backward(grad_output)
    end = time.perf_counter()
    del output
    for leaf in leaves:
        leaf.grad = None
    return middle - start, end - middle


def time_rounds(
    cases: Dict[str, Tuple[Callable[[], torch.Tensor], Sequence[torch.Tensor]]],
    grad_output: torch.Tensor,
    warmup: int,
    repeats: int,
    min_repeats: int = 3,
    budget_s: Optional[float] = None,
) -> Tuple[Dict[str, Timed], Dict[str, float]]:
    """Interleaved timing of several cases that share one input shape.

    ``cases`` maps a name to ``(forward, leaves)``: ``forward()`` returns the output whose
    backward is timed with ``grad_output``; ``leaves`` get their ``.grad`` cleared after
    each call. Returns per-case timings and the seconds the first (warm-up) call took,
    which includes compilation for compiled cases. After ``min_repeats`` rounds, stops
    early once ``budget_s`` seconds of timed rounds have been spent.
    """
    first_call = {}
    for name, (forward, leaves) in cases.items():
        start = time.perf_counter()
        for _ in range(max(warmup, 1)):
            _run_once(forward, grad_output, leaves)
        first_call[name] = time.perf_counter() - start
    timings = {name: Timed() for name in cases}
    names = list(cases)
    started = time.perf_counter()
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            forward, leaves = cases[name]
            f, b = _run_once(forward, grad_output, leaves)
            timings[name].forward.append(f)
            timings[name].backward.append(b)
        if budget_s is not None and round_index + 1 >= min_repeats and time.perf_counter() - started > budget_s:
            break
    return timings, first_call


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator/denominator (both measured in the same round)."""
    pairs = [n / d for n, d in zip(numerator, denominator) if d > 0]
    return statistics.median(pairs) if pairs else float("nan")


def saved_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``forward`` runs.

    torch.autograd.graph.saved_tensors_hooks sees every tensor saved for backward (also
    inside compiled graphs); a storage saved by several ops is counted once.
    """
    storages: Dict[Tuple[int, str], int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), str(tensor.device))] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    del output
    return sum(storages.values())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> Dict[str, object]:
    """What the results are keyed by besides shape and dtype."""
    from .. import __version__

    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.system()} {platform.machine()}",
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "polycom": __version__,
    }


def append_csv(path: Path, rows: List[Dict[str, object]], fields: Sequence[str]) -> None:
    """Append rows to a CSV atomically (temp file in the same folder + rename).

    A file with another header is kept as ``<name>.old.csv`` rather than mixed with the new
    columns.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    header = ",".join(fields)
    if existing and existing.splitlines()[0] != header:
        atomic_write_text(path.with_suffix(".old.csv"), existing)
        existing = ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    if not existing:
        writer.writeheader()
    for row in rows:
        writer.writerow({key: _format(value) for key, value in row.items()})
    atomic_write_text(path, existing + buffer.getvalue())


def _format(value: object) -> object:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
