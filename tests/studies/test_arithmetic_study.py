"""The arithmetic study end to end on a small random model: tables behind every figure, resume, errors."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

import lens
import probes.api
from looplens.cli import app
from probes.store import Run
from studies.arithmetic import run_arithmetic_study
from tests.conftest import save_arith_model

SETTINGS = dict(n=12, steps=3, batch_size=4, depths=(1, 3), depth_n=4, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_arith_model(tmp_path_factory.mktemp("model") / "tiny-random")


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    return run_arithmetic_study(model=str(model_dir), out=tmp_path_factory.mktemp("runs"), **SETTINGS)


def test_ranks_table_covers_every_unrolled_layer(run):
    ranks = run.table("ranks")
    assert (ranks["rank"] >= 1).all()
    layers = ranks.query("unrolled_index >= 0 and lens == 'logit'")["unrolled_index"]
    assert sorted(layers.unique()) == list(range(1 + 3 * 2 + 1))  # prelude + T x core + coda
    assert set(ranks["lens"]) == {"logit", "coda", "tuned"}
    assert {"predicted", "final", "intermediate", "control", "digit_0"} <= set(ranks["target_kind"])
    assert not ranks.duplicated(["prompt_id", "site", "iteration", "lens", "target_kind"]).any()
    predicted = ranks.query("target_kind == 'predicted'")
    # the Coda Lens at the last latent and the Logit Lens at the output are the model itself
    assert (predicted.query("lens == 'coda' and site == 'latent'")["rank"] == 1).all()
    assert (predicted.query("lens == 'logit' and site == 'final'")["rank"] == 1).all()


def test_figure_tables(run):
    figures = run.figures_dir
    # a random model answers nothing correctly, so intermediate-vs-final (correct problems only) is skipped;
    # tests/studies/test_embedded_study.py checks it on the trained tiny-arith
    assert not (figures / "intermediate_vs_final.png").exists()
    for name in (
        "rank_trajectory",
        "numeric_prefix",
        "depth_scaling",
        "latent_dynamics",
        "reference_overlay",
    ):
        assert (figures / f"{name}.png").stat().st_size > 10_000
        assert (figures / f"{name}.html").is_file()
    traj = pd.read_parquet(figures / "rank_trajectory.parquet")
    assert (traj["median"] >= 1).all() and (traj["ci_low"] <= traj["median"]).all()
    assert (traj["median"] <= traj["ci_high"]).all()
    assert sorted(traj.query("lens == 'logit'")["unrolled_index"]) == list(range(8))
    coda_last = traj.query("lens == 'coda'").sort_values("unrolled_index").iloc[-1]
    assert coda_last["median"] == 1 and coda_last["top1"] == 1.0
    share = pd.read_parquet(figures / "numeric_prefix.parquet")["share"]
    assert share.between(0, 1).all()
    depth = pd.read_parquet(figures / "depth_scaling.parquet")
    assert set(depth["num_steps"]) == {1, 3} and depth["accuracy"].between(0, 1).all()
    assert run.manifest["prompt_template"]["name"] and run.status == "complete"


def test_killed_study_resumes_without_duplicates(model_dir, tmp_path, monkeypatch):
    real = probes.api.probe_prompts
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr("studies.arithmetic.probe_prompts", dying)
    with pytest.raises(KeyboardInterrupt):
        run_arithmetic_study(model=str(model_dir), out=tmp_path, **SETTINGS)
    monkeypatch.setattr("studies.arithmetic.probe_prompts", real)
    path = next(tmp_path.iterdir())
    first = Run.open(path)
    assert first.shards("ranks") == ["shard-00000"]
    written = (path / "ranks" / "shard-00000.parquet").stat().st_mtime_ns
    finished = run_arithmetic_study(model=str(model_dir), out=tmp_path, **SETTINGS)
    assert (path / "ranks" / "shard-00000.parquet").stat().st_mtime_ns == written
    ranks = finished.table("ranks")
    assert sorted(ranks["prompt_id"].unique()) == list(range(12))
    assert not ranks.duplicated(["prompt_id", "site", "iteration", "lens", "target_kind"]).any()
    assert finished.status == "complete"


def test_bad_inputs_give_one_clear_error(model_dir, tmp_path):
    runner = CliRunner()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model_dir / "config.json").read_text())
    cases = [
        (["study", "arithmetic", "--model", str(no_weights), "--out", str(tmp_path)], "no weights"),
        (
            [
                "study",
                "arithmetic",
                "--model",
                str(model_dir),
                "--template",
                "Q: what?",
                "--out",
                str(tmp_path),
            ],
            "{question}",
        ),
        (
            ["study", "arithmetic", "--model", str(model_dir), "--steps", "0", "--out", str(tmp_path)],
            "--steps",
        ),
        (["study", "geometry"], "unknown study"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_study_sized_run_on_the_embedded_model_resumes_after_a_kill(tmp_path, monkeypatch):
    """200 held-out problems × 16 iterations × both lenses on tiny-arith, killed after two shards."""
    real = probes.api.probe_prompts
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    settings = dict(
        model="tiny-arith",
        n=200,
        steps=16,
        batch_size=50,
        depths=(16,),
        depth_n=2,
        tuned_lens=False,
        out=tmp_path,
    )
    monkeypatch.setattr("studies.arithmetic.probe_prompts", dying)
    with pytest.raises(KeyboardInterrupt):
        run_arithmetic_study(**settings)
    monkeypatch.setattr("studies.arithmetic.probe_prompts", real)
    path = next(tmp_path.iterdir())
    written = {p.name: p.stat().st_mtime_ns for p in (path / "ranks").glob("*.parquet")}
    assert len(written) == 2
    run = run_arithmetic_study(**settings)
    assert {
        p.name: p.stat().st_mtime_ns for p in (path / "ranks").glob("*.parquet") if p.name in written
    } == written
    ranks = run.table("ranks")
    layout = lens.load_model("tiny-arith").layout
    layers = layout.prelude + 16 * layout.core + layout.coda
    per_prompt = ranks.query("target_kind == 'predicted' and unrolled_index >= 0").groupby("prompt_id").size()
    assert (
        len(per_prompt) == 200 and (per_prompt == 2 * layers - 1).all()
    )  # the Coda Lens stops before the coda
    assert not ranks.duplicated(["prompt_id", "site", "iteration", "lens", "target_kind"]).any()
