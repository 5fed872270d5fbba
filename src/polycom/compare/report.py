"""The compare report: ``summary.json``, ``report.md``, a self-contained ``report.html``
(every plot embedded as a base64 PNG, inline CSS, no scripts or network: it opens offline)
and the plots as PNG files under ``plots/``. Everything is rendered from the sweep
database, so ``polycom report DIR`` reproduces it.

The report opens with the verdict in plain words and numbers, the thresholds used and
the limits of the evidence; then the tables and plots; then the exact configs,
versions and commit.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..utils.io import atomic_write_json, atomic_write_text
from .db import DB_NAME, SweepDB, sanitize
from .plots import PLOTS, draw_all
from .summary import build_summary
from .verdict import display_name

# The keys every summary.json has (the contract; tests check them).
SUMMARY_RUN_KEYS = ("activation", "seed", "final_val_loss", "tokens_per_s", "step_time_s", "peak_rss_mb", "params",
                    "prefill_ms", "decode_ms_per_token", "effective_rank", "status")
SUMMARY_COMPARISON_KEYS = ("activation", "val_loss_delta", "ci95", "p_value", "tokens_to_target_speedup",
                           "step_time_ratio", "wall_clock_speedup")
DECISIONS = ("adopt", "pilot-further", "reject")


# --------------------------------------------------------------------------- formatting

def _num(x: Any, fmt: str = "{:.4f}", none: str = "n/a") -> str:
    if x is None:
        return none
    try:
        return fmt.format(x)
    except (TypeError, ValueError):
        return str(x)


def _ci(m: Dict[str, Any], fmt: str = "{:.4f}", scale: float = 1.0) -> str:
    if not m or m.get("mean") is None:
        return "n/a"
    mean = fmt.format(m["mean"] * scale)
    if m.get("ci95"):
        lo, hi = m["ci95"]
        return f"{mean} [{fmt.format(lo * scale)}, {fmt.format(hi * scale)}]"
    return mean


def _ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _tokens(t: Optional[float]) -> str:
    if t is None:
        return "not reached"
    return f"{t / 1e6:.3f}M"


def _p(p: Optional[float]) -> str:
    if p is None:
        return "n/a"
    return f"{p:.3g}" if p >= 0.001 else "<0.001"


def _delta_ci(c: Dict[str, Any]) -> str:
    if c.get("val_loss_delta") is None:
        return "n/a"
    s = f"{c['val_loss_delta']:+.4f}"
    if c.get("ci95"):
        s += f" [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
    return s


def _speed_ci(c: Dict[str, Any]) -> str:
    s = c.get("tokens_to_target_speedup")
    if s is None:
        return f"not reached ({c.get('reached')})"
    out = f"{s:.2f}x"
    if c.get("tokens_to_target_speedup_ci95"):
        lo, hi = c["tokens_to_target_speedup_ci95"]
        out += f" [{lo:.2f}, {hi:.2f}]"
    return out


# --------------------------------------------------------------------------- content (shared by md and html)

def verdict_lines(summary: Dict[str, Any]) -> List[Dict[str, str]]:
    return [{"activation": display_name(v["activation"]), "decision": v["decision"], "reason": v["reason"]} for v in summary["verdict"]]


def threshold_lines(summary: Dict[str, Any]) -> List[str]:
    th = summary.get("thresholds") or {}
    fut = summary.get("futility") or {}
    lines = [
        f"adopt (for a larger pilot): wall-clock speedup to the baseline's final validation loss >= {th.get('adopt_min_speedup')}x, "
        f"lower final validation loss with p <= {th.get('max_p_value')}, >= {th.get('min_seeds_to_adopt')} seeds, "
        f"step time <= {th.get('max_step_time_ratio')}x and peak memory <= {th.get('max_memory_ratio')}x the baseline's",
        f"reject: wall-clock speedup < {th.get('reject_max_speedup')}x, or the baseline's final loss not reached and the candidate "
        f"worse by > {th.get('reject_loss_margin')} nats (or significantly worse), or stopped by the futility rule, or diverged",
        "pilot-further: everything in between (promising or inconclusive)",
    ]
    if fut.get("margin") is not None:
        lines.append(f"futility rule: stop a candidate whose validation loss trails the baseline's at the same tokens by > "
                     f"{fut['margin']} nats, checked after {fut.get('min_budget_share', 0) * 100:.0f}% of the token budget")
    else:
        lines.append("futility rule: off (turn on with --stop-if-behind MARGIN)")
    return lines


def comparison_rows(summary: Dict[str, Any]) -> List[List[str]]:
    decisions = {v["activation"]: v["decision"] for v in summary["verdict"]}
    rows = []
    for c in summary["comparisons"]:
        rows.append([display_name(c["activation"]), _delta_ci(c), _p(c.get("p_value")) + (f" ({c['test']})" if c.get("test") else ""),
                     _speed_ci(c), _ratio(c.get("step_time_ratio")), _ratio(c.get("wall_clock_speedup")),
                     _ratio(c.get("memory_ratio")), _ratio(c.get("saved_bytes_ratio")), _ratio(c.get("prefill_ratio")),
                     _ratio(c.get("decode_ratio")), decisions.get(c["activation"], "")])
    return rows


COMPARISON_HEADER = ["candidate", "val loss delta [95% CI]", "p (test)", "tokens-to-target speedup", "step time",
                     "wall-clock speedup", "peak RSS", "saved for backward", "prefill", "decode/token", "decision"]


def activation_rows(summary: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for a in summary["activations"]:
        m = summary["per_activation"][a]
        runs = [r for r in summary["runs"] if r["activation"] == a]
        params = runs[0]["params"] if runs and runs[0].get("params") else None
        flops = runs[0]["flops_per_token"] if runs and runs[0].get("flops_per_token") else None
        ratio = next((r["saved_bytes_ratio"] for r in runs if r.get("saved_bytes_ratio")), None)
        rows.append([display_name(a), str(m["n_finished"]), _ci(m["final_val_loss"]), _ci(m["final_val_ppl"], "{:.2f}"),
                     _ci(m["tokens_per_s"], "{:.0f}"), _ci(m["step_time_s"], "{:.1f}", 1e3), _ci(m["peak_rss_mb"], "{:.0f}"),
                     _num(params, "{:,}"), _num(flops, "{:.3g}"), _ci(m["prefill_ms"], "{:.1f}"), _ci(m["decode_ms_per_token"], "{:.2f}"),
                     _ci(m["saved_bytes_per_ffn_activation"], "{:.2f}", 1 / 2**20) + (f" ({ratio:.1f}x input)" if ratio else ""),
                     _ci(m["mean_effective_rank"], "{:.1f}"), _ci(m["mean_adjacent_similarity"], "{:.3f}")])
    return rows


ACTIVATION_HEADER = ["activation", "runs", "final val loss", "val PPL", "tokens/s", "step ms", "peak RSS MiB", "params",
                     "FLOPs/token", "prefill ms", "decode ms/token", "saved MiB per FFN act.", "mean eff. rank", "mean adj. similarity"]


def run_rows(summary: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for r in summary["runs"]:
        g = r.get("grad_norm") or {}
        note = r.get("stop_reason") or r.get("error") or ""
        rows.append([display_name(r["activation"]), str(r["seed"]), r["status"], _num(r.get("final_val_loss")),
                     _tokens(r.get("tokens_seen")) if r.get("tokens_seen") else "n/a", _tokens(r.get("tokens_to_target")),
                     _num(r.get("step_time_s"), "{:.3f}"), _num(r.get("tokens_per_s"), "{:.0f}"), _num(r.get("peak_rss_mb"), "{:.0f}"),
                     _num(r.get("params"), "{:,}"), _num(r.get("prefill_ms"), "{:.1f}"), _num(r.get("decode_ms_per_token"), "{:.2f}"),
                     f"{_num(g.get('median'), '{:.3f}')} / {_num(g.get('p95'), '{:.3f}')} / {_num(g.get('max'), '{:.3f}')} ({g.get('spikes', 0)})",
                     f"{r.get('loss_spikes', 0)} / {r.get('nonfinite_events', 0)} / {r.get('rollbacks', 0)}", note])
    return rows


RUN_HEADER = ["activation", "seed", "status", "final val loss", "tokens", "tokens to target", "step s", "tokens/s",
              "peak RSS MiB", "params", "prefill ms", "decode ms/token", "grad norm median / p95 / max (spikes > 3x median)",
              "spikes / non-finite / rollbacks", "note"]


def provenance(summary: Dict[str, Any]) -> Dict[str, Any]:
    meta = summary.get("meta") or {}
    return {
        "polycom": meta.get("polycom_version"), "torch": meta.get("torch_version"), "python": meta.get("python_version"),
        "git commit": meta.get("git_commit"), "platform": meta.get("platform"), "CPU threads": meta.get("cpu_threads"),
        "sweep created": summary.get("created_at"),
    }


RUN_PROVENANCE_HEADER = ["activation", "seed", "run folder", "git commit", "torch", "started", "finished", "attempts"]


def run_provenance_rows(summary: Dict[str, Any]) -> List[List[str]]:
    return [[display_name(r["activation"]), str(r["seed"]), str(r.get("out_dir") or ""), str(r.get("git_commit") or "n/a"),
             str(r.get("torch_version") or "n/a"), str(r.get("started_at") or ""), str(r.get("finished_at") or ""),
             str(r.get("attempts") or 0)] for r in summary["runs"]]


# --------------------------------------------------------------------------- markdown

def _md_table(header: List[str], rows: List[List[str]]) -> str:
    def esc(s):
        return str(s).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def render_markdown(summary: Dict[str, Any], plots: Dict[str, Path]) -> str:
    base = display_name(summary["baseline"])
    lines = [f"# PolyCom pilot: {', '.join(display_name(a) for a in summary['activations'][1:])} against {base}", ""]
    lines += ["## Verdict", ""]
    for v in verdict_lines(summary):
        lines.append(f"- **{v['activation']}: {v['decision']}.** {v['reason']}.")
    if summary.get("incomplete_runs"):
        lines += ["", f"**Incomplete runs** (re-run the same command to finish them): {', '.join(summary['incomplete_runs'])}."]
    lines += ["", "### Thresholds", ""] + [f"- {t}" for t in threshold_lines(summary)]
    lines += ["", "### Limits of the evidence", ""] + [f"- {t}" for t in summary["limits"]]
    lines += ["", "## Candidates against the baseline", "",
              f"Ratios are candidate / {base}; delta is candidate minus {base} (negative = better). "
              "Wall-clock speedup = tokens-to-target speedup / step-time ratio. Step-time ratio from "
              + (summary["comparisons"][0].get("step_time_source", "run medians") if summary["comparisons"] else "run medians")
              + " (an interleaved session times every model's training step in the same window).", "",
              _md_table(COMPARISON_HEADER, comparison_rows(summary)), ""]
    lines += ["## Per activation (mean [95% CI] over seeds)", "", _md_table(ACTIVATION_HEADER, activation_rows(summary)), ""]
    lines += ["## Per run", "", _md_table(RUN_HEADER, run_rows(summary)), ""]
    lines += ["## Plots", ""]
    for name, path in plots.items():
        lines += [f"### {PLOTS[name][0]}", "", f"![{PLOTS[name][0]}](plots/{path.name})", ""]
    lines += ["## Configuration and provenance", "", "Versions:", ""]
    lines += [f"- {k}: {v}" for k, v in provenance(summary).items()]
    lines += ["", "Runs:", "", _md_table(RUN_PROVENANCE_HEADER, run_provenance_rows(summary))]
    lines += ["", "Compare config (the run config every run starts from; each run sets `model.activation` and `train.seed`):", "",
              "```json", json.dumps(summary["config"], indent=2), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- html

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}th{background:#f4f4f4}
.verdict{border-left:6px solid #888;padding:.5em 1em;margin:.6em 0;background:#fafafa}
.verdict.adopt{border-color:#2a9d3f}.verdict.pilot-further{border-color:#e0a800}.verdict.reject{border-color:#c62828}
.decision{font-weight:bold;text-transform:uppercase;letter-spacing:.03em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{font-size:.9em;color:#555}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.8em}.muted{color:#666}
"""


def _html_table(header: List[str], rows: List[List[str]], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render_html(summary: Dict[str, Any], plots: Dict[str, Path]) -> str:
    e = html.escape
    base = display_name(summary["baseline"])
    title = f"PolyCom pilot: {', '.join(display_name(a) for a in summary['activations'][1:])} against {base}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>", '<section id="verdict"><h2>Verdict</h2>']
    for v in verdict_lines(summary):
        parts.append(f'<div class="verdict {e(v["decision"])}" data-activation="{e(v["activation"])}">'
                     f'<span class="decision">{e(v["activation"])}: {e(v["decision"])}</span><p>{e(v["reason"])}.</p></div>')
    if summary.get("incomplete_runs"):
        parts.append(f"<p><strong>Incomplete runs</strong> (re-run the same command to finish them): {e(', '.join(summary['incomplete_runs']))}.</p>")
    parts.append('<h3>Thresholds</h3><ul id="thresholds">' + "".join(f"<li>{e(t)}</li>" for t in threshold_lines(summary)) + "</ul>")
    parts.append('<h3>Limits of the evidence</h3><ul id="limits">' + "".join(f"<li>{e(t)}</li>" for t in summary["limits"]) + "</ul></section>")
    parts.append(f'<section id="tables"><h2>Candidates against the baseline</h2><p class="muted">Ratios are candidate / {e(base)}; '
                 f'delta is candidate minus {e(base)} (negative = better). Wall-clock speedup = tokens-to-target speedup / step-time ratio.</p>')
    parts.append(_html_table(COMPARISON_HEADER, comparison_rows(summary), "comparisons"))
    parts.append("<h2>Per activation (mean [95% CI] over seeds)</h2>" + _html_table(ACTIVATION_HEADER, activation_rows(summary), "activations"))
    parts.append("<h2>Per run</h2>" + _html_table(RUN_HEADER, run_rows(summary), "runs") + "</section>")
    parts.append('<section id="plots"><h2>Plots</h2>')
    for name, path in plots.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        caption = PLOTS[name][0]
        parts.append(f'<figure id="plot-{e(name)}"><img class="plot" data-plot="{e(name)}" alt="{e(caption)}" '
                     f'src="data:image/png;base64,{data}"><figcaption>{e(caption)}</figcaption></figure>')
    parts.append("</section>")
    parts.append('<section id="provenance"><h2>Configuration and provenance</h2><table><tbody>'
                 + "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in provenance(summary).items())
                 + "</tbody></table>" + _html_table(RUN_PROVENANCE_HEADER, run_provenance_rows(summary), "run-provenance")
                 + "<p>Compare config (the run config every run starts from; each run sets "
                 "<code>model.activation</code> and <code>train.seed</code>):</p>"
                 f"<pre>{e(json.dumps(summary['config'], indent=2))}</pre></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- entry point

def render_report(out_dir: Path) -> Dict[str, Path]:
    """Render summary.json, plots, report.md and report.html from ``out_dir/sweep.sqlite``."""
    out_dir = Path(out_dir)
    db = SweepDB(out_dir / DB_NAME, create=False)
    try:
        summary = sanitize(build_summary(db))
        plots = draw_all(db, summary, out_dir)
    finally:
        db.close()
    summary["plots"] = {name: f"plots/{p.name}" for name, p in plots.items()}
    paths = {
        "summary": atomic_write_json(out_dir / "summary.json", summary),
        "markdown": atomic_write_text(out_dir / "report.md", render_markdown(summary, plots)),
        "html": atomic_write_text(out_dir / "report.html", render_html(summary, plots)),
    }
    paths.update({f"plot:{k}": v for k, v in plots.items()})
    return paths
