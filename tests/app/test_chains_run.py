"""The explorer, unchanged, on a chains study run of tiny-chains (targets value_0 … value_k, a linear_probes
table; the live probe on the same model)."""

from __future__ import annotations

import pytest

pytest.importorskip("streamlit")

from studies.chains import run_chains_study  # noqa: E402
from tests.app.test_pages import assert_clean, charts, goto, start, texts  # noqa: E402

CHAINS_MODEL = "tiny-chains"


@pytest.fixture(scope="module")
def chains_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chains-runs")
    run_chains_study(
        model=CHAINS_MODEL,
        n=5,
        probe_n=40,
        depth_n=3,
        steps=2,
        depths=(1, 2),
        hops=(2,),
        batch_size=5,
        tuned_lens=False,
        out=root,
        name="chains-small",
    )
    return root


def test_every_page_reads_a_chains_run(monkeypatch, chains_runs):
    at = start(monkeypatch, chains_runs, CHAINS_MODEL)
    assert_clean(at)
    assert at.sidebar.selectbox(key="run").value == "chains-small"
    assert charts(at) >= 2  # median trajectories, accuracy vs depth
    at.session_state["overview_figures"] = True  # the study's PNGs are read when their expander opens
    at.run()
    assert at.image
    assert "chains" in texts(at)
    for page in ("trajectories", "lens_grid", "dynamics", "compare"):
        goto(at, page)
        assert_clean(at)
    goto(at, "trajectories")
    at.multiselect(key="traj_targets").set_value(["value_0", "value_2"]).run()
    assert_clean(at)
    assert charts(at) >= 2
