"""The Patching page: heat maps of a real patching run (tiny-arith), hover text with the patched runs' top
tokens, one pair at a time, and a clear note on runs without patching records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from app.views.patching import heatmap  # noqa: E402
from studies.patching import run_patching_study  # noqa: E402

MAIN = Path(__file__).resolve().parents[2] / "app" / "main.py"


@pytest.fixture(scope="module")
def patching_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("patching-runs")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_patching_study(model="tiny-arith", out=root, n=3, steps=3)
    finally:
        torch.set_num_threads(before)
    return root


def start(monkeypatch, runs: Path) -> AppTest:
    monkeypatch.setenv("LOOPLENS_RUNS", str(runs))
    monkeypatch.setenv("LOOPLENS_MODEL", "tiny-arith")
    at = AppTest.from_file(str(MAIN), default_timeout=90)
    at.run()
    at.switch_page("views/patching.py").run()
    return at


def figures(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def test_heat_maps_with_top_tokens_on_hover(monkeypatch, patching_runs):
    at = start(monkeypatch, patching_runs)
    assert not at.exception and not at.error, [e.value for e in at.exception]
    (fig,) = figures(at)
    trace = fig["data"][0]
    assert trace["type"] == "heatmap" and len(trace["z"]) == 3  # T = 3 iterations
    hover = [h for row in trace["customdata"] for h in row if h]
    assert hover and all("top-1 tokens" in h and "flip share" in h for h in hover)
    # one pair: its own patched run's top tokens with probabilities
    pair = next(s for s in at.selectbox if s.label == "Pair")
    first_pair = int(str(pair.options[1]).split(":")[0].lstrip("#"))  # options[0] is the mean over pairs
    pair.set_value(first_pair).run()
    (fig,) = figures(at)
    hover = [h for row in fig["data"][0]["customdata"] for h in row if h]
    assert hover and all("top tokens:" in h and "outcome:" in h for h in hover)
    # the re-injection sweep and the other direction draw too
    next(s for s in at.selectbox if s.label == "Experiment").set_value("operand_reinject").run()
    assert not at.exception and len(figures(at)) == 1


def test_a_run_without_patching_records_says_how_to_make_one(monkeypatch, runs_dir):
    at = start(monkeypatch, runs_dir)
    assert not at.exception and not at.error
    assert any("looplens study patching" in str(i.value) for i in at.info)


def test_heatmap_leaves_unpatched_positions_empty():
    import pandas as pd

    cells = pd.DataFrame(
        {"pair_id": 0, "iteration": [1, 2], "position": [3, 3], "effect": [0.1, 0.9], "logit_diff": [1.0, 2.0],
         "outcome": ["base", "source"], "top_tokens": ["' 7' 0.900", "' 3' 0.800"], "exit_step": None}
    )  # fmt: skip
    fig = heatmap(cells, [f"{i} t" for i in range(4)], 2, "x", single=True)
    z = fig.data[0].z
    assert z[0][3] == pytest.approx(0.1) and z[1][3] == pytest.approx(0.9)
    assert all(v != v for v in (z[0][0], z[1][2]))  # NaN: grey, never patched
    assert "' 3' 0.800" in fig.data[0].customdata[1][3]
