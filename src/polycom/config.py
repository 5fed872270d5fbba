"""Typed run configuration: model, data and training, with presets and ``key=value`` overrides.

A run is described by :class:`RunConfig` = ``(model, data, train)``. Presets are TOML files
in ``polycom/configs/`` with one table per section::

    [model]
    activation = "polynorm"
    [train]
    max_steps = 600

``load_config("tiny", ["model.activation=polynorm"])`` loads a preset (by name or path),
applies overrides and validates. :meth:`RunConfig.validate` raises
:class:`~polycom.errors.UserError` naming the bad field and its allowed values. Config
files are parsed as data (TOML), never executed.

Stable keys that docs and scripts rely on: ``model.activation``, ``model.ffn``,
``model.n_experts``, ``model.top_k``, ``data.corpus``, ``train.max_steps``, ``train.lr``,
``train.seed``, ``train.eval_every``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Sequence

from .errors import UserError

__all__ = [
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "RunConfig",
    "load_config",
    "apply_overrides",
    "list_presets",
    "preset_path",
    "PRESET_DIR",
    "PLAIN_ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "ACTIVATIONS",
]

PRESET_DIR = Path(__file__).resolve().parent / "configs"

# The paper's plain FFN activations (W2 act(W1 x)) and the gated baselines (down(act(gate x) * up x)).
PLAIN_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "relu2", "polyrelu", "polynorm")
GATED_ACTIVATIONS = ("swiglu", "geglu")
ACTIVATIONS = PLAIN_ACTIVATIONS + GATED_ACTIVATIONS
POLYCOM_ACTIVATIONS = ("polyrelu", "polynorm")


def _check(cond: bool, field_name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise UserError(f"invalid value for {field_name}: {value!r} (allowed: {allowed})")


@dataclass
class ModelConfig:
    """LLaMA-style decoder. Sizes follow the paper's naming (d_model, n_layers, n_heads)."""

    vocab_size: int = 0  # 0: take it from the tokenizer
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (no grouped-query attention)
    max_seq_len: int = 256
    activation: str = "swiglu"
    # "auto": gated for swiglu/geglu, plain for the rest (the paper's placement);
    # "gated" with a plain activation gives down(act(gate x) * up x), e.g. gated PolyNorm.
    ffn: str = "auto"
    # Intermediate size of the GATED FFN (SwiGLU); 0: 8/3 d_model rounded up to ffn_multiple_of.
    # Plain FFNs use plain_ffn_ratio times this, so variants have matched parameters
    # (paper: SwiGLU 5504 vs 8256 at d_model 2048; MoE experts 1024 vs 1536).
    ffn_hidden_size: int = 0
    ffn_multiple_of: int = 64
    plain_ffn_ratio: float = 1.5
    polycom_order: int = 3
    n_experts: int = 0  # 0: dense FFN
    top_k: int = 2
    moe_polycom_coeffs: str = "shared"  # "shared" per layer (as released) or "per_expert"
    moe_load_balance_weight: float = 0.01
    moe_z_loss_weight: float = 0.001
    moe_normalize_top_k: bool = False  # OLMoE (the paper's MoE base) does not renormalise
    qk_norm: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def validate(self) -> None:
        p = "model."
        for name in ("d_model", "n_layers", "n_heads", "max_seq_len", "polycom_order", "ffn_multiple_of"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, p + name, getattr(self, name), "an integer >= 1")
        for name in ("vocab_size", "n_kv_heads", "ffn_hidden_size", "n_experts"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, p + name, getattr(self, name), "an integer >= 0")
        _check(self.activation in ACTIVATIONS, p + "activation", self.activation, ", ".join(ACTIVATIONS))
        _check(self.ffn in ("auto", "plain", "gated"), p + "ffn", self.ffn, "auto, plain, gated")
        _check(not (self.ffn == "plain" and self.activation in GATED_ACTIVATIONS), p + "ffn", self.ffn,
               f"gated or auto for the gated activation {self.activation!r}")
        _check(self.d_model % self.n_heads == 0, p + "n_heads", self.n_heads, f"a divisor of d_model={self.d_model}")
        _check((self.d_model // self.n_heads) % 2 == 0, p + "n_heads", self.n_heads, "a value giving an even head size (RoPE rotates pairs)")
        kv = self.n_kv_heads or self.n_heads
        _check(self.n_heads % kv == 0, p + "n_kv_heads", self.n_kv_heads, f"0 or a divisor of n_heads={self.n_heads}")
        _check(self.n_experts != 1, p + "n_experts", self.n_experts, "0 (dense) or >= 2")
        if self.n_experts:
            _check(isinstance(self.top_k, int) and 1 <= self.top_k <= self.n_experts, p + "top_k", self.top_k, f"1..n_experts={self.n_experts}")
        _check(self.moe_polycom_coeffs in ("shared", "per_expert"), p + "moe_polycom_coeffs", self.moe_polycom_coeffs, "shared, per_expert")
        _check(self.plain_ffn_ratio > 0, p + "plain_ffn_ratio", self.plain_ffn_ratio, "a number > 0 (1.5 matches a gated FFN)")
        for name in ("moe_load_balance_weight", "moe_z_loss_weight"):
            _check(getattr(self, name) >= 0, p + name, getattr(self, name), "a number >= 0")
        _check(self.init_std > 0, p + "init_std", self.init_std, "a number > 0")
        _check(self.norm_eps > 0, p + "norm_eps", self.norm_eps, "a number > 0")
        _check(self.rope_theta > 0, p + "rope_theta", self.rope_theta, "a number > 0")

    # --- derived quantities -------------------------------------------------------------
    @property
    def ffn_kind(self) -> str:
        """"plain" or "gated", resolving ``ffn="auto"`` from the activation."""
        if self.ffn != "auto":
            return self.ffn
        return "gated" if self.activation in GATED_ACTIVATIONS else "plain"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def gated_hidden_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        raw = 8 * self.d_model / 3
        m = self.ffn_multiple_of
        return int(m * -(-raw // m))

    @property
    def intermediate_size(self) -> int:
        """The FFN (or each expert's) intermediate size actually built."""
        if self.ffn_kind == "gated":
            return self.gated_hidden_size
        return int(round(self.gated_hidden_size * self.plain_ffn_ratio))

    @property
    def is_moe(self) -> bool:
        return self.n_experts >= 2


@dataclass
class DataConfig:
    corpus: str = "ptb"  # "ptb" or a local path: a UTF-8 file, a folder, or a glob
    tokenizer: str = "bpe"  # "bpe" (byte-level BPE trained on the train split) or "gpt2"
    vocab_size: int = 8192  # BPE only
    val_fraction: float = 0.05  # local corpora: fraction of documents held out
    split_seed: int = 0  # local corpora: which documents are held out
    max_train_chars: int = 0  # 0: all; else a prefix of the train split (cut at a line end)
    max_val_chars: int = 0
    cache_dir: str = ""  # "": $POLYCOM_CACHE or ~/.cache/polycom

    def validate(self) -> None:
        p = "data."
        _check(isinstance(self.corpus, str) and self.corpus.strip() != "", p + "corpus", self.corpus, "ptb or a path to a UTF-8 file, folder or glob")
        _check(self.tokenizer in ("bpe", "gpt2"), p + "tokenizer", self.tokenizer, "bpe, gpt2")
        _check(isinstance(self.vocab_size, int) and 259 <= self.vocab_size <= 1_000_000, p + "vocab_size", self.vocab_size, "an integer in 259..1000000 (256 bytes + specials + merges)")
        _check(0.0 < self.val_fraction < 1.0, p + "val_fraction", self.val_fraction, "a number strictly between 0 and 1")
        for name in ("max_train_chars", "max_val_chars", "split_seed"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, p + name, getattr(self, name), "an integer >= 0")

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        env = os.environ.get("POLYCOM_CACHE")
        if env:
            return Path(env).expanduser()
        return Path("~/.cache/polycom").expanduser()


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 128
    grad_accum_steps: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine floor = lr * min_lr_ratio (paper: 3e-4 -> 3e-5)
    warmup_steps: int = 100
    weight_decay: float = 0.1  # matrices only; never PolyCom coefficients, norms or biases
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0: off
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    checkpoint_every: int = 100
    num_threads: int = 0  # 0: leave torch's default
    device: str = "cpu"  # "cpu", "cuda", or "auto"
    tensorboard: bool = True
    # Divergence guard: a non-finite loss, or a loss above spike_factor x the running
    # median of the last spike_window losses, rolls back to the last checkpoint and
    # multiplies the learning rate by rollback_lr_factor; at most max_rollbacks times.
    spike_factor: float = 2.0
    spike_window: int = 50
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5

    def validate(self) -> None:
        p = "train."
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum_steps", "eval_every", "eval_batches", "log_every", "checkpoint_every", "spike_window"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, p + name, getattr(self, name), "an integer >= 1")
        for name in ("seed", "warmup_steps", "num_threads", "max_rollbacks"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, p + name, getattr(self, name), "an integer >= 0")
        _check(self.lr > 0, p + "lr", self.lr, "a number > 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, p + "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        _check(self.weight_decay >= 0, p + "weight_decay", self.weight_decay, "a number >= 0")
        _check(0.0 <= self.beta1 < 1.0, p + "beta1", self.beta1, "a number in [0, 1)")
        _check(0.0 <= self.beta2 < 1.0, p + "beta2", self.beta2, "a number in [0, 1)")
        _check(self.adam_eps > 0, p + "adam_eps", self.adam_eps, "a number > 0")
        _check(self.grad_clip >= 0, p + "grad_clip", self.grad_clip, "a number >= 0 (0 disables clipping)")
        _check(self.precision in ("fp32", "bf16"), p + "precision", self.precision, "fp32, bf16")
        _check(self.device in ("cpu", "cuda", "auto"), p + "device", self.device, "cpu, cuda, auto")
        _check(self.spike_factor > 1.0, p + "spike_factor", self.spike_factor, "a number > 1")
        _check(0.0 < self.rollback_lr_factor < 1.0, p + "rollback_lr_factor", self.rollback_lr_factor, "a number strictly between 0 and 1")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "RunConfig":
        self.model.validate()
        self.data.validate()
        self.train.validate()
        _check(self.train.seq_len <= self.model.max_seq_len, "train.seq_len", self.train.seq_len, f"<= model.max_seq_len={self.model.max_seq_len}")
        return self

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunConfig":
        cfg = cls()
        if not isinstance(d, dict):
            raise UserError(f"a config must be a table of sections (model, data, train), got {type(d).__name__}")
        for section, values in d.items():
            if section not in _SECTIONS:
                raise UserError(f"unknown config section {section!r} (allowed: {', '.join(_SECTIONS)})")
            if not isinstance(values, dict):
                raise UserError(f"config section {section!r} must be a table of key = value")
            sub = getattr(cfg, section)
            for key, value in values.items():
                _set_field(sub, f"{section}.{key}", key, value, from_text=False)
        return cfg


_SECTIONS = ("model", "data", "train")


def _coerce(value: Any, ftype: Any, full_key: str, from_text: bool) -> Any:
    tname = ftype if isinstance(ftype, str) else getattr(ftype, "__name__", str(ftype))
    if tname == "bool":
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"invalid value for {full_key}: {value!r} (allowed: true, false)")
    if tname == "int":
        if isinstance(value, bool):
            raise UserError(f"invalid value for {full_key}: {value!r} (allowed: an integer)")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if from_text and isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise UserError(f"invalid value for {full_key}: {value!r} (allowed: an integer)")
    if tname == "float":
        if isinstance(value, bool):
            raise UserError(f"invalid value for {full_key}: {value!r} (allowed: a number)")
        if isinstance(value, (int, float)):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"invalid value for {full_key}: {value!r} (allowed: a number)")
    if tname == "str":
        if isinstance(value, str):
            return value
        if from_text:
            return str(value)
        raise UserError(f"invalid value for {full_key}: {value!r} (allowed: a string)")
    return value


def _set_field(obj: Any, full_key: str, key: str, value: Any, from_text: bool) -> None:
    known = {f.name: f for f in fields(obj)}
    if key not in known:
        prefix = full_key.rsplit(".", 1)[0] + "." if "." in full_key else ""
        raise UserError(f"unknown config key {full_key!r} (allowed: {', '.join(prefix + k for k in known)})")
    setattr(obj, key, _coerce(value, known[key].type, full_key, from_text))


def apply_overrides(obj: Any, overrides: Sequence[str]) -> Any:
    """Apply ``["a.b=c", ...]`` to a (nested) dataclass in place and return it.

    Values are parsed to the field's type (``true``/``false``, ints, floats, strings).
    Unknown keys raise :class:`UserError` listing the allowed keys. Reusable for any
    dataclass tree (the compare config uses it too).
    """
    for item in overrides or ():
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (e.g. model.activation=polynorm)")
        dotted, value = item.split("=", 1)
        dotted, value = dotted.strip(), value.strip()
        parts = dotted.split(".")
        target = obj
        for i, part in enumerate(parts[:-1]):
            if not dataclasses.is_dataclass(target) or not hasattr(target, part) or not dataclasses.is_dataclass(getattr(target, part)):
                allowed = [f.name for f in fields(target) if dataclasses.is_dataclass(getattr(target, f.name))] if dataclasses.is_dataclass(target) else []
                raise UserError(f"unknown config key {dotted!r}: no section {'.'.join(parts[: i + 1])!r} (allowed: {', '.join(allowed) or 'none'})")
            target = getattr(target, part)
        if not dataclasses.is_dataclass(target):
            raise UserError(f"unknown config key {dotted!r}")
        if len(parts) == 1 and dataclasses.is_dataclass(getattr(target, parts[0], None)):
            raise UserError(f"config key {dotted!r} is a section; set one of its fields, e.g. {dotted}.<name>=<value>")
        _set_field(target, dotted, parts[-1], value, from_text=True)
    return obj


def list_presets(include_compare: bool = False) -> List[str]:
    """Bundled presets; ``polycom compare`` configs (with a [compare] table) only when asked."""
    names = []
    for path in sorted(PRESET_DIR.glob("*.toml")):
        if not include_compare:
            try:
                if "compare" in tomllib.loads(path.read_text(encoding="utf-8")):
                    continue
            except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
                continue
        names.append(path.stem)
    return names


def preset_path(path_or_preset: str) -> Path:
    """A TOML path as given, or the bundled preset of that name (``tiny`` -> configs/tiny.toml)."""
    candidate = Path(path_or_preset).expanduser()
    if candidate.is_file():
        return candidate
    named = PRESET_DIR / f"{path_or_preset}.toml"  # compare presets resolve too; load_config says what they are
    if "/" not in str(path_or_preset) and named.is_file():
        return named
    if candidate.exists():
        raise UserError(f"config {path_or_preset!r} is not a file")
    raise UserError(f"config {path_or_preset!r} not found (a TOML path or a preset: {', '.join(list_presets())})")


def load_config(path_or_preset: str | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a preset name or TOML path (None: defaults), apply overrides, validate."""
    if path_or_preset is None:
        cfg = RunConfig()
    else:
        path = preset_path(str(path_or_preset))
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"config {path} is not valid TOML: {exc}") from None
        if "compare" in data:
            raise UserError(f"config {path} is a compare experiment, not a single run; use: polycom compare --config {path_or_preset}")
        cfg = RunConfig.from_dict(data)
    apply_overrides(cfg, overrides)
    return cfg.validate()
