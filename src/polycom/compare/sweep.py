"""The sweep: one training run per (activation, seed), then measurements, all recorded in
the SQLite database of the output folder so that a re-run resumes where it stopped.

Order: every baseline run first (the futility rule and tokens-to-target need the
baseline's curve), then seed by seed each candidate. A run whose row says finished or
stopped and measured is skipped without touching it; a run interrupted during training
resumes from its checkpoint (``train(..., resume=True)``); a run interrupted during
measurement is measured again (measurements are read-only on the weights).

Every run of one seed gets the same data order and token budget: the workbench draws
batches deterministically from ``train.seed`` and all runs share ``train.max_steps``,
``batch_size``, ``seq_len`` and ``grad_accum_steps``. Parameters are matched by the
workbench (``model.ffn="auto"``: gated FFN for swiglu/geglu, plain FFN 3/2 as wide for
the rest); each run's parameter count is recorded.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import UserError
from . import stats
from .config import CompareConfig, config_fingerprint
from .db import DB_NAME, DONE_STATUSES, SweepDB, utc_now

RunRow = Dict[str, Any]


def run_dir_name(activation: str, seed: int) -> str:
    return f"{activation}-seed{seed}"


def run_config_for(cfg: CompareConfig, activation: str, seed: int):
    """The base run config with this run's activation and seed (ffn kind/width matched by
    the workbench from the activation)."""
    from ..config import RunConfig

    run = RunConfig.from_dict(copy.deepcopy(cfg.run.to_dict()))
    run.model.activation = activation
    run.train.seed = int(seed)
    return run.validate()


def run_order(cfg: CompareConfig) -> List[Tuple[str, int]]:
    order = [(cfg.baseline, s) for s in cfg.seeds]
    for seed in cfg.seeds:
        order.extend((a, seed) for a in cfg.candidates)
    return order


def budget_tokens(run_config) -> int:
    t = run_config.train
    return int(t.max_steps * t.batch_size * t.seq_len * t.grad_accum_steps)


# --------------------------------------------------------------------------- futility rule

@dataclass
class FutilityRule:
    """``should_stop`` callback for training: stop a candidate trailing the baseline.

    After each evaluation the candidate's validation loss at T tokens is compared with the
    baseline's validation-loss curve interpolated at T (the same seed's baseline where it
    exists, else the mean curve of all baseline seeds). Once T >= ``min_budget_share`` of
    the budget, a gap above ``margin`` (nats) stops the run with a reason that says so.
    """

    baseline_name: str
    baseline_tokens: List[float]
    baseline_losses: List[float]
    margin: float
    min_tokens: float
    baseline_label: str = ""
    reason: Optional[str] = None
    checks: List[Dict[str, float]] = field(default_factory=list)

    def __call__(self, record: Dict[str, Any]) -> Optional[str]:
        tokens, val = record.get("tokens"), record.get("val_loss")
        if tokens is None or val is None or not self.baseline_tokens:
            return None
        if tokens < self.min_tokens:
            return None
        # Past the baseline's last evaluation, hold its final value.
        at = min(float(tokens), self.baseline_tokens[-1])
        base = stats.interpolate_at(self.baseline_tokens, self.baseline_losses, at)
        if base is None:
            return None
        gap = float(val) - base
        self.checks.append({"tokens": float(tokens), "val_loss": float(val), "baseline_val_loss": base, "gap": gap})
        if gap > self.margin:
            self.reason = (
                f"futility: validation loss {val:.4f} trails {self.baseline_name}'s {base:.4f}{self.baseline_label} "
                f"at {_fmt_tokens(tokens)} tokens by {gap:.4f} > margin {self.margin:g}"
            )
            return self.reason
        return None


def _fmt_tokens(t: float) -> str:
    t = float(t)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if t >= scale:
            return f"{t / scale:.2f}{unit}"
    return f"{t:.0f}"


def baseline_curve(db: SweepDB, cfg: CompareConfig, seed: int) -> Tuple[List[float], List[float], str]:
    """The same seed's finished baseline curve, else the mean of all finished baseline curves."""
    row = db.run(cfg.baseline, seed)
    if row and row["status"] in DONE_STATUSES:
        x, y = db.eval_curve(row["id"])
        if x:
            return x, y, f" (seed {seed})"
    curves = []
    for s in cfg.seeds:
        r = db.run(cfg.baseline, s)
        if r and r["status"] in DONE_STATUSES:
            x, y = db.eval_curve(r["id"])
            if x:
                curves.append((x, y))
    b = stats.band(curves)
    if not b:
        return [], [], ""
    return list(b["x"]), list(b["mean"]), f" (mean of {b['n']} seeds)"


def futility_rule_for(db: SweepDB, cfg: CompareConfig, activation: str, seed: int, run_config) -> Optional[FutilityRule]:
    if cfg.futility.margin is None or activation == cfg.baseline:
        return None
    x, y, label = baseline_curve(db, cfg, seed)
    if not x:
        return None
    return FutilityRule(cfg.baseline, x, y, float(cfg.futility.margin),
                        cfg.futility.min_budget_share * budget_tokens(run_config), label)


# --------------------------------------------------------------------------- progress

class Progress:
    """One line per sweep stage on stderr (training draws its own progress bar)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled
        self.total = total
        self.start = time.monotonic()

    def note(self, what: str) -> None:
        if self.enabled:
            print(f"[compare | {(time.monotonic() - self.start) / 60:5.1f} min] {what}", file=sys.stderr, flush=True)

    def say(self, index: int, activation: str, seed: int, what: str) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        print(f"[compare {index}/{self.total} | {elapsed / 60:5.1f} min] {activation} seed {seed}: {what}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the sweep

def _sweep_meta() -> Dict[str, Any]:
    import platform

    import torch

    import polycom

    return {"polycom_version": polycom.__version__, "torch_version": torch.__version__,
            "python_version": platform.python_version(), "platform": platform.platform(),
            "git_commit": git_commit(), "cpu_threads": torch.get_num_threads()}


def git_commit() -> Optional[str]:
    import subprocess

    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return commit + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def open_sweep(cfg: CompareConfig, out_dir: Path) -> SweepDB:
    out_dir.mkdir(parents=True, exist_ok=True)
    db = SweepDB(out_dir / DB_NAME)
    stored = db.get("fingerprint")
    fingerprint = config_fingerprint(cfg)
    if stored is not None and stored != fingerprint:
        db.close()
        raise UserError(
            f"{out_dir} holds a sweep with a different run config; re-run with the same config and --set values "
            f"to resume it, or choose a new --out"
        )
    if stored is None:
        db.put("fingerprint", fingerprint)
        db.put("created_at", utc_now())
    db.put("compare_config", cfg.to_dict())
    return db


def run_sweep(
    cfg: CompareConfig,
    out_dir: Path,
    progress: bool = True,
    on_run_done: Optional[Callable[[RunRow], None]] = None,
) -> List[RunRow]:
    """Train and measure every run not yet done; returns the final rows.

    ``on_run_done(row)`` is called after each run is recorded (tests use it to interrupt a
    sweep). KeyboardInterrupt leaves the current run's row as ``interrupted`` and
    propagates; an exception inside training marks the run ``failed`` with its error and
    the sweep continues with the next run.
    """
    from ..data import prepare_data
    from ..model import Transformer, count_parameters, model_flops_per_token
    from ..training import train

    out_dir = Path(out_dir)
    _preflight(cfg)  # config, device and data errors before anything is written
    lock = _lock_folder(out_dir)
    try:
        db = open_sweep(cfg, out_dir)
    except BaseException:
        lock.close()
        raise
    try:
        db.put("meta", _sweep_meta())
        order = run_order(cfg)
        for activation, seed in order:
            db.ensure_run(activation, seed, str(Path("runs") / run_dir_name(activation, seed)))
        show = Progress(progress, len(order))
        dataset = None
        for index, (activation, seed) in enumerate(order, start=1):
            row = db.run(activation, seed)
            if row["status"] in DONE_STATUSES and row["measured_at"]:
                show.say(index, activation, seed, f"already {row['status']}, skipped")
                continue
            run_cfg = run_config_for(cfg, activation, seed)
            run_path = out_dir / row["out_dir"]
            if row["status"] not in DONE_STATUSES:
                row = _train_one(db, cfg, row, run_cfg, run_path, train, count_parameters, model_flops_per_token, show, index, progress)
            if row["status"] in DONE_STATUSES and not row["measured_at"]:
                if dataset is None:
                    dataset = prepare_data(run_cfg.data, run_cfg.data.resolved_cache_dir())
                row = _measure_one(db, cfg, row, run_cfg, run_path, dataset, Transformer, show, index)
            if on_run_done is not None:
                on_run_done(row)
        _measure_latency(db, cfg, out_dir, order, Transformer, show, dataset)
        return db.runs()
    finally:
        db.close()
        lock.close()


def _preflight(cfg: CompareConfig) -> None:
    """Check every run config, the device and the data (prepared once; it is cached) up
    front, so a user error raises before the output folder, database or runs/ exist."""
    from ..training.trainer import prepare_run

    run_cfgs = [run_config_for(cfg, activation, cfg.seeds[0]) for activation in cfg.activations]
    run_cfg = run_cfgs[0]
    prepare_run(run_cfg, run_cfg.data.resolved_cache_dir())


def _lock_folder(out_dir: Path):
    """An exclusive lock on the output folder: two sweeps writing one folder would race."""
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = open(out_dir / ".compare.lock", "a+")
    try:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover - not POSIX: no lock, as before
        pass
    except OSError:
        handle.close()
        raise UserError(f"another `polycom compare` is running on {out_dir}; wait for it or choose another --out") from None
    return handle


def _train_one(db, cfg, row, run_cfg, run_path, train, count_parameters, model_flops_per_token, show, index, progress) -> RunRow:
    activation, seed = row["activation"], row["seed"]
    rule = futility_rule_for(db, cfg, activation, seed, run_cfg)
    resuming = (run_path / "checkpoint.pt").is_file()
    show.say(index, activation, seed, ("resuming training" if resuming else "training")
             + (f" (futility margin {rule.margin:g} after {_fmt_tokens(rule.min_tokens)} tokens)" if rule else ""))
    db.update_run(row["id"], status="running", started_at=row["started_at"] or utc_now(), attempts=row["attempts"] + 1,
                  config_json=run_cfg.to_dict(), error=None)
    reset_ok = _reset_peak()
    from .measure import current_rss_mb

    rss_at_start = current_rss_mb()
    try:
        summary = train(run_cfg, run_path, resume=True, progress=progress, should_stop=rule)
    except KeyboardInterrupt:
        db.update_run(row["id"], status="interrupted")
        _ingest(db, row["id"], run_path)
        raise
    except UserError:
        db.update_run(row["id"], status="failed", error="configuration or data error (see message)")
        raise
    except Exception as exc:  # a crash in one run must not lose the others
        db.update_run(row["id"], status="failed", error=f"{type(exc).__name__}: {exc}",
                      finished_at=utc_now())
        _ingest(db, row["id"], run_path)
        show.say(index, activation, seed, f"FAILED: {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
        return db.run_by_id(row["id"])
    summary = dict(summary or {})
    from .measure import peak_rss_mb

    rss = peak_rss_mb()
    summary["peak_rss_mb_run"] = rss if reset_ok else None
    summary["rss_at_start_mb"] = rss_at_start
    # The workbench says "completed"; the sweep's vocabulary is finished / stopped / failed.
    raw_status = summary.get("status") or "completed"
    status = {"completed": "finished", "finished": "finished", "stopped": "stopped", "diverged": "diverged"}.get(raw_status, "failed")
    reason = None
    if status == "stopped":
        reason = (rule.reason if rule and rule.reason else None) or summary.get("stop_reason") or "stopped early"
    if rule is not None:
        summary["futility_checks"] = rule.checks
    resolved = _read_json(run_path / "config.json") or run_cfg.to_dict()
    params = dict(summary.get("parameter_counts") or {})
    if params:
        params["flops_per_token"] = summary.get("model_flops_per_token")
    else:
        params = _count_params(resolved, count_parameters, model_flops_per_token)
    meta = _read_json(run_path / "meta.json")
    _ingest(db, row["id"], run_path)
    error = None
    if status in ("failed", "diverged"):
        error = f"training ended with status {raw_status!r}" + (f" ({summary.get('stop_reason')})" if summary.get("stop_reason") else "")
    db.update_run(row["id"], status=status, stop_reason=reason, summary_json=summary, meta_json=meta, config_json=resolved,
                  params_json=params, finished_at=utc_now(), error=error)
    show.say(index, activation, seed, f"{status}" + (f" ({error})" if error else "") + (f": {reason}" if reason else "")
             + (f", final val loss {summary['final_val_loss']:.4f}" if isinstance(summary.get("final_val_loss"), (int, float)) else ""))
    return db.run_by_id(row["id"])


def _measure_one(db, cfg, row, run_cfg, run_path, dataset, Transformer, show, index) -> RunRow:
    from .measure import measure_model

    show.say(index, row["activation"], row["seed"], "measuring (saved bytes for backward, effective rank, layer similarity)")
    t0 = time.monotonic()
    try:
        model = load_trained_model(run_path, run_cfg, Transformer)
        measurements = measure_model(model, row["activation"], dataset, cfg.measure,
                                     seq_len=run_cfg.train.seq_len, max_seq_len=run_cfg.model.max_seq_len)
    except (KeyboardInterrupt, UserError):
        raise
    except Exception as exc:  # keep the training result; a re-run measures again
        show.say(index, row["activation"], row["seed"], f"measurement FAILED: {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
        db.update_run(row["id"], measurements_json={"error": f"{type(exc).__name__}: {exc}"})
        return db.run_by_id(row["id"])
    measurements["measure_wall_s"] = time.monotonic() - t0
    db.update_run(row["id"], measurements_json=measurements, measured_at=utc_now())
    return db.run_by_id(row["id"])


def _measure_latency(db, cfg, out_dir, order, Transformer, show, dataset) -> None:
    """Inference latency of every measured run in one interleaved session (skipped when the
    latest session already covers all of them, so a finished sweep is not re-measured)."""
    from ..data import prepare_data
    from .measure import interleaved_latency, interleaved_step_time, latency_prompt

    rows = [db.run(a, s) for a, s in order]
    rows = [r for r in rows if r and r["status"] in DONE_STATUSES and r["measured_at"]]
    if not rows:
        return
    latest = db.latest_latency()
    if all(r["id"] in latest for r in rows):
        return
    show.note(f"inference latency: {len(rows)} models interleaved, {cfg.measure.latency_repeats} repeats")
    run_cfg = run_config_for(cfg, rows[0]["activation"], rows[0]["seed"])
    if dataset is None:
        dataset = prepare_data(run_cfg.data, run_cfg.data.resolved_cache_dir())
    models = {r["id"]: load_trained_model(out_dir / r["out_dir"], run_config_for(cfg, r["activation"], r["seed"]), Transformer)
              for r in rows}
    prompt, decode = latency_prompt(dataset, cfg.measure, run_cfg.train.seq_len, run_cfg.model.max_seq_len)
    try:
        results = interleaved_latency(models, prompt, decode, cfg.measure.latency_repeats)
        show.note(f"training step time: {len(rows)} models interleaved, {cfg.measure.latency_repeats} rounds")
        x, y = dataset.get_batch("train", 0, 0, run_cfg.train.batch_size, run_cfg.train.seq_len)
        steps = interleaved_step_time(models, (x, y), cfg.measure.latency_repeats)
        for k in results:
            results[k].update(steps.get(k, {}))
    except Exception as exc:  # the trained runs stand; the report shows n/a and a re-run measures again
        show.note(f"inference latency FAILED: {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
        return
    db.add_latency_session(results)


def load_trained_model(run_path: Path, run_cfg, Transformer):
    """The run's final weights (``model.pt``), or its last checkpoint for a stopped run."""
    import torch

    for name in ("model.pt", "checkpoint.pt"):
        path = run_path / name
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=False)
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]
            model_cfg = copy.deepcopy(run_cfg.model)
            config_json = _read_json(run_path / "config.json")
            if config_json and config_json.get("model", {}).get("vocab_size"):
                model_cfg.vocab_size = int(config_json["model"]["vocab_size"])
            model = Transformer(model_cfg)
            model.load_state_dict(state)
            model.eval()
            return model
    raise FileNotFoundError(f"no model.pt or checkpoint.pt in {run_path}")


def _count_params(resolved: Dict[str, Any], count_parameters, model_flops_per_token) -> Dict[str, Any]:
    from ..config import RunConfig

    try:
        cfg = RunConfig.from_dict(resolved)
        params = dict(count_parameters(cfg.model))
        params["flops_per_token"] = model_flops_per_token(cfg.model, cfg.train.seq_len)
        return params
    except (ValueError, KeyError, UserError):
        return {}


def _reset_peak() -> bool:
    from .measure import reset_peak_rss

    return reset_peak_rss()


def _ingest(db: SweepDB, run_id: int, run_path: Path) -> None:
    db.ingest_metrics(run_id, run_path / "metrics.jsonl")


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
