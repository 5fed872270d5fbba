"""The statistics, the futility rule and the verdict against hand-computed values."""

from __future__ import annotations

import math

import pytest

from polycom.compare import stats
from polycom.compare.config import Thresholds
from polycom.compare.sweep import FutilityRule
from polycom.compare.verdict import decide, headline

# Student-t quantiles t_{0.975, df} from printed tables.
T975 = {2: 4.302652729911275, 3: 3.182446305284263}


def test_mean_ci_matches_hand_computation():
    out = stats.mean_ci([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3)  # sample sd = sqrt(5/3)
    half = T975[3] * sd / 2.0
    assert out["n"] == 4 and out["mean"] == pytest.approx(2.5)
    assert out["std"] == pytest.approx(1.2909944487)
    assert out["ci95"] == pytest.approx([2.5 - half, 2.5 + half], rel=1e-9)
    assert out["ci95"][0] == pytest.approx(0.4457397, abs=1e-6)


def test_one_seed_gives_no_interval_and_says_so():
    out = stats.mean_ci([3.2])
    assert out["mean"] == 3.2 and out["ci95"] is None
    assert "no confidence interval" in out["note"]
    w = stats.welch_test([3.0], [3.1])
    assert w["delta"] == pytest.approx(-0.1) and w["ci95"] is None and w["p_value"] is None
    assert "1 seed" in w["note"]
    assert stats.mean_ci([None, float("nan")])["mean"] is None


def test_welch_test_by_hand():
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]
    out = stats.welch_test(a, b)
    va, vb = 1.0, 5.0 / 3.0                      # sample variances
    se2 = va / 3 + vb / 4                        # 0.75
    df = se2**2 / ((va / 3) ** 2 / 2 + (vb / 4) ** 2 / 3)
    t = -3.5 / math.sqrt(se2)
    assert out["delta"] == pytest.approx(-3.5)
    assert out["df"] == pytest.approx(df) and df == pytest.approx(4.9592, abs=1e-4)
    # Two-sided p from the t distribution with the Welch-Satterthwaite df.
    from scipy.stats import t as student_t

    assert out["p_value"] == pytest.approx(2 * student_t.sf(abs(t), df), rel=1e-9)
    assert 0.005 < out["p_value"] < 0.02
    half = student_t.ppf(0.975, df) * math.sqrt(se2)
    assert out["ci95"] == pytest.approx([-3.5 - half, -3.5 + half])
    assert out["test"] == "welch"


def test_paired_test_by_hand():
    cand, base = [1.0, 2.0, 4.0], [1.5, 2.1, 4.6]
    out = stats.paired_test(cand, base)
    # differences -0.5, -0.1, -0.6: mean -0.4, sample sd sqrt(0.07)
    sd = math.sqrt(0.07)
    half = T975[2] * sd / math.sqrt(3)
    assert out["delta"] == pytest.approx(-0.4)
    assert out["ci95"] == pytest.approx([-0.4 - half, -0.4 + half])
    assert out["ci95"][0] == pytest.approx(-1.057235, abs=1e-5)
    t = -0.4 / (sd / math.sqrt(3))
    from scipy.stats import t as student_t

    assert out["p_value"] == pytest.approx(2 * student_t.sf(abs(t), 2))
    assert out["test"] == "paired"


def test_compare_final_losses_pairs_only_when_seeds_match():
    paired = stats.compare_final_losses({0: 1.0, 1: 2.0, 2: 4.0}, {0: 1.5, 1: 2.1, 2: 4.6})
    assert paired["test"] == "paired"
    unpaired = stats.compare_final_losses({0: 1.0, 1: 2.0, 2: 3.0}, {3: 4.0, 4: 5.0, 5: 6.0, 6: 7.0})
    assert unpaired["test"] == "welch"


@pytest.mark.parametrize(
    "target, expected",
    [
        (3.5, 250.0),   # halfway between (200, 4.0) and (300, 3.0)
        (3.8, 220.0),
        (2.5, 400.0),   # reached exactly at the last evaluation
        (2.0, None),    # never reached
        (6.0, 100.0),   # already below at the first evaluation
    ],
)
def test_tokens_to_target_interpolates_linearly(target, expected):
    got = stats.tokens_to_target([100, 200, 300, 400], [5.0, 4.0, 3.0, 2.5], target)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_tokens_to_target_takes_first_crossing_of_a_noisy_curve():
    # 5 -> 3 crosses 3.5 at 100 + (1.5 / 2) * 100 = 175, before the later bump.
    assert stats.tokens_to_target([100, 200, 300, 400], [5.0, 3.0, 4.0, 2.0], 3.5) == pytest.approx(175.0)


def test_speedups_and_ratios():
    assert stats.ratio(3.0, 2.0) == 1.5
    assert stats.ratio(1.0, 0.0) is None and stats.ratio(None, 1.0) is None
    # 1.45x fewer tokens at 4% slower steps -> 1.394x faster in wall clock.
    assert stats.wall_clock_speedup(1.45, 1.04) == pytest.approx(1.45 / 1.04)
    assert stats.wall_clock_speedup(None, 1.0) is None
    assert stats.geometric_mean([2.0, 8.0]) == pytest.approx(4.0)


def test_grad_norm_summary_counts_spikes():
    norms = [1.0] * 20 + [5.0] + [1.0] * 5 + [float("nan")]
    out = stats.summarize_grad_norms(norms, spike_factor=3.0, window=20)
    assert out["spikes"] == 1 and out["nonfinite"] == 1 and out["max"] == 5.0 and out["median"] == 1.0


def test_band_interpolates_onto_a_common_grid():
    b = stats.band([([0, 10, 20], [3.0, 2.0, 1.0]), ([0, 20], [5.0, 1.0])])
    assert b["x"] == [0, 10, 20]
    assert b["mean"] == pytest.approx([4.0, 2.5, 1.0])
    assert b["min"] == pytest.approx([3.0, 2.0, 1.0]) and b["max"] == pytest.approx([5.0, 3.0, 1.0])


# ----------------------------------------------------------------------------- futility rule

def test_futility_rule_waits_for_min_budget_then_compares_at_same_tokens():
    rule = FutilityRule("swiglu", [100, 200, 300, 400], [5.0, 4.0, 3.0, 2.0], margin=0.1, min_tokens=150)
    assert rule({"tokens": 100, "val_loss": 9.0}) is None          # before the minimum share: never stops
    assert rule({"tokens": 200, "val_loss": 4.05}) is None         # behind by 0.05 <= 0.1
    reason = rule({"tokens": 250, "val_loss": 3.7})                # baseline at 250 = 3.5, gap 0.2
    assert reason is not None and "trails swiglu's 3.5000" in reason and "by 0.2000 > margin 0.1" in reason
    assert rule.checks[-1]["baseline_val_loss"] == pytest.approx(3.5)
    # Past the baseline's last evaluation its final value holds.
    late = FutilityRule("swiglu", [100, 200], [5.0, 4.0], margin=0.1, min_tokens=0)
    assert late({"tokens": 500, "val_loss": 4.05}) is None
    assert late({"tokens": 500, "val_loss": 4.2}) is not None
    # A candidate ahead of the baseline is never stopped.
    assert FutilityRule("swiglu", [100], [5.0], margin=0.0, min_tokens=0)({"tokens": 100, "val_loss": 4.9}) is None


# ----------------------------------------------------------------------------- verdict

def _cmp(**kw):
    base = {"activation": "polynorm", "n_seeds": 3, "val_loss_delta": -0.03, "ci95": [-0.05, -0.01], "p_value": 0.02,
            "tokens_to_target_speedup": 1 / 0.69, "step_time_ratio": 1.04, "memory_ratio": 1.01, "reached": "3/3",
            "stopped": False, "diverged": False, "failed": False, "stop_reasons": [], "errors": []}
    base.update(kw)
    base["wall_clock_speedup"] = stats.wall_clock_speedup(base["tokens_to_target_speedup"], base["step_time_ratio"])
    return base


def test_headline_reads_like_the_issue_example():
    text = headline(_cmp(), "swiglu")
    assert text == "PolyNorm reached SwiGLU's final validation loss with 31% fewer tokens at 4% higher step time: 1.39x faster to the same quality"


def test_verdict_decisions():
    th = Thresholds()
    adopt = decide(_cmp(), "swiglu", th)
    assert adopt["decision"] == "adopt" and adopt["reason"].endswith("3 seeds, p = 0.02: adopt for a larger pilot")
    one_seed = decide(_cmp(n_seeds=1, p_value=None, ci95=None), "swiglu", th)
    assert one_seed["decision"] == "pilot-further" and "no confidence interval" in one_seed["reason"]
    not_significant = decide(_cmp(p_value=0.3), "swiglu", th)
    assert not_significant["decision"] == "pilot-further" and "p = 0.3 > 0.05" in not_significant["reason"]
    slower = decide(_cmp(tokens_to_target_speedup=1.0, step_time_ratio=1.2), "swiglu", th)
    assert slower["decision"] == "reject" and "0.83x < reject threshold 0.97x" in slower["reason"]
    too_costly = decide(_cmp(step_time_ratio=1.3, tokens_to_target_speedup=2.0, memory_ratio=1.6), "swiglu", th)
    assert too_costly["decision"] == "pilot-further" and "peak memory 1.60x > max 1.50x" in too_costly["reason"]
    worse = decide(_cmp(tokens_to_target_speedup=None, val_loss_delta=0.05, p_value=None, n_seeds=1, reached="0/1"), "swiglu", th)
    assert worse["decision"] == "reject" and "did not reach SwiGLU's final validation loss" in worse["reason"]
    close = decide(_cmp(tokens_to_target_speedup=None, val_loss_delta=0.01, p_value=None, n_seeds=1, reached="0/1"), "swiglu", th)
    assert close["decision"] == "pilot-further"
    stopped = decide(_cmp(stopped=True, stop_reasons=["futility: validation loss 5.1 trails"], futility_margin=0.1), "swiglu", th)
    assert stopped["decision"] == "reject" and "stopped early" in stopped["reason"]
    diverged = decide(_cmp(diverged=True, errors=["seed 0: training ended with status 'diverged'"]), "swiglu", th)
    assert diverged["decision"] == "reject"
    # Thresholds are honoured: a stricter adopt bar turns the same evidence into pilot-further.
    strict = decide(_cmp(), "swiglu", Thresholds(adopt_min_speedup=1.5))
    assert strict["decision"] == "pilot-further" and "1.39x < adopt threshold 1.50x" in strict["reason"]


# ----------------------------------------------------------------------------- analyses (measure.py)

def test_effective_rank_by_hand():
    import torch

    from polycom.compare.measure import effective_rank

    # Singular values 3 and 1: p = (0.75, 0.25), H = -(0.75 ln 0.75 + 0.25 ln 0.25).
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(math.exp(h))
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0)                         # all equal: full rank
    assert effective_rank(torch.outer(torch.arange(1.0, 4.0), torch.ones(6))) == pytest.approx(1.0)  # rank one


def test_layer_cosine_similarity_by_hand():
    import torch

    from polycom.compare.measure import layer_cosine_similarity

    h0 = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])   # (batch 1, 2 tokens, dim 2)
    h1 = torch.tensor([[[1.0, 1.0], [0.0, -1.0]]])
    sim = layer_cosine_similarity([h0, h1])
    # token 1: cos = 1/sqrt(2); token 2: cos = -1; mean over tokens.
    assert sim[0, 1] == pytest.approx((1 / math.sqrt(2) - 1) / 2) and sim[1, 0] == sim[0, 1]
    assert sim[0, 0] == 1.0 and sim[1, 1] == 1.0
