"""The activation benchmark command runs end to end and writes its files (no timing asserts)."""

import csv
import subprocess
import sys

from polycom import cli
from polycom.bench import bench_activations
from polycom.bench import cli as bench_cli

CASES = "polynorm_naive,polynorm_fused,polynorm_fused_compiled,rms_norm_compiled,polyrelu_fused,swiglu"


def _read(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_quick_run_writes_csv_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench" / "activations.csv"
    argv = ["bench", "activations", "--quick", "--rows", "64", "--widths", "96", "--repeats", "2", "--cases", CASES, "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "targets:" in printed and "fwd+bwd speedup" in printed and "compiled rms_norm" in printed
    header = out.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header == bench_activations.CSV_FIELDS
    rows = _read(out)
    assert [r["case"] for r in rows] == CASES.split(",")
    for row in rows:
        assert row["rows"] == "64" and row["width"] == "96" and row["dtype"] == "float32" and row["rounds"] == "2"
        assert float(row["fwd_bwd_p20_ms"]) <= float(row["fwd_bwd_median_ms"]) <= float(row["fwd_bwd_p80_ms"])
        assert row["torch"] and row["polycom"] and row["cpu"] and row["machine"]
    fused = next(r for r in rows if r["case"] == "polynorm_fused")
    naive = next(r for r in rows if r["case"] == "polynorm_naive")
    assert float(fused["saved_ratio"]) <= 1.1 and float(naive["saved_ratio"]) > 4
    markdown = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "## Targets" in markdown and "| polynorm_fused_compiled |" in markdown
    # a second run appends under the same header
    argv[argv.index(CASES)] = "polynorm_naive,gelu"
    assert cli.main(argv) == 0
    assert len(_read(out)) == len(rows) + 2
    assert out.read_text(encoding="utf-8").count("timestamp,") == 1
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")], "atomic writes leave no temp files"


def test_module_entry_point(tmp_path):
    out = tmp_path / "activations.csv"
    result = subprocess.run(
        [sys.executable, "-m", "polycom.bench", "activations", "--quick", "--rows", "32", "--widths", "64",
         "--repeats", "1", "--cases", "polynorm_naive,polynorm_fused", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(_read(out)) == 2 and out.with_suffix(".md").is_file()


def test_user_errors_are_one_line(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "a.csv")
    assert cli.main(["bench", "activations", "--quick", "--dtypes", "float8", "--out", out]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown dtype 'float8'")
    assert cli.main(["bench", "activations", "--quick", "--cases", "nope", "--out", out]) == 2
    assert "known: polynorm_naive" in capsys.readouterr().err
    monkeypatch.setitem(bench_cli.SUBCOMMANDS, "training", ("polycom.bench.no_such_benchmark", "missing"))
    assert cli.main(["bench", "training", "--steps", "1"]) == 2
    assert "not available" in capsys.readouterr().err
