"""The decision per candidate: adopt / pilot-further / reject, with the reason in plain words.

The rule, in order (thresholds in :class:`polycom.compare.config.Thresholds`):

1. A run that diverged (the divergence guard ran out of rollbacks) -> reject.
   A run that crashed for another reason -> pilot-further (evidence incomplete; re-run).
2. Stopped by the futility rule on any seed -> reject (it trailed the baseline by more
   than the margin).
3. Did not reach the baseline's final validation loss within the same token budget:
   reject when it is worse by more than ``reject_loss_margin`` nats or significantly
   worse (p <= ``max_p_value``); otherwise pilot-further (within noise).
4. Wall-clock speedup to the same quality (tokens speedup / step-time ratio) below
   ``reject_max_speedup`` -> reject (fewer tokens do not pay for the slower steps).
5. Adopt (for a larger pilot) only if all hold: wall-clock speedup >=
   ``adopt_min_speedup``, lower final validation loss with p <= ``max_p_value``, at least
   ``min_seeds_to_adopt`` seeds, step time and peak memory ratios within their maxima.
6. Otherwise pilot-further, naming what was missing.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from .config import Thresholds

DISPLAY_NAMES = {
    "swiglu": "SwiGLU", "geglu": "GeGLU", "gelu": "GELU", "gelu_tanh": "GELU (tanh)", "relu": "ReLU",
    "relu2": "ReLU²", "silu": "SiLU", "polyrelu": "PolyReLU", "polynorm": "PolyNorm", "polycom": "PolyCom",
    "identity": "Identity",
}


def display_name(activation: str) -> str:
    return DISPLAY_NAMES.get(activation, activation)


def _pct_change(ratio: float) -> str:
    """1.04 -> '4% higher', 0.97 -> '3% lower'."""
    pct = (ratio - 1.0) * 100.0
    if abs(pct) < 0.5:
        return "the same"
    return f"{abs(pct):.0f}% {'higher' if pct > 0 else 'lower'}"


def _p_text(p: Optional[float]) -> str:
    if p is None:
        return "p n/a"
    return f"p = {p:.2g}" if p >= 0.001 else "p < 0.001"


def _seeds_text(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


def headline(cmp: Dict[str, Any], baseline: str) -> str:
    """The quality/cost sentence of one comparison (no decision)."""
    name, base = display_name(cmp["activation"]), display_name(baseline)
    step = cmp.get("step_time_ratio")
    step_txt = f" at {_pct_change(step)} step time" if step is not None else ""
    if step is not None and _pct_change(step) == "the same":
        step_txt = " at the same step time"
    speed = cmp.get("tokens_to_target_speedup")
    if cmp.get("stopped"):
        return f"{name} was stopped early: {cmp['stop_reasons'][0]}"
    if cmp.get("diverged"):
        return f"{name}'s training diverged ({cmp['errors'][0]})"
    if cmp.get("failed"):
        return f"{name}'s training failed ({cmp['errors'][0]})"
    if speed is not None:
        fewer = 1.0 - 1.0 / speed
        if fewer >= 0.005:
            tok_txt = f"with {fewer * 100:.0f}% fewer tokens"
        elif fewer <= -0.005:
            tok_txt = f"with {-fewer * 100:.0f}% more tokens"
        else:
            tok_txt = "with the same tokens"
        text = f"{name} reached {base}'s final validation loss {tok_txt}{step_txt}"
        ws = cmp.get("wall_clock_speedup")
        if ws is not None:
            text += f": {ws:.2f}x {'faster' if ws >= 1 else 'slower'} to the same quality" if abs(ws - 1) >= 0.005 else ": equally fast to the same quality"
        return text
    delta = cmp.get("val_loss_delta")
    reached = cmp.get("reached", "")
    tail = f" (reached it in {reached} seeds)" if reached and not reached.startswith("0/") else ""
    if delta is None:
        return f"{name} has no final validation loss to compare"
    return (f"{name} did not reach {base}'s final validation loss within the same token budget{tail}: "
            f"final loss {delta:+.4f} nats vs {base}{step_txt}")


def decide(cmp: Dict[str, Any], baseline: str, th: Thresholds) -> Dict[str, Any]:
    """Decision and plain-words reason for one candidate comparison (see module docstring)."""
    n = int(cmp.get("n_seeds") or 0)
    p = cmp.get("p_value")
    delta = cmp.get("val_loss_delta")
    ws = cmp.get("wall_clock_speedup")
    step = cmp.get("step_time_ratio")
    mem = cmp.get("memory_ratio")
    head = headline(cmp, baseline)
    evidence = f"{_seeds_text(n)}, {_p_text(p)}" if n >= 2 else f"{_seeds_text(n)}, no confidence interval or p-value can be given"

    def out(decision: str, why: str) -> Dict[str, Any]:
        verb = {"adopt": "adopt for a larger pilot", "pilot-further": "pilot further", "reject": "reject"}[decision]
        return {"activation": cmp["activation"], "decision": decision,
                "reason": f"{head}; {evidence}: {verb}" + (f" ({why})" if why else "")}

    if cmp.get("diverged"):
        return out("reject", "training diverged: the divergence guard ran out of rollbacks")
    if n == 0 and not cmp.get("stopped") and not cmp.get("failed"):
        return {"activation": cmp["activation"], "decision": "pilot-further",
                "reason": f"{display_name(cmp['activation'])} has no finished run yet, so there is no evidence; "
                          "re-run the same command to finish the sweep"}
    if cmp.get("failed"):
        return out("pilot-further", "a run crashed, so the evidence is incomplete; fix and re-run the same command")
    if cmp.get("stopped"):
        return out("reject", f"futility rule, margin {cmp.get('futility_margin'):g} nats" if cmp.get("futility_margin") is not None else "stopped early")
    if cmp.get("tokens_to_target_speedup") is None:
        if delta is None:
            return out("pilot-further", "no comparable final validation loss")
        significant = p is not None and p <= th.max_p_value and delta > 0
        if delta > th.reject_loss_margin or significant:
            return out("reject", f"worse by {delta:.4f} nats" + (f", significant at {th.max_p_value:g}" if significant else f" > margin {th.reject_loss_margin:g}"))
        return out("pilot-further", f"behind by only {delta:.4f} nats <= margin {th.reject_loss_margin:g}, within noise")
    if ws is not None and ws < th.reject_max_speedup:
        return out("reject", f"{ws:.2f}x < reject threshold {th.reject_max_speedup:.2f}x")
    missing: List[str] = []
    if ws is None:
        missing.append("no step-time measurement for a wall-clock speedup")
    elif ws < th.adopt_min_speedup:
        missing.append(f"speedup {ws:.2f}x < adopt threshold {th.adopt_min_speedup:.2f}x")
    if n < th.min_seeds_to_adopt:
        missing.append(f"adopting needs >= {th.min_seeds_to_adopt} seeds; re-run with --set seeds={th.min_seeds_to_adopt}")
    elif p is None or p > th.max_p_value or (delta is not None and delta >= 0):
        missing.append(f"loss improvement not significant ({_p_text(p)} > {th.max_p_value:g})" if p is not None and p > th.max_p_value
                       else "no significant loss improvement")
    if step is not None and step > th.max_step_time_ratio:
        missing.append(f"step time {step:.2f}x > max {th.max_step_time_ratio:.2f}x")
    if mem is not None and mem > th.max_memory_ratio:
        missing.append(f"peak memory {mem:.2f}x > max {th.max_memory_ratio:.2f}x")
    if not missing:
        return out("adopt", "")
    return out("pilot-further", "; ".join(missing))


def decide_all(comparisons: List[Dict[str, Any]], baseline: str, th: Thresholds) -> List[Dict[str, Any]]:
    return [decide(c, baseline, th) for c in comparisons]
