import csv

from polycom.bench import bench_training


def test_bench_training_writes_csv_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["--config", "tiny", "--activations", "swiglu,polynorm", "--steps", "2", "--warmup", "1", "--threads", "1", "--out", str(out),
            "--set", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "data.vocab_size=300", "train.batch_size=2", "train.seq_len=16"]
    assert bench_training.main(args) == 0
    rows = list(csv.DictReader((out / "training.csv").open()))
    assert [r["activation"] for r in rows] == ["swiglu", "polynorm"]
    assert rows[0]["ratio_vs_baseline"] == "1.0" and float(rows[1]["step_time_s"]) > 0
    assert rows[0]["parameters"] == rows[1]["parameters"] or abs(int(rows[0]["ffn_parameters"]) - int(rows[1]["ffn_parameters"])) < 10
    assert "| polynorm | plain |" in (out / "training.md").read_text()
    assert bench_training.main(args) == 0  # appends, one header
    assert len(list(csv.DictReader((out / "training.csv").open()))) == 4
    assert bench_training.main(["--activations", "swiglu,nope", "--out", str(out)]) == 2
    assert "model.activation" in capsys.readouterr().err
