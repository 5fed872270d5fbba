"""Register PolyCom activations with Hugging Face transformers.

transformers builds every MLP's activation with ``ACT2FN[config.hidden_act]`` (GPT-2:
``config.activation_function``). ``ACT2FN`` is a ``ClassInstantier``: an ordered copy of
``ACT2CLS`` whose ``__getitem__`` instantiates the class on every lookup. Each MLP therefore
gets its OWN module, so PolyCom coefficients are per layer and appear in ``state_dict``
(``model.layers.3.mlp.act_fn.weight`` / ``.bias``) and in every checkpoint. Because
``ACT2FN`` is a copy, a name has to be added to both dicts.

transformers initialises parameters it did not load with ``PreTrainedModel._init_weights``,
which knows Linear/Embedding/Norm modules but not ours (a PolyNorm loaded on the meta
device with no coefficients in the checkpoint would keep uninitialised memory). register()
therefore wraps the base ``_init_weights`` once so that PolyCom modules get the released
initialisation (weight = 1/r, bias = 0). It uses ``transformers.initialization``, which
skips parameters that were loaded from the checkpoint, so loaded coefficients are kept.
Model classes call ``super()._init_weights(module)`` first, so the wrapper reaches all.
"""

from __future__ import annotations

from typing import Dict

from torch import nn

from ..activations import PolyCom, PolyNorm, PolyReLU, ReLU2, get_activation, list_activations
from ..errors import UserError

__all__ = ["register", "is_registered", "hf_activation_names", "build_activation", "POLYCOM_HF_ACTIVATIONS"]

# name -> class instantiated by ACT2FN[name] (no constructor arguments: order 3 as the paper).
POLYCOM_HF_ACTIVATIONS: Dict[str, type] = {"polynorm": PolyNorm, "polyrelu": PolyReLU}
_REGISTERED = False


def _init_polycom(module: nn.Module) -> None:
    from transformers import initialization as init

    init.constant_(module.weight, 1.0 / module.weight.shape[0])
    init.zeros_(module.bias)


def _patch_init_weights() -> None:
    from transformers.modeling_utils import PreTrainedModel

    original = PreTrainedModel._init_weights
    if getattr(original, "_polycom_wrapped", False):
        return

    def _init_weights(self, module):
        original(self, module)
        if isinstance(module, PolyCom):
            _init_polycom(module)

    _init_weights._polycom_wrapped = True
    _init_weights.__doc__ = original.__doc__
    PreTrainedModel._init_weights = _init_weights


def register(overwrite_relu2: bool = False) -> None:
    """Add ``polynorm``, ``polyrelu`` (and ``relu2`` where missing) to transformers' ACT2FN.

    Idempotent; ``import polycom.hf`` calls it. After it, ``LlamaConfig(hidden_act="polynorm")``
    builds, trains, saves and reloads with the coefficients in the checkpoint.
    """
    global _REGISTERED
    from transformers import activations as hf_act

    table = dict(POLYCOM_HF_ACTIVATIONS)
    if "relu2" not in hf_act.ACT2CLS or overwrite_relu2:
        table["relu2"] = ReLU2
    for name, cls in table.items():
        hf_act.ACT2CLS[name] = cls
        # ACT2FN is a ClassInstantier built as a copy of ACT2CLS: add the name there too.
        dict.__setitem__(hf_act.ACT2FN, name, cls)
    _patch_init_weights()
    _REGISTERED = True


def is_registered(name: str) -> bool:
    from transformers.activations import ACT2FN

    return name in ACT2FN


def hf_activation_names() -> list:
    """Names usable as ``hidden_act`` for conversion: PolyCom members of the polycom registry."""
    names = []
    for name in list_activations():
        if name == "polycom":
            continue
        try:
            module = get_activation(name)
        except Exception:  # factories that need arguments
            continue
        if isinstance(module, PolyCom):
            names.append(name)
    return names


def build_activation(name: str) -> PolyCom:
    """A fresh PolyCom module for ``name``; UserError naming the registered ones otherwise."""
    key = str(name).lower()
    known = hf_activation_names()
    if key not in known:
        raise UserError(f"activation {name!r} is not a registered PolyCom activation; registered: {', '.join(known)}")
    return get_activation(key)
