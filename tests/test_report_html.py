"""The compare report opened in a real headless browser (Chromium) from disk: the verdict is
there and every plot is embedded and decodes. Skips where Chromium is absent."""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
import subprocess

import pytest

from polycom.compare import run_compare
from polycom.compare.config import load_compare_config
from polycom.compare.plots import PLOTS

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)

# Appended to a copy of the report: after load, write each image's decoded size into the DOM.
PROBE = """<script>
window.addEventListener('load', function () {
  var lines = [];
  document.querySelectorAll('img').forEach(function (img) {
    lines.push(img.getAttribute('data-plot') + ' ' + img.naturalWidth + ' ' + img.naturalHeight + ' ' + img.complete);
  });
  var pre = document.createElement('pre');
  pre.id = 'image-probe';
  pre.textContent = lines.join('\\n');
  document.body.appendChild(pre);
});
</script>"""


def png_size(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("html") / "pilot"
    sets = [
        "activations=swiglu,polynorm", "seeds=1",
        "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=64",
        "data.vocab_size=512", "data.max_train_chars=200000", "data.max_val_chars=40000", f"data.cache_dir={cache}",
        "train.batch_size=8", "train.seq_len=32", "train.max_steps=8", "train.warmup_steps=2", "train.eval_every=4",
        "train.eval_batches=2", "train.log_every=2", "train.checkpoint_every=4", "train.num_threads=1", "train.tensorboard=false",
        "measure.latency_repeats=1", "measure.prompt_tokens=16", "measure.decode_tokens=4", "measure.batch_size=4",
        "measure.similarity_batches=1",
    ]
    run_compare(load_compare_config("configs/pilot.toml", sets), out, progress=False)
    return out


def test_report_html_is_self_contained(report_dir):
    text = (report_dir / "report.html").read_text(encoding="utf-8")
    # Offline: no external scripts, styles, images or fonts.
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", text)
    assert refs and all(r.startswith("data:image/png;base64,") or r.startswith("#") for r in refs), refs[:3]
    assert "<script" not in text.lower()


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium); .ci/run installs it")
def test_report_opens_in_headless_chromium_with_verdict_and_every_plot(report_dir, tmp_path):
    summary = json.loads((report_dir / "summary.json").read_text())
    page = tmp_path / "report-probe.html"
    page.write_text((report_dir / "report.html").read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout

    # The verdict, in plain words, as the first section.
    verdict_at = dom.find('id="verdict"')
    assert verdict_at != -1 and verdict_at < dom.find('id="tables"') < dom.find('id="plots"') < dom.find('id="provenance"')
    for v in summary["verdict"]:
        assert html.escape(v["reason"], quote=False) in dom, v["reason"]
        assert f'verdict {v["decision"]}' in dom

    # Every plot is in the page and the browser decoded it at the PNG's own size.
    probe = re.search(r'<pre id="image-probe">(.*?)</pre>', dom, re.S)
    assert probe, "the probe script did not run"
    decoded = {}
    for line in probe.group(1).strip().splitlines():
        name, width, height, complete = line.split()
        decoded[name] = (int(width), int(height), complete)
    expected = sorted(PLOTS)  # swiglu vs polynorm draws every plot, coefficients included
    assert sorted(decoded) == expected
    for name in expected:
        width, height = png_size((report_dir / "plots" / f"{name}.png").read_bytes())
        assert decoded[name] == (width, height, "true"), name
