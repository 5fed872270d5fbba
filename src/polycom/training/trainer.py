"""The training loop: evaluation, metrics, checkpoints, resume and the divergence guard.

``train(run_config, out_dir)`` writes into ``out_dir``:

- ``config.json`` (resolved config, vocabulary size filled in), ``meta.json`` (package
  version, git commit, torch version, ...),
- ``metrics.jsonl`` (one JSON object per line, ``kind`` = train / eval / coeffs / event,
  see docs/CONTRACT.md), ``tensorboard/`` when TensorBoard is installed,
- ``checkpoint.pt`` (atomic; model, optimiser, schedule, RNG, data position),
- ``model.pt`` (final weights) and ``summary.json``.

Batches are a pure function of (seed, position) and the model has no dropout, so a run
resumed from its checkpoint reproduces the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import __version__
from ..activations import PolyCom
from ..config import RunConfig
from ..data import Dataset, prepare_data
from ..errors import UserError
from ..model import Transformer, count_parameters, model_flops_per_token
from ..utils.io import atomic_save_torch, atomic_write_json, atomic_write_text
from .checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .optim import LRSchedule, build_optimizer

__all__ = ["train", "evaluate", "git_commit", "read_metrics"]

WARMUP_STEPS_EXCLUDED = 5  # first steps of each session are excluded from step-time statistics


def git_commit() -> str:
    """The source tree's commit (with ``-dirty`` when it has local changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """All complete records of a metrics.jsonl (a line cut by a kill is skipped)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _truncate_metrics(path: Path, max_step: int) -> None:
    """Drop train/eval/coeffs records after ``max_step`` (they are re-made after a resume or
    rollback); events are history and stay."""
    kept = [r for r in read_metrics(path) if r.get("kind") == "event" or r.get("step", 0) <= max_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _device(train_config) -> torch.device:
    if train_config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if train_config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available (use cpu or auto)")
    return torch.device(train_config.device)


def prepare_run(cfg: RunConfig, cache_dir=None) -> Tuple[torch.device, Dataset]:
    """The device and the prepared data of a run, with every user error they can raise
    (no CUDA, missing or too-small corpus, vocabulary too small) raised before anything is
    written. Resolves ``cfg.model.vocab_size = 0`` (automatic) to the tokenizer's size, in place."""
    device = _device(cfg.train)
    dataset = prepare_data(cfg.data, cache_dir)
    dataset.check_fits(cfg.train.seq_len)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = dataset.vocab_size
    elif cfg.model.vocab_size < dataset.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {dataset.vocab_size}; set it to 0 (automatic) or >= {dataset.vocab_size}")
    return device, dataset


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: Transformer, dataset: Dataset, run_config: RunConfig, device: torch.device) -> float:
    """Mean LM loss over the fixed validation windows (same tokens for every run)."""
    tc = run_config.train
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in dataset.eval_batches(tc.batch_size, tc.seq_len, tc.eval_batches):
        with _autocast(device, tc.precision):
            out = model(x.to(device), targets=y.to(device))
        total += float(out.lm_loss) * x.numel()
        count += x.numel()
    model.train(was_training)
    return total / max(count, 1)


def _coefficients(model: Transformer) -> List[Dict[str, Any]]:
    layers = []
    for i, block in enumerate(model.blocks):
        mods = [m for m in block.ffn.modules() if isinstance(m, PolyCom)]
        for j, m in enumerate(mods):
            entry = {"layer": i, "weight": [round(float(v), 6) for v in m.weight.detach().cpu()], "bias": [round(float(v), 6) for v in m.bias.detach().cpu()]}
            if len(mods) > 1:
                entry["expert"] = j
            layers.append(entry)
    return layers


class _Metrics:
    """Appends JSON lines (flushed each time) and mirrors scalars to TensorBoard if present."""

    def __init__(self, out_dir: Path, tensorboard: bool):
        self.path = out_dir / "metrics.jsonl"
        self.handle = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception:  # tensorboard not installed or broken: the JSON log is the record
                self.tb = None

    def write(self, record: Dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tb is not None and record["kind"] in ("train", "eval"):
            for key, value in record.items():
                if key not in ("kind", "step", "tokens") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def reopen(self) -> None:
        self.handle.close()
        self.handle = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self.handle.close()
        if self.tb is not None:
            self.tb.close()


def _comparable(cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
    return {"model": cfg_dict["model"], "data": {k: v for k, v in cfg_dict["data"].items() if k != "cache_dir"}}


def _first_difference(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    for section in a:
        for key in a[section]:
            if a[section][key] != b.get(section, {}).get(key):
                return f"{section}.{key} ({b.get(section, {}).get(key)!r} in the checkpoint, {a[section][key]!r} now)"
    return "?"


def train(
    run_config: RunConfig,
    out_dir,
    resume: bool = True,
    progress: bool = True,
    should_stop: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None,
    on_step: Optional[Callable[[int, Transformer], None]] = None,
    cache_dir=None,
) -> Dict[str, Any]:
    """Train one model; returns the summary (also written to ``summary.json``).

    resume: continue from ``out_dir/checkpoint.pt`` if it exists (model and data config
        must match); False starts over in ``out_dir``.
    should_stop(eval_record) -> reason or None: called after each evaluation; a reason
        stops the run with status ``stopped`` (a checkpoint is written, so it can resume).
    on_step(step, model): called after each optimiser step (tests inject faults with it).
    """
    cfg = RunConfig.from_dict(run_config.to_dict()).validate()  # private copy
    tc = cfg.train
    out_dir = Path(out_dir)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    # Device and data first: a config or data error leaves no run folder behind.
    device, dataset = prepare_run(cfg, cache_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create run folder {out_dir}: {exc.strerror or exc}") from None

    ckpt_path = out_dir / "checkpoint.pt"
    state = None
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if _comparable(cfg.to_dict()) != _comparable(state["config"]):
            raise UserError(f"run folder {out_dir} was trained with a different config: {_first_difference(_comparable(cfg.to_dict()), _comparable(state['config']))}; use a new --out")

    # Seeds for everything (model init; nothing else draws random numbers, batches have their own streams).
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    with torch.device(device):
        model = Transformer(cfg.model)
    optimizer = build_optimizer(model, tc)
    schedule = LRSchedule(tc)
    counts = count_parameters(cfg.model)
    flops_per_token = model_flops_per_token(cfg.model, tc.seq_len)
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum_steps

    progress_state: Dict[str, Any] = {"step": 0, "tokens": 0, "wall_time_s": 0.0, "recent_losses": [], "rollbacks": 0,
                                      "events": [], "step_times": [], "last_val_loss": None, "best_val_loss": None}

    def snapshot() -> Dict[str, Any]:
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "rng": capture_rng(), "step": progress_state["step"], "data_position": progress_state["step"] * tc.grad_accum_steps,
            "config": cfg.to_dict(), "progress": {k: v for k, v in progress_state.items() if k != "step"}, "version": __version__,
        }

    def restore(saved: Dict[str, Any]) -> None:
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"checkpoint {ckpt_path} does not fit this model ({str(exc).splitlines()[0][:160]}); use a new --out") from None
        schedule.load_state_dict(saved["schedule"])
        restore_rng(saved["rng"])
        progress_state.update(saved["progress"])
        progress_state["step"] = int(saved["step"])

    metrics_path = out_dir / "metrics.jsonl"
    if state is not None:
        restore(state)
        _truncate_metrics(metrics_path, progress_state["step"])
        done = out_dir / "summary.json"
        if progress_state["step"] >= tc.max_steps and done.is_file():
            return json.loads(done.read_text())
    else:
        for stale in ("metrics.jsonl", "summary.json", "model.pt"):
            with contextlib.suppress(FileNotFoundError):
                (out_dir / stale).unlink()
        atomic_write_json(out_dir / "config.json", cfg.to_dict())
        atomic_write_json(out_dir / "meta.json", {
            "package": "polycom", "version": __version__, "git_commit": git_commit(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
            "num_threads": torch.get_num_threads(), "parameters": counts, "model_flops_per_token": flops_per_token,
            "tokenizer": dataset.tokenizer.key, "token_cache": str(dataset.path),
            "train_tokens": int(len(dataset.train_tokens)), "val_tokens": int(len(dataset.val_tokens)),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        save_checkpoint(ckpt_path, snapshot())  # step 0: the divergence guard can always roll back

    metrics = _Metrics(out_dir, tc.tensorboard)
    status, stop_reason = "completed", None
    session_steps = 0
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.max_steps, initial=progress_state["step"], unit="step", dynamic_ncols=True, file=sys.stderr, desc=cfg.model.activation)
        except ImportError:
            bar = None

    def event(name: str, **fields) -> None:
        record = {"kind": "event", "step": progress_state["step"], "event": name, **fields}
        progress_state["events"].append(record)
        metrics.write(record)

    def rollback(reason: str, loss_value: float) -> bool:
        """Return False when the retry budget is spent (the run ends as diverged)."""
        event(reason, loss=loss_value if math.isfinite(loss_value) else str(loss_value))
        if progress_state["rollbacks"] >= tc.max_rollbacks:
            event("diverged", reason=f"{reason} after {progress_state['rollbacks']} rollbacks (train.max_rollbacks={tc.max_rollbacks})")
            return False
        bad_step = progress_state["step"]
        saved = load_checkpoint(ckpt_path)
        events, rollbacks = list(progress_state["events"]), progress_state["rollbacks"] + 1
        restore(saved)
        progress_state["events"], progress_state["rollbacks"] = events, rollbacks
        schedule.lr_scale *= tc.rollback_lr_factor
        metrics.handle.flush()
        _truncate_metrics(metrics_path, progress_state["step"])
        metrics.reopen()
        event("rollback", from_step=bad_step, to_step=progress_state["step"], lr_scale=schedule.lr_scale, retries_left=tc.max_rollbacks - rollbacks)
        save_checkpoint(ckpt_path, snapshot())  # persist the lowered lr and the event history
        return True

    model.train()
    log_tokens, log_time = 0, 0.0
    try:
        while progress_state["step"] < tc.max_steps:
            step = progress_state["step"]
            t0 = time.perf_counter()
            lr = schedule.lr(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, lm_sum, aux_sum = 0.0, 0.0, 0.0
            for micro in range(tc.grad_accum_steps):
                x, y = dataset.get_batch("train", tc.seed, step * tc.grad_accum_steps + micro, tc.batch_size, tc.seq_len)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with _autocast(device, tc.precision):
                    out = model(x, targets=y)
                (out.loss / tc.grad_accum_steps).backward()
                loss_sum += float(out.loss.detach())
                lm_sum += float(out.lm_loss.detach())
                aux_sum += float(out.aux_loss.detach())
            loss_value = loss_sum / tc.grad_accum_steps
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf")))

            # Divergence guard: checked before the update, so a bad step is never applied.
            recent = progress_state["recent_losses"]
            reason = None
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                reason = "nonfinite"
            elif len(recent) >= min(10, tc.spike_window) and loss_value > tc.spike_factor * statistics.median(recent):
                reason = "spike"
            if reason is not None:
                optimizer.zero_grad(set_to_none=True)
                if not rollback(reason, loss_value):
                    status, stop_reason = "diverged", reason
                    break
                if bar is not None:
                    bar.reset(total=tc.max_steps)
                    bar.update(progress_state["step"])
                continue

            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            recent.append(loss_value)
            del recent[: -tc.spike_window]
            progress_state["step"] = step = step + 1
            progress_state["tokens"] += tokens_per_step
            if on_step is not None:
                on_step(step, model)
            elapsed = time.perf_counter() - t0
            progress_state["wall_time_s"] += elapsed
            session_steps += 1
            if session_steps > WARMUP_STEPS_EXCLUDED:
                progress_state["step_times"].append(round(elapsed, 6))
            log_tokens += tokens_per_step
            log_time += elapsed

            if step % tc.log_every == 0 or step == tc.max_steps or step == 1:
                record = {"kind": "train", "step": step, "tokens": progress_state["tokens"], "wall_time_s": round(progress_state["wall_time_s"], 4),
                          "loss": lm_sum / tc.grad_accum_steps, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": round(log_tokens / log_time, 2) if log_time > 0 else None, "step_time_s": round(elapsed, 6)}
                if cfg.model.is_moe:
                    record["aux_loss"] = aux_sum / tc.grad_accum_steps
                metrics.write(record)
                log_tokens, log_time = 0, 0.0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{lm_sum / tc.grad_accum_steps:.3f}", tok_s=f"{tokens_per_step / elapsed:,.0f}", refresh=False)

            stop_now = False
            if step % tc.eval_every == 0 or step == tc.max_steps:
                val_loss = evaluate(model, dataset, cfg, device)
                progress_state["last_val_loss"] = val_loss
                if math.isfinite(val_loss) and (progress_state["best_val_loss"] is None or val_loss < progress_state["best_val_loss"]):
                    progress_state["best_val_loss"] = val_loss
                eval_record = {"kind": "eval", "step": step, "tokens": progress_state["tokens"], "wall_time_s": round(progress_state["wall_time_s"], 4), "val_loss": val_loss}
                metrics.write(eval_record)
                coeffs = _coefficients(model)
                if coeffs:
                    metrics.write({"kind": "coeffs", "step": step, "tokens": progress_state["tokens"], "layers": coeffs})
                if bar is not None:
                    bar.set_postfix(loss=f"{lm_sum / tc.grad_accum_steps:.3f}", val=f"{val_loss:.3f}", tok_s=f"{tokens_per_step / elapsed:,.0f}")
                if should_stop is not None:
                    stop_reason = should_stop(eval_record)
                    if stop_reason:
                        status, stop_now = "stopped", True
                        event("stopped", reason=str(stop_reason))
            if stop_now or step % tc.checkpoint_every == 0 or step == tc.max_steps:
                save_checkpoint(ckpt_path, snapshot())
            if stop_now:
                break
    finally:
        if bar is not None:
            bar.close()
        metrics.close()

    if status == "completed":
        atomic_save_torch(out_dir / "model.pt", model.state_dict())
    step_times = progress_state["step_times"]
    median_step = statistics.median(step_times) if step_times else None
    summary = {
        "status": status,
        "stop_reason": stop_reason,
        "steps": progress_state["step"],
        "max_steps": tc.max_steps,
        "final_val_loss": progress_state["last_val_loss"],
        "best_val_loss": progress_state["best_val_loss"],
        "tokens_seen": progress_state["tokens"],
        "step_time_s": median_step,
        "tokens_per_s": tokens_per_step / median_step if median_step else None,
        "wall_time_s": progress_state["wall_time_s"],
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "parameters": counts["total"],
        "parameter_counts": counts,
        "model_flops_per_token": flops_per_token,
        "lr_scale": schedule.lr_scale,
        "rollbacks": progress_state["rollbacks"],
        "events": progress_state["events"],
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
