"""The compare (pilot) configuration: which runs, what counts as a win, what to measure.

A compare config file is TOML with a ``[compare]`` section and, optionally, the run
config's own sections (``[model]``, ``[data]``, ``[train]``) that override the run preset
named by ``compare.base``::

    [compare]
    base = "tiny"                       # run preset (or a path to a run config file)
    activations = ["swiglu", "gelu", "polyrelu", "polynorm"]   # first = baseline
    seeds = 1                           # a count (seeds 0..n-1) or an explicit list

    [compare.thresholds]                # how the verdict is made (see verdict.py)
    [compare.futility]                  # the optional stop-if-behind rule
    [compare.measure]                   # post-training measurements

    [train]
    max_steps = 300                     # same token budget for every run

Command-line overrides (``--set key=value``) go to the compare config for its own keys
(``activations``, ``seeds``, ``thresholds.*``, ``futility.*``, ``measure.*``, with or
without a ``compare.`` prefix) and to the run config for ``model.*``, ``data.*``,
``train.*``. A bad key or value raises :class:`polycom.errors.UserError` naming it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import UserError

RUN_SECTIONS = ("model", "data", "train")
PACKAGE_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class Thresholds:
    """What the verdict needs. Speedups are wall-clock: time to the baseline's quality."""

    adopt_min_speedup: float = 1.10       # adopt only if >= this much faster to the same quality
    reject_max_speedup: float = 0.97      # reject if slower than this to the same quality
    max_p_value: float = 0.05             # adopt needs the loss improvement significant at this level
    min_seeds_to_adopt: int = 3           # fewer seeds can at most earn "pilot-further"
    max_step_time_ratio: float = 1.50     # adopt never above this step-time cost ...
    max_memory_ratio: float = 1.50        # ... or this peak-memory cost
    reject_loss_margin: float = 0.02      # a single-seed candidate this much worse (nats) is rejected

    def validate(self) -> None:
        _positive(self, "adopt_min_speedup", "reject_max_speedup", "max_step_time_ratio", "max_memory_ratio")
        if self.reject_max_speedup > self.adopt_min_speedup:
            raise UserError(f"thresholds.reject_max_speedup ({self.reject_max_speedup}) must be <= thresholds.adopt_min_speedup ({self.adopt_min_speedup})")
        if not 0 < self.max_p_value < 1:
            raise UserError(f"thresholds.max_p_value must be in (0, 1), got {self.max_p_value}")
        if self.min_seeds_to_adopt < 1:
            raise UserError(f"thresholds.min_seeds_to_adopt must be >= 1, got {self.min_seeds_to_adopt}")
        if self.reject_loss_margin < 0:
            raise UserError(f"thresholds.reject_loss_margin must be >= 0, got {self.reject_loss_margin}")


@dataclass
class Futility:
    """Stop a candidate that trails the baseline by more than ``margin`` (nats of val loss)."""

    margin: Optional[float] = None        # None: rule off (``--stop-if-behind MARGIN`` turns it on)
    min_budget_share: float = 0.3         # never stop before this share of the token budget

    def validate(self) -> None:
        if self.margin is not None and self.margin < 0:
            raise UserError(f"futility.margin must be >= 0 (nats of validation loss), got {self.margin}")
        if not 0 <= self.min_budget_share <= 1:
            raise UserError(f"futility.min_budget_share must be in [0, 1], got {self.min_budget_share}")


@dataclass
class Measure:
    """Post-training measurements (on the final weights)."""

    latency_repeats: int = 5              # medians over this many timed repeats (after one warm-up)
    prompt_tokens: int = 128              # prefill prompt length
    decode_tokens: int = 32               # greedy tokens generated with the KV cache
    similarity_batches: int = 2           # validation batches for layer-wise cosine similarity
    batch_size: int = 8                   # sequences per batch for similarity and saved-bytes
    seq_len: Optional[int] = None         # None: the run's training sequence length

    def validate(self) -> None:
        for name in ("latency_repeats", "prompt_tokens", "decode_tokens", "similarity_batches", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"measure.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise UserError(f"measure.seq_len must be >= 2, got {self.seq_len}")


@dataclass
class CompareConfig:
    activations: List[str] = field(default_factory=lambda: ["swiglu", "gelu", "polyrelu", "polynorm"])
    seeds: List[int] = field(default_factory=lambda: [0])
    base: str = "tiny"
    thresholds: Thresholds = field(default_factory=Thresholds)
    futility: Futility = field(default_factory=Futility)
    measure: Measure = field(default_factory=Measure)
    # The resolved run config (polycom.config.RunConfig) every run starts from.
    run: Any = None

    @property
    def baseline(self) -> str:
        return self.activations[0]

    @property
    def candidates(self) -> List[str]:
        return self.activations[1:]

    def validate(self) -> None:
        if len(self.activations) < 2:
            raise UserError(f"activations needs a baseline and at least one candidate, got {self.activations}")
        if len(set(self.activations)) != len(self.activations):
            raise UserError(f"activations has duplicates: {self.activations}")
        from ..config import ACTIVATIONS

        # The model's FFN accepts these (polycom.list_activations() also has e.g. identity).
        for name in self.activations:
            if name not in ACTIVATIONS:
                raise UserError(f"activations: unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")
        if not self.seeds:
            raise UserError("seeds must be a count >= 1 or a non-empty list of integers")
        if len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds has duplicates: {self.seeds}")
        self.thresholds.validate()
        self.futility.validate()
        self.measure.validate()
        if self.run is not None:
            self.run.validate()
            from ..config import RunConfig

            for name in self.activations:  # each run's config must be valid too (e.g. model.ffn=plain vs swiglu)
                run = RunConfig.from_dict(copy.deepcopy(self.run.to_dict()))
                run.model.activation = name
                try:
                    run.validate()
                except UserError as exc:
                    raise UserError(f"activations: {name!r} does not fit the run config: {exc}") from None

    def to_dict(self) -> Dict[str, Any]:
        d = {
            "activations": list(self.activations),
            "seeds": list(self.seeds),
            "base": self.base,
            "thresholds": dataclasses.asdict(self.thresholds),
            "futility": dataclasses.asdict(self.futility),
            "measure": dataclasses.asdict(self.measure),
        }
        if self.run is not None:
            d["run"] = self.run.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CompareConfig":
        from ..config import RunConfig

        cfg = cls(
            activations=list(d["activations"]),
            seeds=[int(s) for s in d["seeds"]],
            base=d.get("base", "tiny"),
            thresholds=Thresholds(**d.get("thresholds", {})),
            futility=Futility(**d.get("futility", {})),
            measure=Measure(**d.get("measure", {})),
        )
        if d.get("run") is not None:
            cfg.run = RunConfig.from_dict(d["run"])
        return cfg


def _positive(obj, *names):
    for name in names:
        if not getattr(obj, name) > 0:
            raise UserError(f"thresholds.{name} must be > 0, got {getattr(obj, name)}")


# --------------------------------------------------------------------------- parsing values

def _parse_seeds(value: Any, key: str = "seeds") -> List[int]:
    """``3`` -> [0, 1, 2]; ``[0, 5]`` or ``"0,5"`` -> [0, 5]."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            count = value
        elif isinstance(value, (list, tuple)):
            return [int(v) for v in value]
        elif isinstance(value, str) and "," in value:
            return [int(v) for v in value.split(",") if v.strip()]
        else:
            count = int(str(value).strip())
    except (TypeError, ValueError):
        raise UserError(f"{key}: expected a seed count (e.g. 3) or a list of integers (e.g. 0,1,2), got {value!r}") from None
    if count < 1:
        raise UserError(f"{key}: the seed count must be >= 1, got {count}")
    return list(range(count))


def _parse_activations(value: Any) -> List[str]:
    if isinstance(value, str):
        names = [v.strip().lower() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        names = [str(v).strip().lower() for v in value]
    else:
        raise UserError(f"activations: expected a list like swiglu,gelu,polynorm, got {value!r}")
    return names


def _coerce(value: Any, current: Any, key: str, optional_float: bool = False):
    """Convert a TOML value or a command-line string to the type of the field."""
    text = value.strip() if isinstance(value, str) else value
    if optional_float and (text is None or (isinstance(text, str) and text.lower() in ("none", "off", "null", ""))):
        return None
    try:
        if isinstance(current, bool):
            if isinstance(text, bool):
                return text
            if str(text).lower() in ("true", "1", "yes", "on"):
                return True
            if str(text).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if isinstance(current, int) and not optional_float:
            if isinstance(text, float) and not text.is_integer():
                raise ValueError
            return int(text)
        if isinstance(current, float) or optional_float:
            if isinstance(text, bool):
                raise ValueError
            return float(text)
        if current is None:  # Optional[int] fields (measure.seq_len)
            if isinstance(text, str) and text.lower() in ("none", "null", ""):
                return None
            return int(text)
    except (TypeError, ValueError):
        kind = "true/false" if isinstance(current, bool) else ("a number or 'none'" if optional_float else type(current).__name__ if current is not None else "an integer or 'none'")
        raise UserError(f"{key}: expected {kind}, got {value!r}") from None
    return text


_SECTIONS = {"thresholds": Thresholds, "futility": Futility, "measure": Measure}
_OPTIONAL_FLOATS = {("futility", "margin")}


def _set_compare_key(cfg: CompareConfig, key: str, value: Any) -> None:
    """Set one compare key (``activations``, ``seeds``, ``base``, ``section.field``)."""
    if key == "activations":
        cfg.activations = _parse_activations(value)
        return
    if key == "seeds":
        cfg.seeds = _parse_seeds(value)
        return
    if key == "base":
        cfg.base = str(value)
        return
    section, _, name = key.partition(".")
    if section not in _SECTIONS or not name:
        allowed = ["activations", "seeds", "base"] + [f"{s}.{f.name}" for s, c in _SECTIONS.items() for f in dataclasses.fields(c)]
        raise UserError(f"unknown compare key {key!r}; allowed: {', '.join(allowed)}, or model.*/data.*/train.* for the run config")
    obj = getattr(cfg, section)
    names = [f.name for f in dataclasses.fields(obj)]
    if name not in names:
        raise UserError(f"unknown compare key {key!r}; allowed in [{section}]: {', '.join(names)}")
    setattr(obj, name, _coerce(value, getattr(obj, name), key, optional_float=(section, name) in _OPTIONAL_FLOATS))


def _flatten(prefix: str, table: Dict[str, Any]) -> List[tuple]:
    out = []
    for k, v in table.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.extend(_flatten(key, v))
        else:
            out.append((key, v))
    return out


def _deep_merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_config_path(path: str) -> Path:
    """A path as given, else relative to the package's configs/ (so ``configs/pilot.toml``
    and ``pilot`` work from any folder)."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (PACKAGE_CONFIG_DIR / p.name, PACKAGE_CONFIG_DIR / f"{p.name}.toml"):
        if candidate.is_file():
            return candidate
    raise UserError(f"compare config not found: {path} (give a TOML file, or a preset name from {PACKAGE_CONFIG_DIR})")


def build_run_config(base: str, sections: Dict[str, Any], overrides: List[str]):
    """The run preset ``base``, then the file's [model]/[data]/[train] tables, then --set."""
    from ..config import RunConfig, apply_overrides, load_config

    for section in RUN_SECTIONS:
        for key in sections.get(section, {}) or {}:
            if f"{section}.{key}" in PER_RUN_KEYS:
                raise UserError(f"{section}.{key} is set per run by compare; use activations=... / seeds=... instead")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in PER_RUN_KEYS:
            raise UserError(f"{key} is set per run by compare; use activations=... / seeds=... instead")
    merged = _deep_merge(load_config(base).to_dict(), {s: sections[s] for s in RUN_SECTIONS if s in sections})
    run = RunConfig.from_dict(merged)
    apply_overrides(run, overrides)
    return run.validate()


# Run-level keys that compare decides per run; the user cannot pin them in the run config.
PER_RUN_KEYS = ("model.activation", "train.seed")


def load_compare_config(path: str, overrides: Optional[List[str]] = None, stop_if_behind: Optional[float] = None) -> CompareConfig:
    """Read a compare TOML, apply ``--set`` overrides, resolve the run config, validate."""
    overrides = list(overrides or [])
    cfg_path = resolve_config_path(path)
    try:
        data = tomllib.loads(cfg_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{cfg_path}: not valid TOML ({exc})") from None
    unknown = [k for k in data if k != "compare" and k not in RUN_SECTIONS]
    if unknown:
        raise UserError(f"{cfg_path}: unknown section(s) {', '.join(unknown)}; allowed: compare, {', '.join(RUN_SECTIONS)}")
    cfg = CompareConfig()
    if "compare" not in data:
        # A run config (e.g. the train preset "tiny"): it is the base every run starts from;
        # its model.activation is replaced per run, like the base preset's.
        cfg.base = cfg_path.stem if cfg_path.resolve().parent == PACKAGE_CONFIG_DIR else str(cfg_path)
        data = {}
    compare_table = data.get("compare", {})
    for key, value in compare_table.items():
        if isinstance(value, dict):
            if key not in _SECTIONS:
                raise UserError(f"{cfg_path}: unknown table [compare.{key}]; allowed: {', '.join(_SECTIONS)}")
            for sub, v in value.items():
                _set_compare_key(cfg, f"{key}.{sub}", v)
        else:
            _set_compare_key(cfg, key, value)

    run_overrides = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        if key.startswith("compare."):
            key = key[len("compare."):]
        if key.split(".", 1)[0] in RUN_SECTIONS:
            run_overrides.append(f"{key}={value}")
        else:
            _set_compare_key(cfg, key, value)
    if stop_if_behind is not None:
        cfg.futility.margin = float(stop_if_behind)

    base = cfg.base
    base_path = Path(base)
    if not base_path.is_file() and (cfg_path.parent / base).is_file():
        base = str(cfg_path.parent / base)
    cfg.run = build_run_config(base, data, run_overrides)
    cfg.validate()
    return cfg


def config_fingerprint(cfg: CompareConfig) -> str:
    """What must not change between a sweep and its resumption (everything but measurement
    settings, thresholds and the futility rule, which only affect the report or later runs)."""
    d = cfg.to_dict()
    return json.dumps({"run": d.get("run"), "base": d["base"]}, sort_keys=True)
