"""Statistics for the pilot: intervals over seeds, tests against the baseline, speedups.

Everything here is a small pure function on plain numbers so it can be checked by hand
(tests/test_stats.py does). Conventions:

- A 95% confidence interval of a mean over n seeds uses Student's t with n - 1 degrees of
  freedom: mean +- t_{0.975, n-1} * s / sqrt(n). With one seed there is no spread to
  estimate, so the interval is ``None`` and a note says so plainly.
- Candidate against baseline: Welch's t-test (unequal variances, Welch-Satterthwaite
  degrees of freedom) on final validation losses; where both arms ran the same seeds
  (same data order, same init seed) the paired t-test on per-seed differences is used
  instead, because pairing removes the seed-to-seed variation both arms share.
- Tokens to target: the first point at which a validation-loss curve reaches a target,
  linearly interpolated between the two evaluations that bracket it.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import stats as _scipy_stats

NO_INTERVAL_NOTE = "1 seed: no confidence interval or p-value can be given"


def _clean(values: Sequence[Optional[float]]) -> List[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_ci(values: Sequence[Optional[float]], confidence: float = 0.95) -> Dict:
    """Mean and t-interval of ``values`` (``None``/non-finite entries are dropped).

    Returns ``{"mean", "ci95": [lo, hi] | None, "n", "std", "note"}``; ``note`` explains a
    missing interval (one value, or none at all).
    """
    xs = _clean(values)
    n = len(xs)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0, "std": None, "note": "no values"}
    mean = float(np.mean(xs))
    if n == 1:
        return {"mean": mean, "ci95": None, "n": 1, "std": None, "note": NO_INTERVAL_NOTE}
    std = float(np.std(xs, ddof=1))
    half = float(_scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n, "std": std, "note": None}


def welch_test(candidate: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> Dict:
    """Difference of means (candidate - baseline) with Welch's CI and two-sided p-value.

    Needs at least two values per arm; otherwise ``ci95`` and ``p_value`` are ``None`` and
    ``note`` says why. Zero variance in both arms gives ``p_value`` None (undefined).
    """
    a, b = _clean(candidate), _clean(baseline)
    if not a or not b:
        return {"delta": None, "ci95": None, "p_value": None, "df": None, "test": None, "note": "missing values"}
    delta = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return {"delta": delta, "ci95": None, "p_value": None, "df": None, "test": None, "note": NO_INTERVAL_NOTE}
    va, vb = float(np.var(a, ddof=1)), float(np.var(b, ddof=1))
    se2 = va / len(a) + vb / len(b)
    if se2 == 0.0:
        return {"delta": delta, "ci95": [delta, delta], "p_value": None, "df": None, "test": "welch", "note": "no variance in either arm"}
    # Welch-Satterthwaite degrees of freedom.
    df = se2**2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    half = float(_scipy_stats.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(se2)
    p = float(_scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)
    return {"delta": delta, "ci95": [delta - half, delta + half], "p_value": p, "df": float(df), "test": "welch", "note": None}


def paired_test(candidate: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> Dict:
    """Paired t-test on per-seed differences (candidate_i - baseline_i), same order."""
    if len(candidate) != len(baseline):
        raise ValueError(f"paired test needs equal lengths, got {len(candidate)} and {len(baseline)}")
    pairs = [(float(c), float(b)) for c, b in zip(candidate, baseline)
             if c is not None and b is not None and math.isfinite(float(c)) and math.isfinite(float(b))]
    if not pairs:
        return {"delta": None, "ci95": None, "p_value": None, "df": None, "test": None, "note": "missing values"}
    diffs = [c - b for c, b in pairs]
    delta = float(np.mean(diffs))
    n = len(diffs)
    if n < 2:
        return {"delta": delta, "ci95": None, "p_value": None, "df": None, "test": None, "note": NO_INTERVAL_NOTE}
    sd = float(np.std(diffs, ddof=1))
    if sd == 0.0:
        return {"delta": delta, "ci95": [delta, delta], "p_value": None, "df": n - 1, "test": "paired", "note": "identical differences on every seed"}
    half = float(_scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    p = float(_scipy_stats.ttest_rel([c for c, _ in pairs], [b for _, b in pairs]).pvalue)
    return {"delta": delta, "ci95": [delta - half, delta + half], "p_value": p, "df": n - 1, "test": "paired", "note": None}


def compare_final_losses(candidate_by_seed: Dict[int, float], baseline_by_seed: Dict[int, float]) -> Dict:
    """Paired test where the two arms share at least two seeds, Welch's test otherwise."""
    shared = sorted(set(candidate_by_seed) & set(baseline_by_seed))
    if len(shared) >= 2 and len(shared) == len(candidate_by_seed) == len(baseline_by_seed):
        return paired_test([candidate_by_seed[s] for s in shared], [baseline_by_seed[s] for s in shared])
    return welch_test(list(candidate_by_seed.values()), list(baseline_by_seed.values()))


def interpolate_at(xs: Sequence[float], ys: Sequence[float], x: float) -> Optional[float]:
    """Value of the piecewise-linear curve (xs ascending) at ``x``; None outside its range."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def tokens_to_target(tokens: Sequence[float], losses: Sequence[float], target: float) -> Optional[float]:
    """Tokens at which the loss curve first reaches ``target`` (loss <= target).

    Linear interpolation between the last evaluation above the target and the first at or
    below it. Returns None when the curve never reaches the target ("not reached").
    The curve starts wherever the first evaluation is; if that one is already at or
    below the target its token count is returned.
    """
    if len(tokens) != len(losses):
        raise ValueError("tokens and losses must have the same length")
    prev_t = prev_l = None
    for t, loss in zip(tokens, losses):
        if loss is None or not math.isfinite(loss):
            prev_t = prev_l = None
            continue
        if loss <= target:
            if prev_t is None or prev_l == loss:
                return float(t)
            # Fraction of the way from the previous evaluation to this one where the line crosses.
            frac = (prev_l - target) / (prev_l - loss)
            return float(prev_t + frac * (t - prev_t))
        prev_t, prev_l = t, loss
    return None


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    """numerator / denominator, None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)


def wall_clock_speedup(tokens_speedup: Optional[float], step_time_ratio: Optional[float]) -> Optional[float]:
    """Time-to-same-quality speedup: fewer tokens needed, each step possibly slower.

    With equal tokens per step, time to target = steps_to_target * step_time, so the
    speedup is (baseline tokens / candidate tokens) / (candidate step / baseline step).
    """
    if tokens_speedup is None or step_time_ratio is None or step_time_ratio <= 0:
        return None
    return tokens_speedup / step_time_ratio


def geometric_mean(values: Sequence[Optional[float]]) -> Optional[float]:
    xs = [v for v in _clean(values) if v > 0]
    if not xs:
        return None
    return float(math.exp(np.mean(np.log(xs))))


def summarize_grad_norms(grad_norms: Sequence[float], spike_factor: float = 3.0, window: int = 20) -> Dict:
    """Statistics of a gradient-norm series and the number of spikes.

    A spike is a step whose norm exceeds ``spike_factor`` x the median of the previous
    ``window`` steps (the first ``window`` steps only set the reference).
    """
    xs = [float(g) for g in grad_norms if g is not None]
    finite = [g for g in xs if math.isfinite(g)]
    out = {"n": len(xs), "nonfinite": len(xs) - len(finite), "mean": None, "median": None,
           "p95": None, "max": None, "std": None, "spikes": 0}
    if not finite:
        return out
    arr = np.asarray(finite)
    out.update(mean=float(arr.mean()), median=float(np.median(arr)), p95=float(np.percentile(arr, 95)),
               max=float(arr.max()), std=float(arr.std(ddof=1)) if len(arr) > 1 else 0.0)
    spikes = 0
    for i in range(window, len(finite)):
        if finite[i] > spike_factor * float(np.median(finite[i - window:i])):
            spikes += 1
    out["spikes"] = spikes
    return out


def band(curves: Sequence[Tuple[Sequence[float], Sequence[float]]]) -> Optional[Dict]:
    """Mean and min/max of several (x, y) curves on the x grid of the first one (for seed bands)."""
    curves = [(list(x), list(y)) for x, y in curves if len(x) > 0]
    if not curves:
        return None
    grid = curves[0][0]
    lo = min(max(c[0][0] for c in curves), grid[-1])
    hi = min(c[0][-1] for c in curves)
    grid = [g for g in grid if lo <= g <= hi] or grid
    stacked = np.asarray([np.interp(grid, x, y) for x, y in curves])
    return {"x": grid, "mean": stacked.mean(axis=0).tolist(), "min": stacked.min(axis=0).tolist(),
            "max": stacked.max(axis=0).tolist(), "n": len(curves)}
