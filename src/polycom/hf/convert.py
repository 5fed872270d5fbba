"""Convert a Hugging Face causal LM's FFN activations to PolyCom, in place.

Placements (``ffn=``):

- ``gated``: keep the gated MLP and replace its activation: down(act(gate x) * up x)
  (the form of Motif 2.6B). Trained weights are kept; only the activation changes.
- ``paper``: the paper's placement, a plain two-matrix FFN W2 act(W1 x) whose width is
  chosen to match the original FFN's parameter count (3/2 of a gated FFN's intermediate
  size). The new matrices are freshly initialised (normal, std = config.initializer_range):
  this placement is for (continued) pretraining, not for keeping a trained function.
  FFNs that are already plain (GPT-2, GPT-NeoX) only get their activation replaced.

MoE layers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): transformers 5.x stores all experts of a
layer as fused 3-D tensors in one ``*Experts`` module. Every expert is converted.
``coefficients="shared"`` gives one set per layer shared by all experts (as released);
``"per_expert"`` gives each expert its own set (a :class:`PolyComExperts` module).
Qwen2-MoE's always-on shared expert is a dense gated MLP and gets its own set.

Reloading: ``gated`` + ``shared`` leaves the architecture of the model class unchanged apart
from ``hidden_act``, so ``AutoModelForCausalLM.from_pretrained`` rebuilds it (after
``import polycom.hf``). The structural conversions (``paper``, ``per_expert``) are recorded in
``config.polycom``; reload them with :func:`load_converted`, which also handles the plain case.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from ..activations import PolyCom
from ..errors import UserError
from .modules import PlainFFN, PolyComExperts, matched_ffn_hidden_size
from .registry import build_activation, register

__all__ = ["convert", "load_converted", "find_ffn_sites", "FFNSite", "ConversionReport", "SUPPORTED_FAMILIES"]

# model_type -> family name; these are the families with tests (tests/test_hf_convert.py).
SUPPORTED_FAMILIES: Dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "gpt2": "GPT-2",
    "gpt_neox": "GPT-NeoX",
    "olmo": "OLMo",
    "olmo2": "OLMo2",
    "mixtral": "Mixtral",
    "qwen2_moe": "Qwen2-MoE",
    "qwen3_moe": "Qwen3-MoE",
    "olmoe": "OLMoE",
}
PLACEMENTS = ("gated", "paper")
COEFFICIENTS = ("shared", "per_expert")


def supported_families_text() -> str:
    return ", ".join(SUPPORTED_FAMILIES.values())


@dataclass
class FFNSite:
    """One FFN the converter knows: where it is and how to read its projections.

    kind: ``gated`` (gate_proj/up_proj/down_proj), ``plain`` (one input and one output
    projection: GPT-2 c_fc/c_proj Conv1D, GPT-NeoX dense_h_to_4h/dense_4h_to_h, PlainFFN),
    ``experts`` (fused 3-D expert tensors).
    """

    path: str
    kind: str
    module: nn.Module
    act_attr: str
    in_attr: str = ""
    out_attr: str = ""
    layer: Optional[int] = None

    @property
    def activation(self) -> nn.Module:
        return getattr(self.module, self.act_attr)


def _layer_index(path: str) -> Optional[int]:
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def _is_linear_like(module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _classify(path: str, module: nn.Module) -> Optional[FFNSite]:
    if isinstance(module, PolyComExperts):
        return FFNSite(path, "experts", module, "act_fn", layer=_layer_index(path))
    act_attr = "act_fn" if isinstance(getattr(module, "act_fn", None), nn.Module) else (
        "act" if isinstance(getattr(module, "act", None), nn.Module) else None)
    if act_attr is None:
        return None
    if all(_is_linear_like(getattr(module, name, None)) for name in ("gate_proj", "up_proj", "down_proj")):
        return FFNSite(path, "gated", module, act_attr, "up_proj", "down_proj", _layer_index(path))
    for in_attr, out_attr in (("up_proj", "down_proj"), ("c_fc", "c_proj"), ("dense_h_to_4h", "dense_4h_to_h"), ("fc1", "fc2")):
        if _is_linear_like(getattr(module, in_attr, None)) and _is_linear_like(getattr(module, out_attr, None)):
            return FFNSite(path, "plain", module, act_attr, in_attr, out_attr, _layer_index(path))
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3 and down.dim() == 3:
        if getattr(module, "has_bias", False) or not getattr(module, "is_concatenated", True) or getattr(module, "is_transposed", False):
            return None  # layouts we do not rebuild (interleaved / transposed / biased experts)
        return FFNSite(path, "experts", module, act_attr, layer=_layer_index(path))
    return None


def find_ffn_sites(model: nn.Module) -> List[FFNSite]:
    """Every FFN in ``model`` that the converter knows, outermost first, none nested in another."""
    sites: List[FFNSite] = []
    taken: List[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix + ".") for prefix in taken):
            continue
        site = _classify(path, module)
        if site is not None:
            sites.append(site)
            taken.append(path)
    return sites


@dataclass
class ConversionReport:
    """What :func:`convert` changed. ``original_activations`` maps module path -> the replaced
    activation module (kept for calibration; not serialised)."""

    model_type: str
    family: str
    activation: str
    ffn: str
    coefficients: str
    modules: List[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    ffn_params_before: int = 0
    ffn_params_after: int = 0
    ffn_hidden_size: Optional[int] = None
    expert_ffn_hidden_size: Optional[int] = None
    polycom_modules: int = 0
    polycom_parameters: int = 0
    notes: List[str] = field(default_factory=list)
    original_activations: Dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("original_activations")
        return d

    def __str__(self) -> str:
        return (f"{self.family}: {len(self.modules)} FFN modules -> {self.activation} ({self.ffn} placement, "
                f"{self.coefficients} coefficients); parameters {self.params_before:,} -> {self.params_after:,} "
                f"(FFN {self.ffn_params_before:,} -> {self.ffn_params_after:,})")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def _like(act: nn.Module, reference: torch.Tensor) -> nn.Module:
    return act.to(device=reference.device, dtype=reference.dtype) if reference.device.type != "meta" else act.to("meta")


def _reference_param(module: nn.Module) -> torch.Tensor:
    return next(p for p in module.parameters())


def _activation_config_key(config) -> str:
    return "activation_function" if getattr(config, "model_type", "") == "gpt2" else "hidden_act"


def _validate(model: nn.Module, activation: str, ffn: str, coefficients: str):
    build_activation(activation)  # raises UserError naming the registered ones
    if ffn not in PLACEMENTS:
        raise UserError(f"ffn must be one of {', '.join(PLACEMENTS)}; got {ffn!r}")
    if coefficients not in COEFFICIENTS:
        raise UserError(f"coefficients must be one of {', '.join(COEFFICIENTS)}; got {coefficients!r}")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    sites = find_ffn_sites(model)
    if not sites:
        raise UserError(f"no MLP this converter knows in {type(model).__name__} (model_type {model_type!r}); "
                        f"supported families: {supported_families_text()}")
    if coefficients == "per_expert" and not any(s.kind == "experts" for s in sites):
        raise UserError("coefficients='per_expert' needs a mixture-of-experts model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)")
    return config, model_type, sites


def convert(model: nn.Module, activation: str = "polynorm", ffn: str = "gated", coefficients: str = "shared",
            init_std: Optional[float] = None) -> ConversionReport:
    """Replace every FFN activation of ``model`` with ``activation`` (in place) and report it.

    Args:
        model: a transformers model instance (e.g. after ``from_pretrained``).
        activation: a registered PolyCom activation (``polynorm``, ``polyrelu``).
        ffn: ``gated`` (keep the gated MLP, swap its activation; default, keeps trained
            weights) or ``paper`` (plain two-matrix FFN, parameter-matched, new weights).
        coefficients: ``shared`` (one set per FFN layer) or ``per_expert`` (MoE only).
        init_std: std of new FFN weights (``paper``); default ``config.initializer_range``.

    Raises UserError for an unregistered activation, a bad option, a model already converted,
    or a model with no FFN the converter knows (naming the supported families).
    """
    register()
    config, model_type, sites = _validate(model, activation, ffn, coefficients)
    if config is not None and getattr(config, "polycom", None):
        raise UserError(f"this model was already converted ({config.polycom.get('activation')}, "
                        f"{config.polycom.get('ffn')} placement); load the original to convert again")
    spec = {"activation": activation.lower(), "ffn": ffn, "coefficients": coefficients}
    report = _apply(model, spec, sites, init_std=init_std)
    if config is not None:
        key = _activation_config_key(config)
        original = getattr(config, key, None)
        setattr(config, key, spec["activation"])
        structural = (report.ffn_hidden_size is not None or report.expert_ffn_hidden_size is not None
                      or coefficients == "per_expert")
        config.polycom = {
            **spec,
            "original_activation": original,
            "ffn_hidden_size": report.ffn_hidden_size,
            "expert_ffn_hidden_size": report.expert_ffn_hidden_size,
            "reload_with": "polycom.hf.load_converted" if structural else "AutoModelForCausalLM.from_pretrained",
        }
    if model_type not in SUPPORTED_FAMILIES:
        report.notes.append(f"model_type {model_type!r} is not one of the tested families; its FFNs matched a known structure")
    return report


def _apply(model: nn.Module, spec: dict, sites: Optional[List[FFNSite]] = None, init_std: Optional[float] = None,
           expected_sizes: Optional[dict] = None) -> ConversionReport:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    sites = find_ffn_sites(model) if sites is None else sites
    std = init_std if init_std is not None else float(getattr(config, "initializer_range", 0.02) or 0.02)
    activation, ffn, coefficients = spec["activation"], spec["ffn"], spec["coefficients"]
    report = ConversionReport(model_type=model_type, family=SUPPORTED_FAMILIES.get(model_type, type(model).__name__),
                              activation=activation, ffn=ffn, coefficients=coefficients)
    report.params_before = _count(model)
    report.ffn_params_before = sum(_count(s.module) for s in sites)
    for site in sites:
        old_act = site.activation
        report.original_activations[site.path] = old_act
        reference = _reference_param(site.module)
        if site.kind == "experts":
            new_module = _convert_experts(site, activation, ffn, coefficients, std, reference, report, expected_sizes)
        elif site.kind == "gated" and ffn == "paper":
            new_module = _gated_to_plain(site, activation, std, reference, report, expected_sizes)
        else:  # gated placement, or an FFN that is already plain: swap the activation only
            setattr(site.module, site.act_attr, _like(build_activation(activation), reference))
            new_module = site.module
        if new_module is not site.module:
            _set_child(model, site.path, new_module)
        report.modules.append(f"{site.path} ({type(site.module).__name__} -> {type(new_module).__name__}, {site.kind})")
    if ffn == "paper" and all(s.kind == "plain" for s in sites):
        report.notes.append("FFNs are already plain two-matrix FFNs: only the activation was replaced")
    report.params_after = _count(model)
    new_sites = find_ffn_sites(model)
    report.ffn_params_after = sum(_count(s.module) for s in new_sites)
    polycom_modules = [m for m in model.modules() if isinstance(m, PolyCom)]
    report.polycom_modules = len(polycom_modules)
    report.polycom_parameters = sum(_count(m) for m in polycom_modules)
    return report


def _gated_to_plain(site: FFNSite, activation: str, std: float, reference: torch.Tensor, report: ConversionReport,
                    expected_sizes: Optional[dict]) -> nn.Module:
    module = site.module
    up = module.up_proj
    hidden, intermediate = up.in_features, up.out_features
    bias = up.bias is not None
    size = matched_ffn_hidden_size(hidden, intermediate, gated=True, bias=bias)
    if expected_sizes and expected_sizes.get("ffn_hidden_size"):
        size = int(expected_sizes["ffn_hidden_size"])
    report.ffn_hidden_size = size
    device = "meta" if reference.device.type == "meta" else reference.device
    with torch.device(device):
        new = PlainFFN(hidden, size, build_activation(activation), bias=bias, init_std=std)
    return new.to(dtype=reference.dtype)


def _convert_experts(site: FFNSite, activation: str, ffn: str, coefficients: str, std: float, reference: torch.Tensor,
                     report: ConversionReport, expected_sizes: Optional[dict]) -> nn.Module:
    module = site.module
    gated = getattr(module, "gated", True)
    num_experts = module.num_experts
    hidden = module.hidden_dim
    intermediate = module.intermediate_dim

    def make_act():
        if coefficients == "per_expert":
            return _like(nn.ModuleList([build_activation(activation) for _ in range(num_experts)]), reference)
        return _like(build_activation(activation), reference)

    if ffn == "gated" or not gated:
        if coefficients == "shared" and not isinstance(module, PolyComExperts):
            # Keep transformers' own class (and its grouped_mm / batched_mm kernels): the
            # activation is applied row-wise, so one shared module per layer is exact.
            module.act_fn = make_act()
            return module
        weight_in = module.gate_up_proj if gated else module.up_proj
        return PolyComExperts(num_experts, hidden, intermediate, make_act(), gated=gated,
                              gate_up_proj=weight_in, down_proj=module.down_proj)
    size = matched_ffn_hidden_size(hidden, intermediate, gated=True)
    if expected_sizes and expected_sizes.get("expert_ffn_hidden_size"):
        size = int(expected_sizes["expert_ffn_hidden_size"])
    report.expert_ffn_hidden_size = size
    device = "meta" if reference.device.type == "meta" else reference.device
    return PolyComExperts(num_experts, hidden, size, make_act(), gated=False, init_std=std,
                          dtype=reference.dtype, device=device)


def _converted_class(base: type, spec: dict) -> type:
    """A subclass of the model class whose __init__ applies the recorded conversion, so that
    transformers' own from_pretrained (weight renaming, tied weights, sharding) loads it."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        _apply(self, spec, expected_sizes=spec)

    return type(f"PolyCom{base.__name__}", (base,), {"__init__": __init__, "__module__": base.__module__})


def load_converted(path: str, **kwargs) -> nn.Module:
    """Load a causal LM saved after :func:`convert` (any placement) with its coefficients.

    ``kwargs`` go to ``from_pretrained`` (e.g. ``dtype``). Models without ``config.polycom``
    (never converted, or built with ``hidden_act="polynorm"`` directly) load as usual.
    """
    register()
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isdir(path):
        raise UserError(f"model folder {path!r} does not exist")
    config = AutoConfig.from_pretrained(path)
    spec = getattr(config, "polycom", None)
    if not spec or spec.get("reload_with") != "polycom.hf.load_converted":
        return AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    base = AutoModelForCausalLM._model_mapping[type(config)]
    cls = _converted_class(base, {k: spec[k] for k in ("activation", "ffn", "coefficients", "ffn_hidden_size", "expert_ffn_hidden_size")})
    return cls.from_pretrained(path, config=config, **kwargs)

