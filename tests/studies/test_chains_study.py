"""The chains study end to end on a small random model: every table and figure, resume after a kill,
statement positions, the CLI; and the arithmetic study's code path on the chains model."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

import probes.linear
from looplens.cli import app
from probes.store import Run
from studies.arithmetic import run_arithmetic_study
from studies.chains import run_chains_study, statement_positions, study_problems
from studies.tasks import chains
from studies.tiny_arith.tokenizer import build_tokenizer
from tests.conftest import save_arith_model

SETTINGS = dict(n=6, probe_n=40, depth_n=3, steps=2, depths=(1, 2), hops=(1, 3), batch_size=6, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_arith_model(tmp_path_factory.mktemp("model") / "chains-random")


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    return run_chains_study(model=str(model_dir), out=tmp_path_factory.mktemp("runs"), **SETTINGS)


def test_tables(run):
    prompts = run.table("prompts")
    assert prompts.groupby("task").size().to_dict() == {"chains_1hop": 40, "chains_3hop": 40}
    ranks = run.table("ranks")
    three = ranks[ranks["prompt_id"] >= 300_000]
    assert {"value_0", "value_1", "value_2", "value_3", "final", "control", "predicted"} == set(
        three["target_kind"]
    )
    assert set(ranks["lens"]) == {"logit", "coda", "tuned"}
    assert ranks["prompt_id"].nunique() == 2 * 6
    final = three[three["target_kind"] == "final"].reset_index(drop=True)
    last_value = three[three["target_kind"] == "value_3"].reset_index(drop=True)
    assert final["token_id"].equals(last_value["token_id"])  # the final answer is the chain's last value
    answers = run.table("answers")
    assert len(answers[answers["purpose"] == "probe"]) == 12
    assert set(answers.loc[answers["purpose"] == "depth", "num_steps"]) == {1, 2}
    probes_ = run.table("linear_probes")
    assert set(probes_["anchor"]) == {"statement", "last"}
    assert set(probes_.loc[probes_["task"] == "chains_3hop", "target"]) == {f"value_{k}" for k in range(4)}
    assert sorted(probes_["unrolled_index"].unique()) == list(range(1 + 2 * 2 + 1))
    assert probes_["test_accuracy"].between(0, 1).all() and (probes_["n_test"] == 10).all()
    assert run.status == "complete"


def test_figures(run):
    figures = run.figures_dir
    for name in ("chain_ranks", "chain_probes", "depth_scaling", "rank_trajectory", "latent_dynamics"):
        assert (figures / f"{name}.png").stat().st_size > 10_000, name
        assert (figures / f"{name}.html").is_file()
    ranks = pd.read_parquet(figures / "chain_ranks.parquet")
    assert set(ranks["hops"]) == {1, 3} and (ranks["median"] >= 1).all()
    assert set(ranks.loc[ranks["hops"] == 3, "target"]) == {
        "value_0",
        "value_1",
        "value_2",
        "value_3",
        "control",
    }
    assert ranks.loc[ranks["final"], "target"].tolist() == [
        f"value_{h}" for h in ranks.loc[ranks["final"], "hops"]
    ]
    probes_ = pd.read_parquet(figures / "chain_probes.parquet")
    assert (
        set(probes_["anchor"]) == {"statement", "last"}
        and (probes_["ci_low"] <= probes_["test_accuracy"]).all()
    )
    depth = pd.read_parquet(figures / "depth_scaling.parquet")
    assert set(depth["task"]) == {"chains_1hop", "chains_3hop"} and set(depth["num_steps"]) == {1, 2}


def test_statement_positions_point_at_each_assignment():
    tok = build_tokenizer()
    for p in study_problems(4, 20, seed=1):
        ids = tok.encode(p.context)
        for name, value, pos in zip(p.names, p.values, statement_positions(tok, p.context, p), strict=True):
            assert tok.decode([ids[pos]]) == ";"
            prefix = tok.decode(ids[: pos + 1])
            assert prefix.split(";")[-2].startswith(f"{name}=")
            assert chains.evaluate_program(chains.parse_program(prefix))[name] == value
        assert len(set(p.values)) == len(p.values)  # the study's problems have distinct values


def test_killed_study_resumes_without_recomputing(model_dir, tmp_path, monkeypatch):
    real = probes.linear.linear_probe
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # in the second hop count's probes, after its ranks and answers
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr("studies.chains.linear_probe", dying)
    settings = {**SETTINGS, "tuned_lens": False}
    with pytest.raises(KeyboardInterrupt):
        run_chains_study(model=str(model_dir), out=tmp_path, **settings)
    monkeypatch.setattr("studies.chains.linear_probe", real)
    path = next(tmp_path.iterdir())
    first = Run.open(path)
    assert first.status == "failed" and "KeyboardInterrupt" in first.manifest["error"]
    assert first.shards("linear_probes") == ["shard-00001"] and len(first.shards("ranks")) == 2
    written = (path / "ranks" / "shard-00003.parquet").stat().st_mtime_ns
    done = run_chains_study(model=str(model_dir), out=tmp_path, **settings)
    assert (path / "ranks" / "shard-00003.parquet").stat().st_mtime_ns == written
    assert done.status == "complete" and done.shards("linear_probes") == ["shard-00001", "shard-00003"]
    assert not done.table("ranks").duplicated(["prompt_id", "site", "iteration", "lens", "target_kind"]).any()


def test_cli_runs_the_chains_study_and_refuses_bad_input(model_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["study", "chains", "--model", str(model_dir), "--n", "4", "--steps", "1", "--depths", "1",
         "--no-tuned-lens", "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "chains study" in result.output and "decodable" in result.output
    for args, message in (
        (["--steps", "0"], "--steps"),
        (["--depths", "1,x"], "--depths"),
        (["--n", "0"], "--n"),
    ):
        result = runner.invoke(
            app, ["study", "chains", "--model", str(model_dir), "--out", str(tmp_path), *args]
        )
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_arithmetic_study_runs_unchanged_on_the_chains_model(tmp_path):
    run = run_arithmetic_study(
        model="tiny-chains",
        n=8,
        steps=4,
        batch_size=8,
        depths=(1, 4),
        depth_n=2,
        tuned_lens=False,
        out=tmp_path,
    )
    assert run.status == "complete"
    for name in (
        "rank_trajectory",
        "numeric_prefix",
        "depth_scaling",
        "latent_dynamics",
        "reference_overlay",
    ):
        assert (run.figures_dir / f"{name}.png").is_file(), name
