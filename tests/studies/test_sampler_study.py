"""``looplens study sampler`` end to end on a small random model: tables, figures, resume, CLI, errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from looplens.cli import app
from probes.store import Run, RunMismatchError
from studies.sampler import run_sampler_study, sampler_grid, summarize
from tests.conftest import save_arith_model

SMALL = dict(n=4, steps=4, new_tokens=16, batch_size=2, thresholds=(0.03, 0.1), inner=(2,), headways=(1, 2))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_arith_model(tmp_path_factory.mktemp("model") / "tiny-random", block_size=256)


@pytest.fixture(scope="module")
def sampler_run(model_dir, tmp_path_factory):
    return run_sampler_study(
        model=str(model_dir), out=tmp_path_factory.mktemp("runs"), wavefront_n=1, **SMALL
    )


def test_the_grid_covers_every_sampler_family():
    grid = sampler_grid(16, [0.03, 0.1], [2, 4], [1, 2])
    families = {s.family for s in grid}
    assert families == {"fixed depth", "adaptive exit", "diffusion", "diffusion (corrected)"}
    assert grid[0].name == "ar-T16" and len({s.name for s in grid}) == len(grid)
    assert sum(s.family == "diffusion" for s in grid) == 2 * 2 * 2


def test_tasks():
    from lens.errors import InputError
    from studies.sampler import default_task, sample_problems

    assert default_task("tiny-arith") == "arithmetic_1dc"
    assert default_task("/models/tiny-chains") == "chains_2hop_trace"
    problems = sample_problems("arithmetic_3ds", 3, seed=0)
    assert len(problems) == 3 and all(p.task == "arithmetic_3ds" for p in problems)
    with pytest.raises(InputError, match="unknown task 'nope'"):
        sample_problems("nope", 3, seed=0)
    try:
        from studies.tasks import chains
    except ImportError:
        return  # a checkout without the chains family
    trace = sample_problems("chains_2hop_trace", 2, seed=0)
    assert all(p.form == "trace" and len(p.completion) >= 16 for p in trace) and chains.TASKS


def test_tables_figures_and_the_reference(sampler_run):
    run = sampler_run
    assert run.status == "complete"
    rows = run.table("sampler")
    grid = {s["name"] for s in run.manifest["settings"]["grid"]}
    assert set(rows["setting"]) == grid and len(rows) == 4 * len(grid)
    reference = rows[rows["setting"] == run.manifest["settings"]["reference"]]
    assert reference["correct"].all() and (reference["token_agreement"] == 1).all()
    # every prompt gets its 16 tokens, except where the faithful sampler's window stalled up to the cap
    short = rows[rows["new_tokens"] < 16]
    assert (short["stopped"] == "max_diffusion_steps").all() and (short["sampler"] == "diffusion").all()
    for options, calls in zip(short["options"], short["model_calls"], strict=True):
        assert (
            json.loads(options)["faithful"] is not False
            and calls == json.loads(options)["max_diffusion_steps"] + 1
        )
    assert (rows[rows["setting"].str.endswith("corrected")]["new_tokens"] == 16).all()
    assert (rows[rows["sampler"] == "autoregressive"]["stopped"] == "max_new_tokens").all()
    diffusion = rows[rows["sampler"] == "diffusion"]
    for options in diffusion["options"]:
        assert json.loads(options)["init_scale"] == 0.0
    # the reference's calls: one forward per token; its iterations: 4 per token
    assert (reference["model_calls"] == reference["new_tokens"]).all()
    assert (reference["core_iterations"] == 4 * reference["new_tokens"]).all()
    summary = summarize(rows)
    assert summary.set_index("setting").loc["ar-T4", "accuracy"] == 1.0
    wave = run.table("wavefront")
    assert set(wave["prompt_id"]) == {0} and wave["setting"].nunique() == 1
    assert (wave["rank"] >= 1).all() and {"logit", "coda"} <= set(wave["lens"])
    for name in ("sampler_frontier", "wavefront"):
        assert (run.figures_dir / f"{name}.png").stat().st_size > 5000
        assert (run.figures_dir / f"{name}.html").is_file()


def test_resume_does_not_recompute_and_other_settings_are_refused(sampler_run, model_dir):
    path = sampler_run.path
    shard = path / "sampler" / "shard-ar-T4-b000.parquet"
    written = shard.stat().st_mtime_ns
    again = run_sampler_study(model=str(model_dir), out=path.parent, name=path.name, wavefront_n=1, **SMALL)
    assert shard.stat().st_mtime_ns == written and again.status == "complete"
    with pytest.raises(RunMismatchError, match="settings"):
        run_sampler_study(
            model=str(model_dir),
            out=path.parent,
            name=path.name,
            wavefront_n=1,
            **{**SMALL, "headways": (1,)},
        )
    assert Run.open(path).status == "complete"


def test_cli_study_and_bad_input(model_dir, tmp_path):
    runner = CliRunner()
    args = ["study", "sampler", "--model", str(model_dir), "--out", str(tmp_path), "--n", "2", "--steps", "2"]
    small = [
        "--thresholds",
        "0.1",
        "--inner",
        "2",
        "--headways",
        "2",
        "--new-tokens",
        "16",
        "--wavefront-n",
        "0",
    ]
    result = runner.invoke(app, args + small)
    assert result.exit_code == 0, result.output
    assert "ar-T2" in result.output and "diff-e0.1-r2-h2" in result.output
    for bad, message in [
        (["--new-tokens", "8"], "--new-tokens must be >= 16"),
        (["--headways", "0"], "headways must be >= 1"),
        (["--thresholds", "x"], "--thresholds must be comma-separated numbers"),
        (["--thresholds", "0"], "exit thresholds must be > 0"),
    ]:
        result = runner.invoke(app, args + small + bad)
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_cli_generate_both_samplers(model_dir):
    runner = CliRunner()
    base = [
        "generate",
        "3 4 5 6",
        "--ids",
        "--model",
        str(model_dir),
        "--max-new-tokens",
        "5",
        "--steps",
        "4",
    ]
    result = runner.invoke(app, base + ["--exit-criterion", "kl"])
    assert result.exit_code == 0, result.output
    assert "iterations per token" in result.output
    result = runner.invoke(app, base + ["--sampler", "diffusion", "--headway", "2", "--no-faithful"])
    assert result.exit_code == 0, result.output
    assert "diffusion steps" in result.output and "model calls" in result.output
    result = runner.invoke(app, base + ["--sampler", "diffusion", "--freeze-strategy", "vibes"])
    assert result.exit_code == 2 and "unknown freeze_strategy" in result.output
    result = runner.invoke(app, base + ["--sampler", "diffusion", "--exit-criterion", "kl"])
    assert result.exit_code == 2 and "autoregressive option" in result.output
    result = runner.invoke(app, base + ["--headway", "2"])
    assert result.exit_code == 2 and "--headway: an option of the diffusion sampler" in result.output
