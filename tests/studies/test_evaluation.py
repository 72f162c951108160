"""``looplens eval``: the accuracy run, the card table it rewrites, and runs that refuse other weights."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import lens
from lens.errors import InputError
from looplens.cli import app
from probes.store import Run, RunMismatchError
from studies.evaluation import (
    CARD_BEGIN,
    CARD_END,
    DEFAULT_N,
    problem_counts,
    run_evaluation,
    task_problems,
)
from studies.tasks import arithmetic
from tests.conftest import save_arith_model


@pytest.fixture
def checkpoint(tmp_path):
    path = save_arith_model(tmp_path / "ckpt", mean_recurrence=2)
    (path / "README.md").write_text(f"# card\n\n{CARD_BEGIN}\nold table\n{CARD_END}\n\nkept text\n")
    return path


def test_eval_writes_a_run_and_rewrites_the_card_table(checkpoint, tmp_path):
    console = Console(record=True, width=100)
    acc = run_evaluation(str(checkpoint), [1, 2], n=3, out=tmp_path / "runs", card=True, console=console)
    assert set(acc["num_steps"]) == {1, 2} and set(acc["task"]) == set(arithmetic.TASKS)
    assert (acc["n"] == 3).all()  # --n applies to every task, one-digit composite included
    said = console.export_text()
    assert "10 tasks × 2 depths (T = 1, 2) × 3 problems = 60 greedy answers" in said
    card = (checkpoint / "README.md").read_text()
    assert "old table" not in card and card.endswith("kept text\n")
    rows = card.split(CARD_BEGIN)[1].split(CARD_END)[0].strip().splitlines()
    assert rows[0] == "| task | n | T=1 | T=2 |" and len(rows) == 2 + len(arithmetic.TASKS)
    first = acc[(acc["task"] == "arithmetic_1dc") & (acc["num_steps"] == 1)]["accuracy"].item()
    assert rows[2].startswith("| arithmetic_1dc |") and rows[2].split("|")[3].strip() == f"{100 * first:.1f}"
    run = Run.open(tmp_path / "runs" / "eval-ckpt-n3-s0")
    assert len(run.table("answers")) == int(acc["n"].sum())


def test_default_counts_are_the_cards_and_n_is_checked():
    counts = problem_counts(arithmetic.TASKS, None)
    assert counts["arithmetic_1dc"] is None and counts["arithmetic_2da"] == DEFAULT_N["arithmetic"]
    assert len(task_problems("arithmetic_1dc", None)) == 1870  # the whole held-out split
    assert set(problem_counts(["chains_4hop", "arithmetic_1dc"], 7).values()) == {7}
    with pytest.raises(InputError, match="--n"):
        problem_counts(arithmetic.TASKS, 0)


def test_eval_on_chains_says_what_it_does_and_resumes_with_progress(checkpoint, tmp_path):
    console = Console(record=True, width=120)
    tasks = ["chains_2hop", "chains_2hop_trace"]
    acc = run_evaluation(str(checkpoint), [1, 2], n=4, out=tmp_path, console=console, tasks=tasks)
    assert set(acc["task"]) == set(tasks) and (acc["n"] == 4).all()
    answers = Run.open(tmp_path / "eval-ckpt-n4-s0").table("answers")
    trace = answers[answers["task"] == "chains_2hop_trace"]
    assert trace["expected"].str.count("=").ge(3).all()  # the long answer: a name=value pair per statement
    assert "2 tasks × 2 depths (T = 1, 2) × 4 problems = 16 greedy answers" in console.export_text()
    # a run that stopped after some parts resumes them and says how much is done
    run = Run.open(tmp_path / "eval-ckpt-n4-s0")
    manifest = json.loads((run.path / "manifest.json").read_text())
    for shard in ("shard-T0002-chains_2hop", "shard-T0002-chains_2hop_trace"):
        del manifest["shards"]["answers"][shard]
    manifest["status"] = "running"
    (run.path / "manifest.json").write_text(json.dumps(manifest))
    console = Console(record=True, width=120)
    again = run_evaluation(str(checkpoint), [1, 2], n=4, out=tmp_path, console=console, tasks=tasks)
    assert "resuming: 2 of 4 (depth, task) parts already done" in console.export_text()
    pd.testing.assert_frame_equal(again, acc)


def test_eval_cli_errors_are_one_line(checkpoint, tmp_path):
    runner = CliRunner()
    for args, message in (
        (["--n", "0"], "--n"),
        (["--tasks", "geometry"], "unknown task"),
        (["--depths", "0"], "depths must be >= 1"),
    ):
        result = runner.invoke(app, ["eval", "--model", str(checkpoint), "--out", str(tmp_path), *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_eval_run_refuses_to_resume_with_other_weights(checkpoint, tmp_path):
    run_evaluation(str(checkpoint), [1], n=2, out=tmp_path / "runs")
    other = tmp_path / "ckpt2"
    shutil.copytree(checkpoint, other)
    model = lens.load_model(other)
    with torch.no_grad():
        model.transformer.ln_f.weight.add_(0.01)
    lens.save_model(model, other)
    shutil.rmtree(checkpoint)
    other.rename(checkpoint)  # same name, same architecture, other weights
    with pytest.raises(RunMismatchError, match="model.weights"):
        run_evaluation(str(checkpoint), [1], n=2, out=tmp_path / "runs")


def test_answers_never_show_special_tokens(checkpoint):
    """Issue #11.4: an answer ended by end-of-text is stored as the text alone."""
    from studies.evaluation import evaluate_answers

    model = lens.load_model(checkpoint)
    eos, digit = model.tokenizer.eos_token_id, model.tokenizer.encode(" 7")[0]
    head, calls = model.head, []

    def answer_then_stop(x):
        out = head(x)
        out[..., digit if not calls else eos] = 1e4
        calls.append(1)
        return out

    model.head = answer_then_stop
    problem = arithmetic.composite(2, "*", 3, "+", 1)
    prompt = model.tokenizer.encode(problem.context)
    answers = evaluate_answers(model, [problem], [prompt], num_steps=2)
    assert answers["generated"].tolist() == [" 7"] and answers["correct"].tolist() == [True]


def test_an_eval_that_fails_marks_its_run_failed(checkpoint, tmp_path, monkeypatch):
    """#11.11: a crash after the run exists leaves it ``failed`` with the reason, never ``running``."""
    import studies.evaluation as evaluation

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(evaluation, "evaluate_tasks", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_evaluation(str(checkpoint), [1], n=2, out=tmp_path / "runs")
    (path,) = (tmp_path / "runs").iterdir()
    run = Run.open(path)
    assert run.status == "failed" and "RuntimeError: out of memory" in run.manifest["error"]
