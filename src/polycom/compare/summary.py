"""From the sweep database to ``summary.json``: per-run figures, per-activation means with
95% intervals, per-candidate comparisons against the baseline, and the verdict.

Built from the database alone (runs, metrics, measurements), so ``polycom report DIR``
gives the same numbers as the sweep that wrote it.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from . import stats
from .config import Thresholds
from .db import DONE_STATUSES, SweepDB
from .verdict import decide_all, display_name

# Headline figures aggregated per activation (mean and 95% CI over seeds).
HEADLINE_FIGURES = ("final_val_loss", "final_val_ppl", "tokens_per_s", "step_time_s", "peak_rss_mb", "prefill_ms",
                    "decode_ms_per_token", "saved_bytes_per_ffn_activation", "tokens_to_target",
                    "mean_effective_rank", "mean_adjacent_similarity", "grad_norm_max", "loss_spikes")


def _f(x) -> Optional[float]:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def run_record(db: SweepDB, row: Dict[str, Any], latency: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Per-run figures (the ``runs`` entries of summary.json)."""
    summary = row.get("summary") or {}
    meas = dict(row.get("measurements") or {})
    meas.update(latency or {})
    params = row.get("params") or {}
    tokens, losses = db.eval_curve(row["id"])
    train = db.metrics(row["id"], "train")
    events = [r for r in db.metrics(row["id"]) if r.get("kind") == "event"]
    final_val = _f(summary.get("final_val_loss"))
    if final_val is None and losses:
        final_val = losses[-1]
    grad = stats.summarize_grad_norms([r.get("grad_norm") for r in train])
    ranks = meas.get("effective_rank")
    peak = _f(summary.get("peak_rss_mb_run")) or _f(summary.get("peak_rss_mb"))
    rss_start = _f(summary.get("rss_at_start_mb"))
    event_counts: Dict[str, int] = {}
    for e in events:
        name = str(e.get("event"))
        event_counts[name] = event_counts.get(name, 0) + 1
    return {
        "activation": row["activation"],
        "seed": row["seed"],
        "status": row["status"],
        "stop_reason": row.get("stop_reason"),
        "error": row.get("error"),
        "final_val_loss": final_val,
        "final_val_ppl": math.exp(final_val) if final_val is not None and final_val < 50 else None,
        "final_train_loss": _f(summary.get("final_train_loss")) or (_f(train[-1].get("loss")) if train else None),
        "tokens_seen": _f(summary.get("tokens_seen")) or (tokens[-1] if tokens else None),
        "final_eval_tokens": tokens[-1] if tokens else None,
        "tokens_to_target": None,  # filled in by build_summary (needs the baseline)
        "tokens_per_s": _f(summary.get("tokens_per_s")),
        "step_time_s": _f(summary.get("step_time_s")),
        "step_time_interleaved_s": _f(meas.get("step_time_interleaved_s")),
        "step_time_paired_ratio": _f(meas.get("step_time_paired_ratio")),
        "train_wall_s": _f(summary.get("wall_time_s")) or (_f(train[-1].get("wall_time_s")) if train else None),
        "peak_rss_mb": peak,
        "rss_at_start_mb": rss_start,
        "params": params.get("total"),
        "params_detail": {k: v for k, v in params.items() if k != "flops_per_token"} or None,
        "ffn_params": params.get("ffn"),
        "flops_per_token": params.get("flops_per_token"),
        "prefill_ms": _f(meas.get("prefill_ms")),
        "decode_ms_per_token": _f(meas.get("decode_ms_per_token")),
        "latency_detail": {k: meas.get(k) for k in ("prefill_ms_p20", "prefill_ms_p80", "decode_ms_per_token_p20",
                                                    "decode_ms_per_token_p80", "prompt_tokens", "decode_tokens", "repeats")},
        "saved_bytes_per_ffn_activation": _f(meas.get("saved_bytes_per_ffn_activation")),
        "saved_bytes_ratio": _f(meas.get("saved_bytes_ratio")),
        "effective_rank": ranks,
        "mean_effective_rank": float(sum(r for r in ranks if r is not None) / len(ranks)) if ranks else None,
        "effective_rank_detail": meas.get("effective_rank_detail"),
        "layer_similarity": meas.get("layer_similarity"),
        "adjacent_similarity": meas.get("adjacent_similarity"),
        "mean_adjacent_similarity": _f(meas.get("mean_adjacent_similarity")),
        "coefficients": meas.get("coefficients"),
        "grad_norm": grad,
        "grad_norm_max": grad.get("max"),
        "loss_spikes": event_counts.get("spike", 0),
        "nonfinite_events": event_counts.get("nonfinite", 0),
        "rollbacks": event_counts.get("rollback", 0),
        "events": event_counts,
        "measured": bool(row.get("measured_at")),
        "out_dir": row.get("out_dir"),
        "git_commit": (row.get("meta") or {}).get("git_commit"),
        "torch_version": (row.get("meta") or {}).get("torch"),
        "started_at": row.get("started_at"),
        "finished_at": row.get("finished_at"),
        "attempts": row.get("attempts"),
    }


def _by_seed(runs: List[Dict[str, Any]], activation: str, key: str, statuses=("finished",)) -> Dict[int, float]:
    return {r["seed"]: r[key] for r in runs
            if r["activation"] == activation and r["status"] in statuses and r.get(key) is not None}


def _mean(values) -> Optional[float]:
    xs = [v for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def compare_candidate(runs: List[Dict[str, Any]], baseline: str, activation: str, futility_margin: Optional[float]) -> Dict[str, Any]:
    """One candidate against the baseline (the ``comparisons`` entries of summary.json)."""
    mine = [r for r in runs if r["activation"] == activation]
    base_loss = _by_seed(runs, baseline, "final_val_loss")
    cand_loss = _by_seed(runs, activation, "final_val_loss")
    test = stats.compare_final_losses(cand_loss, base_loss)

    # Tokens to target: per seed, baseline budget tokens / candidate tokens to reach the
    # baseline's final loss (same seed where it exists).
    speedups, reached, n_finished = [], 0, 0
    for r in mine:
        if r["status"] != "finished":
            continue
        n_finished += 1
        base = next((b for b in runs if b["activation"] == baseline and b["seed"] == r["seed"] and b["status"] == "finished"), None)
        base_tokens = base["final_eval_tokens"] if base else _mean(b["final_eval_tokens"] for b in runs if b["activation"] == baseline and b["status"] == "finished")
        if r.get("tokens_to_target") is not None and base_tokens:
            reached += 1
            speedups.append(base_tokens / r["tokens_to_target"])
    all_reached = n_finished > 0 and reached == n_finished
    speed_ci = stats.mean_ci(speedups) if all_reached else {"mean": None, "ci95": None}
    # Step-time ratio from the interleaved timing session where every run has one (robust to
    # load that changed between the sequential runs), else from the runs' own medians.
    # Best: the per-round paired ratio of that session (load shared by both sides cancels).
    done = [r for r in runs if r["status"] in DONE_STATUSES]
    if done and all(r.get("step_time_paired_ratio") for r in done):
        step_key = "step_time_paired_ratio"
    elif all(r.get("step_time_interleaved_s") for r in done):
        step_key = "step_time_interleaved_s"
    else:
        step_key = "step_time_s"
    step_ratio = stats.ratio(_mean(r[step_key] for r in mine if r["status"] in DONE_STATUSES),
                             _mean(r[step_key] for r in runs if r["activation"] == baseline and r["status"] in DONE_STATUSES))

    def ratio_of(key):
        return stats.ratio(_mean(r[key] for r in mine if r["status"] in DONE_STATUSES),
                           _mean(r[key] for r in runs if r["activation"] == baseline and r["status"] in DONE_STATUSES))

    tokens_speedup = speed_ci["mean"]
    stopped = [r for r in mine if r["status"] == "stopped"]
    diverged = [r for r in mine if r["status"] == "diverged"]
    failed = [r for r in mine if r["status"] == "failed"]
    return {
        "activation": activation,
        "n_seeds": len(cand_loss),
        "seeds": sorted(cand_loss),
        "val_loss_delta": test["delta"],
        "ci95": test["ci95"],
        "p_value": test["p_value"],
        "test": test["test"],
        "note": test["note"],
        "reached": f"{reached}/{n_finished}",
        "tokens_to_target": _mean(r["tokens_to_target"] for r in mine if r["status"] == "finished") if all_reached else None,
        "tokens_to_target_speedup": tokens_speedup,
        "tokens_to_target_speedup_ci95": speed_ci["ci95"],
        "step_time_ratio": step_ratio,
        "step_time_source": {"step_time_paired_ratio": "interleaved session, median of per-round ratios",
                             "step_time_interleaved_s": "interleaved session"}.get(step_key, "run medians"),
        "throughput_ratio": ratio_of("tokens_per_s"),
        "memory_ratio": ratio_of("peak_rss_mb"),
        "saved_bytes_ratio": ratio_of("saved_bytes_per_ffn_activation"),
        "prefill_ratio": ratio_of("prefill_ms"),
        "decode_ratio": ratio_of("decode_ms_per_token"),
        "params_ratio": ratio_of("params"),
        "wall_clock_speedup": stats.wall_clock_speedup(tokens_speedup, step_ratio),
        "stopped": bool(stopped),
        "stop_reasons": [r["stop_reason"] or "stopped early" for r in stopped],
        "diverged": bool(diverged),
        "failed": bool(failed),
        "errors": [f"seed {r['seed']}: {r['error'] or r['status']}" for r in diverged + failed],
        "futility_margin": futility_margin,
    }


def _config_params(run_cfg: Dict[str, Any]) -> Optional[float]:
    """Baseline parameter count from the config alone (before any run has finished)."""
    try:
        from ..config import RunConfig
        from ..model import count_parameters

        cfg = RunConfig.from_dict(run_cfg)
        return float(count_parameters(cfg.model, cfg.model.vocab_size or cfg.data.vocab_size)["total"])
    except Exception:
        return None


def limits_of_evidence(cfg: Dict[str, Any], runs: List[Dict[str, Any]], meta: Dict[str, Any]) -> List[str]:
    run_cfg = cfg.get("run") or {}
    model, train, data = run_cfg.get("model", {}), run_cfg.get("train", {}), run_cfg.get("data", {})
    params = _mean(r["params"] for r in runs if r.get("params")) or _config_params(run_cfg)
    tokens = (train.get("max_steps", 0) * train.get("batch_size", 0) * train.get("seq_len", 0)
              * train.get("grad_accum_steps", 1)) or _mean(r["tokens_seen"] for r in runs if r.get("tokens_seen"))
    n_seeds = len(cfg.get("seeds") or [])
    out = [
        f"Scale: ~{(params or 0) / 1e6:.1f}M parameters ({model.get('n_layers')} layers, d_model {model.get('d_model')}), "
        f"{(tokens or 0) / 1e6:.2f}M training tokens per run; the paper's claims are at 1B parameters and 250B tokens. "
        "Small, short runs favour whatever learns fastest early; effects may shrink, grow or reverse at scale.",
        f"Seeds: {n_seeds}. " + ("With one seed no confidence interval or p-value can be given; seed-to-seed noise "
                                 "at this scale can be as large as the differences measured." if n_seeds < 2 else
                                 "Intervals are t-intervals over seeds; with few seeds they are wide."),
        f"Data: {data.get('corpus')} ({data.get('tokenizer')} tokenizer, vocabulary {model.get('vocab_size') or data.get('vocab_size')}); "
        "one small corpus, validation loss only, no downstream tasks.",
        f"Cost: CPU ({meta.get('cpu_threads')} thread{'' if meta.get('cpu_threads') == 1 else 's'}, {meta.get('platform', '?')}); step times are medians after warm-up, "
        "latencies medians of one interleaved session. On a shared machine step-time ratios carry noise of several percent; "
        "GPU kernels would change the cost picture.",
    ]
    starts = [r["rss_at_start_mb"] for r in runs if r.get("rss_at_start_mb") is not None]
    retained = (max(starts) - min(starts)) if len(starts) > 1 else None
    out.append(
        "Memory: peak RSS is the peak of the one sweep process during each run; freed memory is returned to the OS "
        "before each run, but memory retained from earlier runs raises later runs' figures"
        + (f" (here the resident size at a run's start grew by up to {retained:.0f} MiB over the sweep)" if retained else "")
        + ". Bytes saved for backward per FFN activation are exact and order-independent: prefer them for the "
        "activation's own memory cost."
    )
    return out


def build_summary(db: SweepDB) -> Dict[str, Any]:
    cfg_dict = db.get("compare_config")
    if not cfg_dict:
        from ..errors import UserError

        raise UserError(f"{db.path} has no compare config; was it written by `polycom compare`?")
    meta = db.get("meta", {}) or {}
    baseline = cfg_dict["activations"][0]
    wanted = [(a, s) for a in cfg_dict["activations"] for s in cfg_dict["seeds"]]
    rows = {(r["activation"], r["seed"]): r for r in db.runs()}
    latency = db.latest_latency()
    runs = [run_record(db, rows[k], latency.get(rows[k]["id"])) for k in wanted if k in rows]

    # Tokens to target: first point each run's validation curve reaches the baseline's
    # final validation loss (same seed; else the baseline mean).
    base_final = _by_seed(runs, baseline, "final_val_loss")
    base_mean = _mean(base_final.values())
    for r, key in zip(runs, [k for k in wanted if k in rows]):
        target = base_final.get(r["seed"], base_mean)
        r["target_val_loss"] = target
        if target is None or r["status"] not in DONE_STATUSES:
            continue
        tokens, losses = db.eval_curve(rows[key]["id"])
        r["tokens_to_target"] = stats.tokens_to_target(tokens, losses, target)

    per_activation = {}
    for a in cfg_dict["activations"]:
        mine = [r for r in runs if r["activation"] == a and r["status"] == "finished"]
        per_activation[a] = {fig: stats.mean_ci([r.get(fig) for r in mine]) for fig in HEADLINE_FIGURES}
        per_activation[a]["n_finished"] = len(mine)

    thresholds = Thresholds(**cfg_dict.get("thresholds", {}))
    margin = (cfg_dict.get("futility") or {}).get("margin")
    comparisons = [compare_candidate(runs, baseline, a, margin) for a in cfg_dict["activations"][1:]]
    verdict = decide_all(comparisons, baseline, thresholds)
    incomplete = [f"{r['activation']} seed {r['seed']} ({r['status']})" for r in runs if r["status"] not in DONE_STATUSES or not r["measured"]]
    missing = [f"{a} seed {s} (not started)" for a, s in wanted if (a, s) not in rows]
    return {
        "baseline": baseline,
        "baseline_display": display_name(baseline),
        "activations": cfg_dict["activations"],
        "seeds": cfg_dict["seeds"],
        "runs": runs,
        "per_activation": per_activation,
        "comparisons": comparisons,
        "verdict": verdict,
        "thresholds": cfg_dict.get("thresholds"),
        "futility": cfg_dict.get("futility"),
        "measure": cfg_dict.get("measure"),
        "limits": limits_of_evidence(cfg_dict, runs, meta),
        "incomplete_runs": incomplete + missing,
        "config": cfg_dict,
        "meta": meta,
        "created_at": db.get("created_at"),
    }
