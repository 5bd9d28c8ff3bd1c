"""`meshplan whatif`: the report is one self-contained HTML file whose every chart renders
with data in a real browser (headless Chromium) without console errors."""
import re
import shutil
import subprocess

import pytest

from tests.cli import meshplan

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHARTS = 5  # throughput/MFU, memory per stage, timeline, top-plans table, scaled resources


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("whatif") / "report.html"
    run = meshplan("whatif", "--model", "llama-2-7b", "--hardware", "a100-80gb,h100-80gb",
                   "--gpus", "8,16", "--global-batch", "32", "--seq-len", "2048",
                   "--scale-inter-node-bw", "0.5,1,2", "--out", str(out))
    assert run.returncode == 0, run.stderr
    return out


def test_report_is_self_contained(report):
    text = report.read_text()
    assert len(re.findall(r'<div id="chart-\d+"', text)) == CHARTS
    assert not re.search(r"<script[^>]+src=", text)  # plotly.js inlined, nothing fetched
    assert "llama-2-7b" in text


def test_without_tokens_no_training_chart_and_the_page_says_how(report):
    text = report.read_text()
    assert "<h2>Time and cost to train</h2>" not in text
    assert '"MFU","peak GiB"]}' in text        # the table's header ends before days and cost
    assert "--tokens" in text and "--gpu-hour-price" in text


def _chart_sections(dom: str) -> dict:
    starts = [(m.group(1), m.start()) for m in re.finditer(r'<div id="(chart-\d+)"', dom)]
    return {name: dom[start:(starts[i + 1][1] if i + 1 < len(starts) else len(dom))]
            for i, (name, start) in enumerate(starts)}


def test_every_chart_renders_with_data_in_chromium(report):
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium binary (install it: apt-get install -y chromium)")
    run = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox",
                          "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0",
                          "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    # Page console output (errors included) comes as INFO:CONSOLE lines; browser noise does not.
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    sections = _chart_sections(run.stdout)
    assert len(sections) == CHARTS
    for name, html in sections.items():
        assert 'class="main-svg"' in html, f"{name} did not render"
        drawn = (len(re.findall(r'class="point"', html)) + len(re.findall(r'class="js-line"', html))
                 + len(re.findall(r'class="cell-text"', html)))
        assert drawn > 0, f"{name} rendered no data"


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "r.html"
    run = meshplan("whatif", "--model", "llama-2-7b", "--gpus", "8,abc", "--global-batch", "32",
                   "--seq-len", "2048", "--out", str(out))
    assert run.returncode == 2 and not out.exists()
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "--gpus" in lines[0]
