"""``looplens study patching`` end to end: the embedded model, an Ouro and a retrofit model, resume, bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import probes.patching
from lens.errors import InputError
from looplens.cli import app
from probes.store import Run, RunMismatchError
from studies.patching import run_patching_study
from tests.conftest import save_arith_model

SETTINGS = dict(n=3, steps=3, seed=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_patching_study(model="tiny-arith", out=tmp_path_factory.mktemp("patching"), **SETTINGS)


def test_study_writes_every_experiment_and_figure(run):
    rows, pairs = run.table("patching"), run.table("patch_pairs")
    assert run.status == "complete"
    assert set(rows["experiment"]) == {"operand", "operand_reinject", "cot_other", "cot_same", "cot_reinject"}
    operand = rows[(rows["experiment"] == "operand") & (rows["method"] == "exact")]
    assert set(operand["direction"]) == {"denoise", "noise"} and set(operand["iteration"]) == {1, 2, 3}
    assert set(rows[rows["experiment"] == "operand"]["method"]) == {"exact", "attribution"}
    # positions start where the prompts first differ: before that both runs hold the same states
    for row in pairs[pairs["experiment"] == "operand"].itertuples():
        clean, corrupt = json.loads(row.clean_tokens), json.loads(row.corrupt_tokens)
        first = next(i for i, (a, b) in enumerate(zip(clean, corrupt, strict=True)) if a != b)
        cells = operand[operand["pair_id"] == row.pair_id]
        assert cells["position"].min() == first and cells["position"].max() == len(clean) - 1
        assert row.clean_top_id == row.clean_answer_id and row.corrupt_top_id == row.corrupt_answer_id
    cot = rows[rows["experiment"] == "cot_other"]
    assert cot["follow_rank"].notna().all() and set(cot["position"]) == {14}  # the last position
    figures = {p.stem for p in run.figures_dir.glob("*.png")}
    assert {"patching_heatmap", "patching_flip", "cot_patching", "attribution_agreement",
            "intermediate_vs_final"} <= figures  # fmt: skip
    assert "patching_exit_gate" not in figures  # tiny-arith has no exit gate
    summary = json.loads((run.figures_dir / "summary.json").read_text())
    agreement = summary["attribution_agreement"]
    estimates = int((rows["method"] == "attribution").sum())
    assert agreement["cells"] + agreement["no_op_cells"] == estimates and agreement["cells"] > 0
    headline = summary["headlines"]["attribution_agreement"]
    assert headline["cells"] == agreement["cells"] and headline["no_op_cells"] == agreement["no_op_cells"]
    assert summary["pairs"]["operand"] == 3
    heat = pd.read_parquet(run.figures_dir / "patching_heatmap.parquet")
    assert heat["effect_mean"].between(-5, 5).all() and set(heat["group"]) == {"a", "b", "c"}


def test_resume_skips_finished_shards_and_refuses_other_settings(run, monkeypatch):
    written = {p: p.stat().st_mtime_ns for p in (run.path / "patching").glob("*.parquet")}

    def no_more(*args, **kwargs):
        raise AssertionError("a finished shard was computed again")

    monkeypatch.setattr("studies.patching.iter_patching", no_more)
    again = run_patching_study(model="tiny-arith", out=run.path.parent, **SETTINGS)
    assert {p: p.stat().st_mtime_ns for p in (run.path / "patching").glob("*.parquet")} == written
    assert again.status == "complete" and len(again.table("patching")) == len(run.table("patching"))
    with pytest.raises(RunMismatchError, match="init_state"):
        run_patching_study(
            model="tiny-arith", out=run.path.parent, name=run.name, init_state="zeros", **SETTINGS
        )


def test_a_killed_study_resumes(tmp_path, monkeypatch):
    real = probes.patching.iter_patching
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr("studies.patching.iter_patching", dying)
    monkeypatch.setattr("studies.patching._render", lambda run, steps: {})  # shards are the point here
    settings = dict(n=3, steps=2, seed=1)
    with pytest.raises(KeyboardInterrupt):
        run_patching_study(model="tiny-arith", out=tmp_path, **settings)
    path = next(tmp_path.iterdir())
    assert Run.open(path).status == "failed" and len(Run.open(path).shards("patching")) == 2
    monkeypatch.setattr("studies.patching.iter_patching", real)
    done = run_patching_study(model="tiny-arith", out=tmp_path, **settings)
    rows = done.table("patching")
    key = ["pair_id", "experiment", "direction", "method", "site", "iteration", "position"]
    assert done.status == "complete" and not rows.duplicated(key).any()


@pytest.mark.parametrize("family", ["ouro", "retrofit"])
def test_every_family(tmp_path, family):
    size = {"max_position_embeddings": 128} if family == "ouro" else {"block_size": 128}
    model = save_arith_model(tmp_path / family, family=family, **size)
    result = run_patching_study(model=str(model), out=tmp_path / "runs", n=3, steps=2, keep_incorrect=True)
    experiments = set(result.table("patching")["experiment"])
    figures = {p.stem for p in result.figures_dir.glob("*.png")}
    if family == "ouro":  # no adapter: nothing to re-inject; an exit gate: its own figure
        assert experiments == {"operand", "cot_other", "cot_same"}
        assert "patching_exit_gate" in figures
        rows = result.table("patching")
        assert rows[rows["method"] == "exact"]["exit_step"].notna().all()
    else:
        assert "operand_reinject" in experiments and "patching_exit_gate" not in figures


def test_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="--n"):
        run_patching_study(model="tiny-arith", out=tmp_path, n=0)
    with pytest.raises(InputError, match="init-state"):
        run_patching_study(model="tiny-arith", out=tmp_path, n=2, init_state="ones")
    result = CliRunner().invoke(app, ["study", "patching", "--n", "5000", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output and "--n" in result.output
    result = CliRunner().invoke(app, ["study", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "patching" in result.output
