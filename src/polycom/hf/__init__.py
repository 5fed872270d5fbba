"""polycom for Hugging Face transformers: registry, conversion, retrofit.

``import polycom.hf`` registers ``polynorm``, ``polyrelu`` (and ``relu2`` where missing) as
``hidden_act`` values, so ``LlamaConfig(hidden_act="polynorm")`` builds a model with one
set of PolyCom coefficients per layer that trains, saves and reloads with transformers.

    import polycom.hf
    report = polycom.hf.convert(model, activation="polynorm", ffn="gated")
    print(report)   # modules changed, parameter counts before/after
    model.save_pretrained(out); model = polycom.hf.load_converted(out)
"""

from .convert import SUPPORTED_FAMILIES, ConversionReport, FFNSite, convert, find_ffn_sites, load_converted
from .modules import PlainFFN, PolyComExperts, matched_ffn_hidden_size
from .registry import build_activation, hf_activation_names, is_registered, register

register()

__all__ = [
    "register",
    "is_registered",
    "hf_activation_names",
    "build_activation",
    "convert",
    "load_converted",
    "find_ffn_sites",
    "FFNSite",
    "ConversionReport",
    "SUPPORTED_FAMILIES",
    "PlainFFN",
    "PolyComExperts",
    "matched_ffn_hidden_size",
]
