"""Post-training measurements of one run: cost at inference, memory, and the paper's analyses.

All measured on the run's final weights, on CPU, in the sweep's process:

- ``prefill_ms``: one forward over a ``prompt_tokens``-long prompt from the validation
  split, building the KV cache; ``decode_ms_per_token``: N greedy single-token steps on
  that cache, divided by N. Medians (and p20/p80) over repeats after a warm-up, measured
  for all runs of the sweep in one interleaved session (:func:`interleaved_latency`).
- ``saved_bytes_per_ffn_activation``: bytes the FFN activation keeps for the backward
  pass on a training-shaped batch, counted exactly with
  ``torch.autograd.graph.saved_tensors_hooks`` while inside the activation module (each
  storage counted once), averaged over layers; also as a ratio to the activation's input.
- ``flops_per_token``: model FLOPs per token (6N + attention term) from the workbench.
- ``effective_rank``: per layer, the entropy effective rank exp(H(p)), p = s / sum(s) over
  the singular values s of each FFN weight matrix (Roy & Vetterli 2007; the paper's
  analysis), averaged over the layer's FFN matrices; per matrix in ``effective_rank_detail``.
- ``layer_similarity``: cosine similarity between the hidden states of every pair of
  layers (embedding output and each block's output), averaged over the tokens of
  ``similarity_batches`` validation batches; the paper reports lower similarity of
  successive layers for PolyCom.
- ``coefficients``: the learned PolyCom weight/bias of each layer at the end.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

import polycom
from polycom.activations import PolyCom


# --------------------------------------------------------------------------- peak memory

def current_rss_mb() -> Optional[float]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def release_free_memory() -> None:
    """Give freed memory back to the OS (gc, then glibc's malloc_trim), so a run's peak RSS
    is not inflated by what earlier runs of the same sweep left in the heap."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux: ``/proc/self/clear_refs`` with 5), so the next
    reading is the peak of what follows. Returns False where that is not possible."""
    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> Optional[float]:
    """Process peak RSS in MiB (VmHWM on Linux, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except Exception:  # pragma: no cover
        return None


# --------------------------------------------------------------------------- linear algebra

def effective_rank(matrix: torch.Tensor) -> float:
    """Entropy effective rank exp(-sum p_i log p_i), p = s / sum(s) of the singular values.

    Ranges from 1 (rank one) to min(rows, cols) (all singular values equal).
    """
    s = torch.linalg.svdvals(matrix.detach().to(torch.float64))
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def layer_cosine_similarity(hidden_states: List[torch.Tensor]) -> np.ndarray:
    """(L, L) matrix: mean over tokens of cos(h_i[token], h_j[token]) for every layer pair."""
    flat = [h.detach().reshape(-1, h.shape[-1]).to(torch.float64) for h in hidden_states]
    normed = [f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12) for f in flat]
    n = len(normed)
    out = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = float((normed[i] * normed[j]).sum(-1).mean())
    return out


# --------------------------------------------------------------------------- model plumbing

def ffn_modules(model: nn.Module) -> List[nn.Module]:
    """Each block's FFN (contract: ``model.blocks[i].ffn``)."""
    return [block.ffn for block in model.blocks]


def ffn_linear_weights(ffn: nn.Module) -> Dict[str, torch.Tensor]:
    """Weight matrices of an FFN's nn.Linear modules, by name (experts included)."""
    out = {}
    for name, module in ffn.named_modules():
        if isinstance(module, nn.Linear) and "router" not in name and "gate_proj_router" not in name:
            out[name or "linear"] = module.weight
    # Expert weights stored as 3-D parameters (E, out, in) rather than nn.Linear.
    for name, param in ffn.named_parameters():
        if param.dim() == 3:
            for e in range(param.shape[0]):
                out[f"{name}[{e}]"] = param[e]
    return out


def activation_modules(ffn: nn.Module, activation: str) -> List[nn.Module]:
    """The activation module(s) inside an FFN: modules of the type the registry builds for
    ``activation`` (outermost only, so a GatedActivation's inner SiLU is not double-counted)."""
    wanted = type(polycom.get_activation(activation))
    found: List[nn.Module] = []
    for module in ffn.modules():
        if type(module) is wanted and not any(module is m or _contains(m, module) for m in found):
            found.append(module)
    return found


def _contains(parent: nn.Module, child: nn.Module) -> bool:
    return any(m is child for m in parent.modules())


def find_polycom_modules(model: nn.Module) -> List[PolyCom]:
    return [m for m in model.modules() if isinstance(m, PolyCom)]


# --------------------------------------------------------------------------- measurements

def _prefill_and_decode(model: nn.Module, prompt: torch.Tensor, decode_tokens: int):
    """One timed prefill (forward over the prompt, building the KV cache) and one timed
    greedy decode of ``decode_tokens`` single-token steps on that cache; seconds."""
    t0 = time.perf_counter()
    out = model(prompt, use_cache=True)
    t1 = time.perf_counter()
    next_id = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    for _ in range(decode_tokens):
        out = model(next_id, kv_cache=out.kv_cache)
        next_id = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / decode_tokens


def _quantiles(times: List[float]) -> Dict[str, float]:
    arr = np.asarray(times) * 1e3
    return {"median": float(np.median(arr)), "p20": float(np.percentile(arr, 20)), "p80": float(np.percentile(arr, 80))}


def interleaved_latency(models: Dict[Any, nn.Module], prompt: torch.Tensor, decode_tokens: int, repeats: int) -> Dict[Any, Dict[str, Any]]:
    """Inference latency of several models measured in the same time window.

    Each repeat times every model once (prefill, then per-token decode with the KV cache),
    in an order rotated from repeat to repeat, after one warm-up round; medians and
    p20/p80 per model. Interleaving matters on a shared machine: load that comes and goes
    hits every model alike, so their ratios stay meaningful.
    """
    keys = list(models)
    prefill: Dict[Any, List[float]] = {k: [] for k in keys}
    decode: Dict[Any, List[float]] = {k: [] for k in keys}
    for m in models.values():
        m.eval()
    # no_grad, not inference_mode: the fused PolyCom kernels write outputs from pool threads,
    # where the thread-local inference mode does not hold and in-place writes into inference
    # tensors are refused (seen with 2+ torch threads on the tiny preset).
    with torch.no_grad():
        for k in keys:  # warm-up round (allocations, lazy init)
            _prefill_and_decode(models[k], prompt, decode_tokens)
        for r in range(repeats):
            shift = r % len(keys)
            for k in keys[shift:] + keys[:shift]:
                p, d = _prefill_and_decode(models[k], prompt, decode_tokens)
                prefill[k].append(p)
                decode[k].append(d)
    out = {}
    for k in keys:
        pq, dq = _quantiles(prefill[k]), _quantiles(decode[k])
        out[k] = {"prefill_ms": pq["median"], "prefill_ms_p20": pq["p20"], "prefill_ms_p80": pq["p80"],
                  "decode_ms_per_token": dq["median"], "decode_ms_per_token_p20": dq["p20"], "decode_ms_per_token_p80": dq["p80"],
                  "prompt_tokens": int(prompt.shape[1]), "decode_tokens": int(decode_tokens), "repeats": int(repeats)}
    return out


def interleaved_step_time(models: Dict[Any, nn.Module], batch, repeats: int) -> Dict[Any, Dict[str, float]]:
    """Training step time (forward + backward + AdamW update on one fixed batch) of several
    models in the same time window, rotated per round after a warm-up round; median and
    p20/p80 per model. The sequential runs' own step times are taken minutes apart and a
    shared machine's load can change in between; these ratios are the comparable ones.
    The models are copies: their weights change, the runs' saved weights do not."""
    import copy

    x, y = batch
    work = {k: copy.deepcopy(m).train() for k, m in models.items()}
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-6) for k, m in work.items()}
    keys = list(work)

    def step(k):
        out = work[k](x, targets=y)
        out.loss.backward()
        optims[k].step()
        optims[k].zero_grad(set_to_none=True)

    for k in keys:
        step(k)
    times: Dict[Any, List[float]] = {k: [] for k in keys}
    # At least 10 rounds: with 5, one burst of load on a shared machine moved a ratio by 25%.
    for r in range(max(int(repeats), 10)):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            t0 = time.perf_counter()
            step(k)
            times[k].append(time.perf_counter() - t0)
    out = {}
    first = keys[0]
    for k in keys:
        q = _quantiles(times[k])
        # Paired ratio to the first model (the baseline: runs are ordered baseline first): the
        # median over rounds of (this / first) in the same round cancels load shared by both.
        paired = float(np.median(np.asarray(times[k]) / np.asarray(times[first])))
        out[k] = {"step_time_interleaved_s": q["median"] / 1e3, "step_time_interleaved_p20_s": q["p20"] / 1e3,
                  "step_time_interleaved_p80_s": q["p80"] / 1e3, "step_time_paired_ratio": paired,
                  "step_time_paired_to": first}
    return out


def latency_prompt(dataset, measure_cfg, seq_len: int, max_seq_len: int):
    """The prompt (first validation window, batch 1) and the number of tokens to decode,
    clipped so prompt + decoded tokens fit the model's context."""
    seq_len = min(int(measure_cfg.seq_len or seq_len), max_seq_len)
    x, _ = next(iter(dataset.eval_batches(1, seq_len, 1)))
    prompt_len = max(1, min(measure_cfg.prompt_tokens, seq_len, max_seq_len - measure_cfg.decode_tokens))
    decode = max(1, min(measure_cfg.decode_tokens, max_seq_len - prompt_len))
    return x[:, :prompt_len].clone(), decode


def saved_bytes_per_activation(model: nn.Module, activation: str, input_ids: torch.Tensor, targets: torch.Tensor) -> Dict[str, Any]:
    """Bytes saved for backward inside each FFN activation on one training-shaped batch."""
    model.train()
    acts = [activation_modules(ffn, activation) for ffn in ffn_modules(model)]
    flat = [m for layer in acts for m in layer]
    if not flat:
        return {"saved_bytes_per_ffn_activation": None, "saved_bytes_ratio": None,
                "note": f"no {activation} module found inside the FFNs"}
    state = {"current": None}
    saved: Dict[int, Dict[int, int]] = {id(m): {} for m in flat}
    input_bytes: Dict[int, int] = {id(m): 0 for m in flat}

    def pre_hook(module, args):
        state["current"] = id(module)
        input_bytes[id(module)] += sum(a.numel() * a.element_size() for a in args if torch.is_tensor(a))

    def post_hook(module, args, output):
        state["current"] = None

    def pack(t: torch.Tensor):
        cur = state["current"]
        if cur is not None:
            try:
                key = t.untyped_storage().data_ptr()
                size = t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):
                key, size = id(t), t.numel() * t.element_size()
            saved[cur][key] = max(saved[cur].get(key, 0), size)
        return t

    handles = []
    for m in flat:
        handles.append(m.register_forward_pre_hook(pre_hook))
        handles.append(m.register_forward_hook(post_hook))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids, targets=targets)
        del out
    finally:
        for h in handles:
            h.remove()
    per_layer = []
    ratios = []
    for layer in acts:
        total = sum(sum(saved[id(m)].values()) for m in layer)
        inp = sum(input_bytes[id(m)] for m in layer)
        per_layer.append(total)
        if inp:
            ratios.append(total / inp)
    return {
        "saved_bytes_per_ffn_activation": float(np.mean(per_layer)),
        "saved_bytes_per_layer": per_layer,
        "saved_bytes_ratio": float(np.mean(ratios)) if ratios else None,
        "saved_bytes_batch_shape": list(input_ids.shape),
    }


def hidden_state_similarity(model: nn.Module, batches: List[torch.Tensor]) -> Dict[str, Any]:
    model.eval()
    total = None
    with torch.no_grad():
        for ids in batches:
            out = model(ids, output_hidden_states=True)
            sim = layer_cosine_similarity(list(out.hidden_states))
            total = sim if total is None else total + sim
    matrix = total / len(batches)
    adjacent = [float(matrix[i, i + 1]) for i in range(matrix.shape[0] - 1)]
    return {"layer_similarity": matrix.tolist(), "adjacent_similarity": adjacent,
            "mean_adjacent_similarity": float(np.mean(adjacent)) if adjacent else None}


def ffn_effective_ranks(model: nn.Module) -> Dict[str, Any]:
    per_layer, detail = [], []
    for ffn in ffn_modules(model):
        ranks = {name: effective_rank(w) for name, w in ffn_linear_weights(ffn).items()}
        detail.append(ranks)
        per_layer.append(float(np.mean(list(ranks.values()))) if ranks else None)
    return {"effective_rank": per_layer, "effective_rank_detail": detail}


def polycom_coefficients(model: nn.Module) -> List[Dict[str, Any]]:
    return [{"layer": i, "weight": m.weight.detach().float().tolist(), "bias": m.bias.detach().float().flatten().tolist()}
            for i, m in enumerate(find_polycom_modules(model))]


def measure_model(model: nn.Module, activation: str, dataset, measure_cfg, seq_len: int, max_seq_len: int) -> Dict[str, Any]:
    """Every per-model measurement but latency (see :func:`interleaved_latency`).

    Inputs come from ``dataset.eval_batches`` (fixed validation windows, independent of
    the seed), so every run is measured on the same tokens.
    """
    torch.manual_seed(0)
    result: Dict[str, Any] = {}
    seq_len = min(int(measure_cfg.seq_len or seq_len), max_seq_len)
    batches = list(dataset.eval_batches(measure_cfg.batch_size, seq_len, max(1, measure_cfg.similarity_batches)))

    ids, targets = batches[0]
    result.update(saved_bytes_per_activation(model, activation, ids, targets))
    model.zero_grad(set_to_none=True)

    result.update(hidden_state_similarity(model, [x for x, _ in batches]))
    result.update(ffn_effective_ranks(model))
    result["coefficients"] = polycom_coefficients(model)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
