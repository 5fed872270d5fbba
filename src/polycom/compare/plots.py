"""The report's figures, drawn with matplotlib's Agg backend (no display needed) from the
sweep database and the summary. Each function writes one PNG and returns its path, or
None when there is nothing to draw (e.g. coefficient trajectories without a PolyCom run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import stats  # noqa: E402
from .db import SweepDB  # noqa: E402
from .verdict import display_name  # noqa: E402

DPI = 110
COLORS = ["#4c4c4c", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _color(activations: List[str], activation: str) -> str:
    return COLORS[activations.index(activation) % len(COLORS)] if activation in activations else "#000000"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _smooth(values: List[float], window: int = 5) -> List[float]:
    """Trailing mean over up to ``window`` points (no padding, so the start is not biased)."""
    return [float(np.mean(values[max(0, i - window + 1): i + 1])) for i in range(len(values))]


def _run_curves(db: SweepDB, summary: Dict[str, Any]):
    """(activation, seed, train records, eval records) per run in the summary."""
    rows = {(r["activation"], r["seed"]): r for r in db.runs()}
    out = []
    for run in summary["runs"]:
        row = rows.get((run["activation"], run["seed"]))
        if row is None:
            continue
        train = [r for r in db.metrics(row["id"], "train") if r.get("loss") is not None]
        evals = [r for r in db.metrics(row["id"], "eval") if r.get("val_loss") is not None]
        coeffs = db.metrics(row["id"], "coeffs")
        out.append((run["activation"], run["seed"], train, evals, coeffs))
    return out


def plot_loss(db: SweepDB, summary: Dict[str, Any], path: Path, x_key: str) -> Optional[Path]:
    """Training loss (smoothed, thin) and validation loss (markers) against tokens or wall time."""
    acts = summary["activations"]
    curves = _run_curves(db, summary)
    if not any(t or e for _, _, t, e, _ in curves):
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8))
    scale = 1e6 if x_key == "tokens" else 1.0
    labelled = set()
    n_seeds = len(summary["seeds"])
    for act, seed, train, evals, _ in curves:
        c = _color(acts, act)
        label = None if act in labelled else (f"{display_name(act)} ({n_seeds} seeds)" if n_seeds > 1 else display_name(act))
        labelled.add(act)
        tx = [r.get(x_key) for r in train]
        if train and all(x is not None for x in tx):
            ax.plot(np.asarray(tx) / scale, _smooth([r["loss"] for r in train]), color=c, alpha=0.35, lw=1)
        ex = [r.get(x_key) for r in evals]
        if evals and all(x is not None for x in ex):
            ax.plot(np.asarray(ex) / scale, [r["val_loss"] for r in evals], color=c, marker="o", ms=3, lw=1.6, label=label)
    ax.set_xlabel("training tokens (millions)" if x_key == "tokens" else "training wall time (s, evaluation excluded)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss: validation (lines with markers) and training (faint, smoothed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _zoom_y(ax, [r["val_loss"] for _, _, _, e, _ in curves for r in e])
    return _save(fig, path)


def _zoom_y(ax, values: List[float]) -> None:
    """Clip the y range to the informative part (the first evaluations are far above)."""
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if len(vals) < 3:
        return
    lo, hi = min(vals), float(np.percentile(vals, 90))
    if hi > lo:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.25 * (hi - lo))


def plot_val_bands(db: SweepDB, summary: Dict[str, Any], path: Path) -> Optional[Path]:
    """Validation loss per activation: mean over seeds with a min-max band."""
    acts = summary["activations"]
    curves = _run_curves(db, summary)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    drawn = False
    all_vals = []
    for act in acts:
        per_seed = [([r["tokens"] for r in e], [r["val_loss"] for r in e]) for a, _, _, e, _ in curves if a == act and e]
        b = stats.band(per_seed)
        if not b:
            continue
        drawn = True
        x = np.asarray(b["x"]) / 1e6
        c = _color(acts, act)
        ax.plot(x, b["mean"], color=c, lw=1.8, label=f"{display_name(act)} (n={b['n']})")
        if b["n"] > 1:
            ax.fill_between(x, b["min"], b["max"], color=c, alpha=0.2)
        all_vals.extend(b["mean"])
    if not drawn:
        plt.close(fig)
        return None
    base = summary["baseline"]
    target = (summary["per_activation"].get(base, {}).get("final_val_loss") or {}).get("mean")
    if target is not None:
        ax.axhline(target, color="#4c4c4c", ls="--", lw=1, label=f"{display_name(base)} final (target)")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats/token)")
    n_seeds = len(summary["seeds"])
    ax.set_title("Validation loss, mean over seeds" + (" with min-max band" if n_seeds > 1 else " (1 seed: no band)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _zoom_y(ax, all_vals)
    return _save(fig, path)


def _bars(ax, acts, values: Dict[str, Dict[str, Any]], title: str, ylabel: str, fmt: str = "{:.0f}") -> bool:
    names, means, lower, upper = [], [], [], []
    for a in acts:
        m = values.get(a) or {}
        if m.get("mean") is None:
            continue
        names.append(display_name(a))
        means.append(m["mean"])
        ci = m.get("ci95")
        # The interval, clipped at zero (these quantities are positive).
        lower.append(min(m["mean"] - ci[0], m["mean"]) if ci else 0.0)
        upper.append(ci[1] - m["mean"] if ci else 0.0)
    if not names:
        ax.set_visible(False)
        return False
    bars = ax.bar(names, means, yerr=[lower, upper] if any(upper) else None, capsize=4,
                  color=[_color(acts, a) for a in acts if (values.get(a) or {}).get("mean") is not None])
    for bar, v in zip(bars, means):
        ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    return True


def plot_throughput_memory(summary: Dict[str, Any], path: Path) -> Optional[Path]:
    acts, per = summary["activations"], summary["per_activation"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    drawn = [
        _bars(axes[0], acts, {a: per[a]["tokens_per_s"] for a in acts}, "Training throughput", "tokens/s"),
        _bars(axes[1], acts, {a: per[a]["peak_rss_mb"] for a in acts}, "Peak RSS during training", "MiB"),
        _bars(axes[2], acts, {a: _scaled(per[a]["saved_bytes_per_ffn_activation"], 1 / 2**20) for a in acts},
              "Saved for backward per FFN activation", "MiB", "{:.2f}"),
    ]
    if not any(drawn):
        plt.close(fig)
        return None
    fig.suptitle("Training cost (error bars: 95% CI over seeds where > 1 seed)", fontsize=10)
    return _save(fig, path)


def _scaled(m: Dict[str, Any], k: float) -> Dict[str, Any]:
    if not m or m.get("mean") is None:
        return {"mean": None}
    ci = m.get("ci95")
    return {"mean": m["mean"] * k, "ci95": [ci[0] * k, ci[1] * k] if ci else None}


def plot_latency(summary: Dict[str, Any], path: Path) -> Optional[Path]:
    acts, per = summary["activations"], summary["per_activation"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    m = summary.get("measure") or {}
    drawn = [
        _bars(axes[0], acts, {a: per[a]["prefill_ms"] for a in acts}, f"Prefill ({m.get('prompt_tokens', '?')}-token prompt, median)", "ms", "{:.1f}"),
        _bars(axes[1], acts, {a: per[a]["decode_ms_per_token"] for a in acts}, "Greedy decode with KV cache (median)", "ms / token", "{:.2f}"),
    ]
    if not any(drawn):
        plt.close(fig)
        return None
    fig.suptitle("Inference latency on CPU, batch 1", fontsize=10)
    return _save(fig, path)


def plot_effective_rank(summary: Dict[str, Any], path: Path) -> Optional[Path]:
    acts = summary["activations"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for act in acts:
        per_seed = [r["effective_rank"] for r in summary["runs"] if r["activation"] == act and r.get("effective_rank")]
        if not per_seed:
            continue
        arr = np.asarray([[v if v is not None else np.nan for v in ranks] for ranks in per_seed], dtype=float)
        mean = np.nanmean(arr, axis=0)
        layers = np.arange(len(mean))
        ax.plot(layers, mean, marker="o", color=_color(acts, act), label=display_name(act))
        if arr.shape[0] > 1:
            ax.fill_between(layers, arr.min(axis=0), arr.max(axis=0), color=_color(acts, act), alpha=0.2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("layer")
    ax.set_ylabel("effective rank (mean over FFN matrices)")
    ax.set_title("Effective rank of FFN weights, end of training\n(entropy of normalised singular values; higher = richer)", fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_layer_similarity(summary: Dict[str, Any], path: Path) -> Optional[Path]:
    acts = summary["activations"]
    mats = []
    for act in acts:
        per_seed = [np.asarray(r["layer_similarity"]) for r in summary["runs"] if r["activation"] == act and r.get("layer_similarity")]
        if per_seed:
            mats.append((act, np.mean(per_seed, axis=0)))
    if not mats:
        return None
    fig, axes = plt.subplots(1, len(mats), figsize=(3.3 * len(mats) + 1, 3.6), squeeze=False)
    im = None
    for ax, (act, mat) in zip(axes[0], mats):
        im = ax.imshow(mat, vmin=-0.2, vmax=1.0, cmap="viridis")
        ax.set_title(f"{display_name(act)}\nmean adjacent {np.mean(np.diag(mat, 1)):.3f}", fontsize=9)
        ticks = list(range(mat.shape[0]))
        ax.set_xticks(ticks, ["emb"] + [str(i) for i in ticks[1:]], fontsize=7)
        ax.set_yticks(ticks, ["emb"] + [str(i) for i in ticks[1:]], fontsize=7)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=6, color="white" if mat[i, j] < 0.6 else "black")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="cosine similarity")
    fig.suptitle("Layer-wise cosine similarity of hidden states (validation tokens; lower = layers differ more)", fontsize=10)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_coefficients(db: SweepDB, summary: Dict[str, Any], path: Path) -> Optional[Path]:
    """PolyCom coefficients per layer over training (first seed of each PolyCom activation)."""
    acts = summary["activations"]
    series = []
    for act, seed, _, _, coeffs in _run_curves(db, summary):
        if coeffs and not any(s[0] == act for s in series):
            series.append((act, seed, coeffs))
    if not series:
        return None
    n_layers = max(len(c.get("layers") or []) for _, _, cs in series for c in cs)
    if n_layers == 0:
        return None
    fig, axes = plt.subplots(len(series), n_layers, figsize=(3.0 * n_layers, 2.6 * len(series)), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for row, (act, seed, coeffs) in enumerate(series):
        tokens = np.asarray([c.get("tokens", c.get("step", 0)) for c in coeffs], dtype=float) / 1e6
        for layer in range(n_layers):
            ax = axes[row][layer]
            entries = [next((l for l in (c.get("layers") or []) if l.get("layer") == layer), None) for c in coeffs]
            if not any(entries):
                ax.set_visible(False)
                continue
            order = len(next(e for e in entries if e)["weight"])
            for j in range(order):
                ys = [e["weight"][j] if e else np.nan for e in entries]
                ax.plot(tokens, ys, ls=styles[j % len(styles)], color=_color(acts, act), label=f"a{order - j} (x^{order - j})")
            ax.plot(tokens, [e["bias"][0] if e else np.nan for e in entries], color="#999999", lw=1, label="a0 (bias)")
            ax.set_title(f"{display_name(act)} layer {layer}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if layer == 0:
                ax.set_ylabel("coefficient", fontsize=8)
                ax.legend(fontsize=6)
            if row == len(series) - 1:
                ax.set_xlabel("tokens (M)", fontsize=8)
    fig.suptitle("Learned PolyCom coefficients over training (init: a1..ar = 1/r, a0 = 0)", fontsize=10)
    return _save(fig, path)


def plot_grad_norms(db: SweepDB, summary: Dict[str, Any], path: Path) -> Optional[Path]:
    acts = summary["activations"]
    curves = _run_curves(db, summary)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    drawn = False
    labelled = set()
    for act, seed, train, _, _ in curves:
        pts = [(r["tokens"], r["grad_norm"]) for r in train if r.get("grad_norm") is not None and r.get("tokens") is not None]
        if not pts:
            continue
        drawn = True
        ax.plot(np.asarray([p[0] for p in pts]) / 1e6, [p[1] for p in pts], color=_color(acts, act), lw=1,
                label=None if act in labelled else display_name(act))
        labelled.add(act)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("gradient norm (before clipping)")
    ax.set_title("Stability: gradient norm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# name -> (title, drawer(db, summary, path)); the report embeds them in this order.
PLOTS: Dict[str, tuple] = {
    "loss_vs_tokens": ("Loss against training tokens", lambda db, s, p: plot_loss(db, s, p, "tokens")),
    "loss_vs_wall_time": ("Loss against training wall time", lambda db, s, p: plot_loss(db, s, p, "wall_time_s")),
    "val_loss_seed_bands": ("Validation loss with seed bands", lambda db, s, p: plot_val_bands(db, s, p)),
    "throughput_memory": ("Throughput and memory", lambda db, s, p: plot_throughput_memory(s, p)),
    "inference_latency": ("Inference latency", lambda db, s, p: plot_latency(s, p)),
    "effective_rank": ("Effective rank per layer", lambda db, s, p: plot_effective_rank(s, p)),
    "layer_similarity": ("Layer-similarity heat maps", lambda db, s, p: plot_layer_similarity(s, p)),
    "coefficients": ("PolyCom coefficient trajectories", lambda db, s, p: plot_coefficients(db, s, p)),
    "grad_norm": ("Gradient norm", lambda db, s, p: plot_grad_norms(db, s, p)),
}


def draw_all(db: SweepDB, summary: Dict[str, Any], out_dir: Path) -> Dict[str, Path]:
    """Draw every plot that has data into ``out_dir/plots``; returns name -> path."""
    folder = Path(out_dir) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    drawn = {}
    for name, (_, draw) in PLOTS.items():
        target = folder / f"{name}.png"
        tmp = folder / f".{name}.tmp.png"
        result = draw(db, summary, tmp)
        if result is not None:
            import os

            os.replace(tmp, target)
            drawn[name] = target
        elif target.exists():
            target.unlink()  # stale figure from an earlier render
    return drawn
