r"""Least-squares calibration of PolyCom coefficients after a gated swap.

With the FFN's weights fixed, its output is LINEAR in the PolyCom coefficients:

    down((sum_j w_j B_j(g) + b) * up)  =  sum_j w_j down_0(B_j(g) * up) + b down_0(up) + down.bias

where g = gate(x), B_j is the j-th basis function of the activation (PolyNorm: N(g^(r-j));
PolyReLU: relu(g)^(r-j); ``weight[0]`` multiplies the highest power, as released) and down_0
is the down projection without its bias. Plain FFNs are the same with up = 1. So for the
coefficient vector c = (w_0..w_{r-1}, b), the MLP output is F c with features F (per token:
m = r + 1 vectors of size d_model), and matching the ORIGINAL MLP's output y on recorded
inputs is ordinary least squares, solved exactly from the normal equations

    (sum_t F_t^T F_t) c = sum_t F_t^T y_t,

accumulated streaming in float64 (an m x m Gram matrix per layer: memory is independent of
the number of calibration tokens). A tiny ridge (1e-8 of the mean diagonal) guards against
a singular Gram matrix.

MoE: the experts' block output is sum_e p_e expert_e(x), still linear in shared coefficients,
so shared coefficients are fitted exactly on the block output. Per-expert coefficients are
fitted per expert on that expert's own routed contribution (decoupled; the joint problem
couples the top-k experts of each token).

Two modes, both one forward pass over the calibration tokens:

- ``parallel``: each converted FFN returns the ORIGINAL FFN's output during the pass, so every
  layer is fitted on the inputs the original model gives it, independently of the others.
- ``sequential`` (GPTQ-style): the calibration tokens go through as ONE batch; at each FFN the
  fit is solved as soon as its inputs are recorded, and the FFN then returns its output with
  the fitted coefficients, so every later layer is fitted on the inputs of the already
  calibrated swapped model (target: the original FFN applied to those inputs). This lets later
  layers compensate for the residual errors of earlier ones.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..activations import PolyCom
from ..errors import UserError
from .convert import FFNSite, find_ffn_sites
from .modules import PlainFFN, PolyComExperts

__all__ = ["calibrate", "polycom_basis", "LeastSquares"]


def polycom_basis(act: PolyCom, x: torch.Tensor) -> List[torch.Tensor]:
    """The r basis functions of ``act`` at ``x``, in ``weight`` order (highest power first)."""
    order = act.weight.shape[0]
    if act.composition == "type2":
        return [act._inner(x ** (order - j)) for j in range(order)]
    inner = act._inner(x)
    return [inner ** (order - j) for j in range(order)]


def _coefficients(act: PolyCom) -> torch.Tensor:
    return torch.cat([act.weight.detach().reshape(-1), act.bias.detach().reshape(-1)]).double().cpu()


class LeastSquares:
    """Streaming normal equations for min_c sum_t ||F_t c - y_t||^2 (float64)."""

    def __init__(self, size: int):
        self.gram = torch.zeros(size, size, dtype=torch.float64)
        self.rhs = torch.zeros(size, dtype=torch.float64)
        self.target_energy = 0.0
        self.tokens = 0

    def add(self, features: torch.Tensor, target: torch.Tensor) -> None:
        """features (T, m, d), target (T, d)."""
        f = features.detach().double().cpu()
        y = target.detach().double().cpu()
        self.gram += torch.einsum("tid,tjd->ij", f, f)
        self.rhs += torch.einsum("tid,td->i", f, y)
        self.target_energy += float((y * y).sum())
        self.tokens += f.shape[0]

    def solve(self, ridge: float = 1e-8) -> torch.Tensor:
        diag = self.gram.diagonal().mean().clamp_min(1e-30)
        system = self.gram + ridge * diag * torch.eye(self.gram.shape[0], dtype=torch.float64)
        return torch.linalg.solve(system, self.rhs)

    def relative_error(self, c: torch.Tensor) -> float:
        """||F c - y||^2 / ||y||^2 over everything added."""
        c = c.double()
        residual = self.target_energy - 2 * float(c @ self.rhs) + float(c @ self.gram @ c)
        return max(residual, 0.0) / max(self.target_energy, 1e-30)


def _out_linear(module: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Output projection WITHOUT its bias (nn.Linear or GPT-2's Conv1D)."""
    if isinstance(module, nn.Linear):
        return F.linear(z, module.weight)
    return z @ module.weight  # Conv1D: weight (in, out)


def _out_bias(module: nn.Module):
    return getattr(module, "bias", None)


class _DenseUnit:
    def __init__(self, site: FFNSite, original: nn.Module):
        self.site = site
        self.original = original
        self.act = site.activation
        self.acc = LeastSquares(self.act.weight.shape[0] + 1)
        self.initial = _coefficients(self.act)

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        module = self.site.module
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        out = getattr(module, self.site.out_attr)
        if self.site.kind == "gated":
            gate, up = module.gate_proj(x), module.up_proj(x)
            target = _out_linear(out, self.original(gate) * up)
            feats = [_out_linear(out, b * up) for b in polycom_basis(self.act, gate)] + [_out_linear(out, up)]
        else:
            hidden = getattr(module, self.site.in_attr)(x)
            target = _out_linear(out, self.original(hidden))
            feats = [_out_linear(out, b) for b in polycom_basis(self.act, hidden)]
            feats.append(_out_linear(out, torch.ones_like(hidden)))
        self.acc.add(torch.stack(feats, dim=1), target)
        bias = _out_bias(out)
        full = target if bias is None else target + bias
        return full.reshape(*shape[:-1], full.shape[-1])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        target = self.observe(x).to(x.dtype)
        if not self.sequential:
            return target
        self.solved = self.results(self.ridge)
        return type(self.site.module).forward(self.site.module, x)

    def results(self, ridge: float) -> List[dict]:
        c = self.acc.solve(ridge)
        _set_coefficients(self.act, c)
        return [_stats(self.site, None, self.acc, self.initial, c)]


class _ExpertsUnit:
    def __init__(self, site: FFNSite, original: nn.Module):
        self.site = site
        self.original = original
        module = site.module
        self.per_expert = isinstance(module, PolyComExperts) and module.per_expert
        self.gated = getattr(module, "gated", True)
        acts = list(module.act_fn) if self.per_expert else [module.act_fn]
        self.acts = acts
        size = acts[0].weight.shape[0] + 1
        self.accs = [LeastSquares(size) for _ in acts]
        self.initial = [_coefficients(a) for a in acts]

    def _expert_input_weight(self, expert: int) -> torch.Tensor:
        module = self.site.module
        return module.gate_up_proj[expert] if self.gated else module.up_proj[expert]

    def observe(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        module = self.site.module
        x = hidden_states.float()
        tokens, d = x.shape
        size = self.accs[0].gram.shape[0]
        target = torch.zeros(tokens, d)
        features = None if self.per_expert else torch.zeros(tokens, size, d)
        num_experts = module.num_experts
        mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        for expert in range(num_experts):
            top_k_pos, token_idx = torch.where(mask[expert])
            if token_idx.numel() == 0:
                continue
            act = self.acts[expert] if self.per_expert else self.acts[0]
            projected = F.linear(x[token_idx], self._expert_input_weight(expert))
            if self.gated:
                gate, up = projected.chunk(2, dim=-1)
            else:
                gate, up = projected, torch.ones_like(projected)
            down = module.down_proj[expert]
            weight = top_k_weights[token_idx, top_k_pos, None].float()
            contribution = F.linear(self.original(gate) * up, down) * weight
            feats = torch.stack([F.linear(b * up, down) for b in polycom_basis(act, gate)] + [F.linear(up, down)], dim=1)
            feats = feats * weight[:, :, None]
            target.index_add_(0, token_idx, contribution)
            if self.per_expert:
                self.accs[expert].add(feats, contribution)
            else:
                features.index_add_(0, token_idx, feats)
        if not self.per_expert:
            self.accs[0].add(features, target)
        return target.to(hidden_states.dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        target = self.observe(hidden_states, top_k_index, top_k_weights)
        if not self.sequential:
            return target
        self.solved = self.results(self.ridge)
        return type(self.site.module).forward(self.site.module, hidden_states, top_k_index, top_k_weights)

    def results(self, ridge: float) -> List[dict]:
        out = []
        for expert, (act, acc, initial) in enumerate(zip(self.acts, self.accs, self.initial)):
            if acc.tokens == 0:  # an expert no calibration token reached keeps its coefficients
                continue
            c = acc.solve(ridge)
            _set_coefficients(act, c)
            out.append(_stats(self.site, expert if self.per_expert else None, acc, initial, c))
        return out


def _set_coefficients(act: PolyCom, c: torch.Tensor) -> None:
    order = act.weight.shape[0]
    with torch.no_grad():
        act.weight.copy_(c[:order].to(act.weight.dtype))
        act.bias.copy_(c[order:].to(act.bias.dtype))


def _stats(site: FFNSite, expert: Optional[int], acc: LeastSquares, initial: torch.Tensor, c: torch.Tensor) -> dict:
    return {
        "module": site.path,
        "layer": site.layer,
        "expert": expert,
        "tokens": acc.tokens,
        "relative_error_before": acc.relative_error(initial),
        "relative_error_after": acc.relative_error(c),
        "weight": [float(v) for v in c[:-1]],
        "bias": [float(c[-1])],
    }


@torch.no_grad()
def calibrate(model: nn.Module, original_activations: Dict[str, nn.Module], batches: Iterable[torch.Tensor],
              ridge: float = 1e-8, mode: str = "parallel") -> List[dict]:
    """Fit every PolyCom coefficient set of a gated-converted ``model`` by least squares.

    Args:
        model: converted with ``convert(..., ffn="gated")`` (or a plain-FFN model).
        original_activations: ``ConversionReport.original_activations`` (path -> replaced module).
        batches: token-id tensors (batch, seq) to record FFN inputs on.
        mode: ``parallel`` (each layer on the original model's inputs) or ``sequential`` (each
            layer on the calibrated swapped model's inputs; the batches are run as one batch).

    Returns one dict per coefficient set: module, layer, expert, tokens, relative squared error
    of the FFN output before (initial coefficients) and after the fit, fitted weight and bias.
    """
    if mode not in ("parallel", "sequential"):
        raise UserError(f"calibration mode must be parallel or sequential; got {mode!r}")
    batches = list(batches)
    if mode == "sequential" and len(batches) > 1:
        batches = [torch.cat(batches, dim=0)]
    units = []
    patched: List[nn.Module] = []
    for site in find_ffn_sites(model):
        original = original_activations.get(site.path)
        if original is None:
            continue
        if isinstance(site.module, PlainFFN) or (isinstance(site.module, PolyComExperts) and not site.module.gated):
            raise UserError("calibration needs the gated placement (ffn='gated'): the paper placement has new FFN weights")
        if not isinstance(site.activation, PolyCom) and not (isinstance(site.activation, nn.ModuleList)):
            continue
        unit = _ExpertsUnit(site, original) if site.kind == "experts" else _DenseUnit(site, original)
        unit.sequential, unit.ridge, unit.solved = mode == "sequential", ridge, None
        units.append(unit)
        # The FFN's forward is replaced for the pass: it records features and returns the
        # ORIGINAL FFN's output (the PolyCom output would be discarded, so it is not computed).
        site.module.forward = unit.forward
        patched.append(site.module)
    if not units:
        raise UserError("no converted PolyCom FFN to calibrate; run polycom.hf.convert(model, ffn='gated') first")
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    finally:
        for module in patched:
            del module.forward  # back to the class's forward
        model.train(was_training)
    results = []
    for unit in units:
        results.extend(unit.solved if unit.solved is not None else unit.results(ridge))
    return results
