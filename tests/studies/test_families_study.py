"""The arithmetic study, `looplens info` and the Tuned Lens command on an Ouro and a retrofit checkpoint:
every family runs end to end and draws what applies (no Coda Lens without a coda; an exit-gate figure
for Ouro), and every reader takes the layout from the run's manifest."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

import lens
from looplens.cli import app
from studies.arithmetic import run_arithmetic_study
from studies.figures import Layout
from tests.conftest import save_arith_model

SETTINGS = dict(n=8, steps=3, batch_size=4, depths=(1, 3), depth_n=4, seed=0)


@pytest.fixture(scope="module", params=["ouro", "retrofit"])
def family_run(request, tmp_path_factory):
    model_dir = save_arith_model(
        tmp_path_factory.mktemp("model") / f"tiny-{request.param}", family=request.param
    )
    run = run_arithmetic_study(model=str(model_dir), out=tmp_path_factory.mktemp("runs"), **SETTINGS)
    return request.param, model_dir, run


def test_study_runs_and_draws_what_applies(family_run):
    family, model_dir, run = family_run
    model = lens.load_model(model_dir)
    layout = Layout.from_manifest(run.manifest)
    assert layout.layout == model.layout and layout.steps == 3
    assert run.manifest["model"]["family"] == family and run.status == "complete"
    ranks = run.table("ranks")
    expected = {"ouro": {"logit", "tuned"}, "retrofit": {"logit", "coda", "tuned"}}[family]
    assert set(ranks["lens"]) == expected and set(run.manifest["settings"]["lenses"]) == expected
    blocks = ranks.query("unrolled_index >= 0 and lens == 'logit'")
    assert sorted(blocks["unrolled_index"].unique()) == list(range(layout.n_unrolled))
    predicted = ranks.query("target_kind == 'predicted'")
    assert (predicted.query("lens == 'logit' and site == 'final'")["rank"] == 1).all()
    figures = run.figures_dir
    for name in ("rank_trajectory", "numeric_prefix", "depth_scaling", "latent_dynamics"):
        assert (figures / f"{name}.png").stat().st_size > 10_000, name
    traj = pd.read_parquet(figures / "rank_trajectory.parquet")
    assert set(traj["lens"]) == expected
    gate = run.table("exit_gate")
    if family == "ouro":
        assert len(gate) == SETTINGS["n"] * SETTINGS["steps"]
        assert (gate.groupby("prompt_id")["exit_prob"].sum() - 1).abs().max() < 1e-5
        assert (figures / "exit_gate.png").stat().st_size > 10_000
        tab = pd.read_parquet(figures / "exit_gate.parquet")
        assert tab["iteration"].tolist() == [1, 2, 3] and abs(tab["threshold_exit_share"].sum() - 1) < 1e-9
        assert set(run.table("dynamics")["site"]) == {"latent"}  # the state Ouro feeds back
    else:
        assert gate.empty and not (figures / "exit_gate.png").exists()
        coda_last = traj.query("lens == 'coda'").sort_values("unrolled_index").iloc[-1]
        assert coda_last["median"] == 1  # the Coda Lens at the last core block is the model itself


def test_info_and_tuned_lens_commands(family_run, tmp_path):
    family, model_dir, _ = family_run
    runner = CliRunner()
    info = runner.invoke(app, ["info", str(model_dir)])
    assert info.exit_code == 0, info.output
    assert f"({family} family)" in info.output
    if family == "ouro":
        assert "lenses that apply: logit, tuned (no coda: the Coda Lens does not apply)" in info.output
        assert "exit gate" in info.output
    else:
        assert "lenses that apply: logit, coda, tuned" in info.output
    tuned = runner.invoke(
        app,
        [
            "tuned-lens",
            "--model",
            str(model_dir),
            "--steps",
            "2",
            "--n",
            "8",
            "--epochs",
            "1",
            "--save",
            str(tmp_path),
        ],
    )
    assert tuned.exit_code == 0, tuned.output
    assert "lenses that apply" in tuned.output and "held-out KL" in tuned.output
    assert (tmp_path / "shared" / "tuned_lens.json").is_file()
