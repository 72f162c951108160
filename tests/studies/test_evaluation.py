"""``looplens eval``: the accuracy run, the card table it rewrites, and runs that refuse other weights."""

from __future__ import annotations

import shutil

import pytest
import torch

import lens
from probes.store import Run, RunMismatchError
from studies.evaluation import CARD_BEGIN, CARD_END, run_evaluation
from studies.tasks import arithmetic
from tests.conftest import save_arith_model


@pytest.fixture
def checkpoint(tmp_path):
    path = save_arith_model(tmp_path / "ckpt", mean_recurrence=2)
    (path / "README.md").write_text(f"# card\n\n{CARD_BEGIN}\nold table\n{CARD_END}\n\nkept text\n")
    return path


def test_eval_writes_a_run_and_rewrites_the_card_table(checkpoint, tmp_path):
    acc = run_evaluation(str(checkpoint), [1, 2], n=3, out=tmp_path / "runs", card=True)
    assert set(acc["num_steps"]) == {1, 2} and set(acc["task"]) == set(arithmetic.TASKS)
    composite = acc[acc["task"] == "arithmetic_1dc"]
    assert (composite["n"] == len(list(arithmetic.enumerate_all("arithmetic_1dc", "test")))).all()
    card = (checkpoint / "README.md").read_text()
    assert "old table" not in card and card.endswith("kept text\n")
    rows = card.split(CARD_BEGIN)[1].split(CARD_END)[0].strip().splitlines()
    assert rows[0] == "| task | n | T=1 | T=2 |" and len(rows) == 2 + len(arithmetic.TASKS)
    first = acc[(acc["task"] == "arithmetic_1dc") & (acc["num_steps"] == 1)]["accuracy"].item()
    assert rows[2].startswith("| arithmetic_1dc |") and rows[2].split("|")[3].strip() == f"{100 * first:.1f}"
    run = Run.open(tmp_path / "runs" / "eval-ckpt-n3-s0")
    assert len(run.table("answers")) == int(acc["n"].sum())


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
