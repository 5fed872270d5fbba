"""Checkpoints: model, optimiser, schedule, RNG states, data position; written atomically.

Everything stored is a tensor or a plain Python value, so checkpoints load with
``torch.load(weights_only=True)`` (no pickled code runs when reading a file).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from ..errors import UserError
from ..utils.io import atomic_save_torch

__all__ = ["save_checkpoint", "load_checkpoint", "capture_rng", "restore_rng"]


def capture_rng() -> Dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    atomic_save_torch(path, state)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load a checkpoint; a damaged or foreign file is a UserError (one line), not a traceback."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, wrong format, unpickling refused, ...
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}); delete it to restart the run, or use a new --out") from None
    required = ("model", "optimizer", "schedule", "rng", "step", "config")
    if not isinstance(state, dict) or any(k not in state for k in required):
        raise UserError(f"checkpoint {path} is not a polycom training checkpoint (missing model/optimizer/step); use a new --out")
    return state
