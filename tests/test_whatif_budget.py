"""`meshplan whatif --tokens --gpu-hour-price`: the days to train and the cost of each
scenario, in the JSON, the charts and the table, against a hand computation from the
planner's own best plan."""
import json
import re
import subprocess
import sys

import pytest

from meshplan.cli import main
from meshplan.hw_profiles.profile import load_profile
from meshplan.planner.search import search
from meshplan.simulator.model_spec import ZOO
from meshplan.simulator.plan import Cluster

TOKENS, PRICE = 2e11, 2.5
FIXED = {"global_batch": 32, "seq_len": 2048}
STEPS = 3051758  # ceil(2e11 / (32 x 2048)) = ceil(3051757.8125)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("whatif") / "report.html"
    run = subprocess.run([sys.executable, "-m", "meshplan.cli", "whatif", "--model", "llama-2-7b",
                          "--hardware", "a100-80gb,h100-80gb", "--gpus", "8,16", "--global-batch", "32",
                          "--seq-len", "2048", "--scale-inter-node-bw", "2", "--tokens", "2e11",
                          "--gpu-hour-price", "2.5", "--out", str(out), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout), out.read_text()


@pytest.fixture(scope="module")
def a100_8():
    """The planner's best plan for a100-80gb at 8 GPUs, and training 2e11 tokens with it, by hand."""
    step_s = search(ZOO["llama-2-7b"], Cluster(8, 8), load_profile("a100-80gb"), FIXED).ranked[0].step_time_s
    days = STEPS * step_s / 86400
    return {"step_time_s": step_s, "days": days, "cost": days * 24 * 8 * PRICE}


def _figure(page: str, heading: str) -> list[dict]:
    """The traces of the plotly chart that follows `heading`."""
    at = page.index(f"<h2>{heading}</h2>")
    call = re.compile(r'Plotly\.newPlot\(\s*"chart-\d+",\s*').search(page, at)
    return json.JSONDecoder().raw_decode(page, call.end())[0]


def test_json_days_and_cost_are_the_hand_computation(report, a100_8):
    data, _ = report
    row = next(s for s in data["scenarios"] if s["label"] == "a100-80gb, 8 GPUs")
    assert row["step_time_s"] == pytest.approx(a100_8["step_time_s"], rel=1e-12)
    assert row["steps"] == STEPS
    assert row["days"] == pytest.approx(a100_8["days"], rel=1e-12)
    assert row["cost"] == pytest.approx(a100_8["cost"], rel=1e-12)
    for s in data["scenarios"]:  # every scenario: cost = days x 24 h x GPUs x price
        assert s["cost"] == pytest.approx(s["days"] * 24 * s["gpus"] * PRICE, rel=1e-12)
        assert s["days"] == pytest.approx(STEPS * s["step_time_s"] / 86400, rel=1e-12)


def test_days_and_cost_charts_carry_every_series(report, a100_8):
    data, page = report
    traces = _figure(page, "Time and cost to train")
    days = {t["name"]: t for t in traces if t["xaxis"] == "x"}
    costs = {t["name"]: t for t in traces if t["xaxis"] == "x2"}
    assert set(days) == set(costs) == {"a100-80gb", "h100-80gb", "a100-80gb, inter_node_bw x2",
                                       "h100-80gb, inter_node_bw x2"}
    assert days["a100-80gb"]["x"] == [8, 16]
    assert days["a100-80gb"]["y"][0] == pytest.approx(a100_8["days"], rel=1e-12)
    assert costs["a100-80gb"]["y"][0] == pytest.approx(a100_8["cost"], rel=1e-12)
    scaled = next(s for s in data["scenarios"] if s["label"] == "h100-80gb, 16 GPUs, inter_node_bw x2")
    assert days["h100-80gb, inter_node_bw x2"]["x"] == [16]     # planned at the largest count only
    assert costs["h100-80gb, inter_node_bw x2"]["y"] == [pytest.approx(scaled["cost"], rel=1e-12)]
    assert "days to train 2e+11 tokens" in page and "cost at 2.5 per GPU-hour" in page


def test_table_has_days_and_cost_columns(report, a100_8):
    _, page = report
    (table,) = _figure(page, "Top plans")
    header, cells = table["header"]["values"], table["cells"]["values"]
    assert header[-2:] == ["days", "cost"]
    first = cells[0].index("a100-80gb, 8 GPUs")                  # its rank-1 row
    assert cells[1][first] == "1"
    assert cells[-2][first] == f"{a100_8['days']:,.2f}"
    assert cells[-1][first] == f"{a100_8['cost']:,.0f}"


def test_tokens_without_price_charts_days_only(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["whatif", "--model", "llama-2-7b", "--gpus", "8,16", "--global-batch", "32",
                 "--seq-len", "2048", "--tokens", "2e11", "--out", str(out)]) == 0
    page = out.read_text()
    assert {t["xaxis"] for t in _figure(page, "Time and cost to train")} == {"x"}
    assert _figure(page, "Top plans")[0]["header"]["values"][-1] == "days"
    assert "per GPU-hour" not in page


@pytest.mark.parametrize("extra, flag", [(["--gpu-hour-price", "2"], "--gpu-hour-price"),
                                         (["--tokens", "-1"], "--tokens"),
                                         (["--tokens", "2e11", "--gpu-hour-price", "nan"], "--gpu-hour-price")])
def test_bad_budget_is_one_line_and_writes_nothing(tmp_path, capsys, extra, flag):
    out = tmp_path / "r.html"
    code = main(["whatif", "--model", "llama-2-7b", "--gpus", "8", "--global-batch", "32",
                 "--seq-len", "2048", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and err.startswith(f"meshplan whatif: error: {flag}:")
