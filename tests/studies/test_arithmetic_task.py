"""studies.tasks: exact EleutherAI formats, independently checked answers, seeded and disjoint splits, prompts."""

from __future__ import annotations

import ast
import hashlib
import json
import operator

import pytest

from lens.tokenizer import Tokenizer
from studies.tasks import arithmetic
from studies.tasks.prompts import (
    SYSTEM_MESSAGE,
    PromptTemplate,
    chat_prompt,
    chat_template,
    plain_prompt,
    plain_template,
    reference_shots,
    resolve_template,
)
from tests.conftest import HUGINN_0125

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expression: str) -> int:
    """Integer arithmetic from the text alone (``ast``, not the generator's tables)."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise AssertionError(f"unexpected syntax in {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


def question_expression(context: str) -> str:
    assert context.startswith("Question: What is ") and context.endswith("?\nAnswer:"), context
    body = context.removeprefix("Question: What is ").removesuffix("?\nAnswer:")
    return body.replace(" plus ", " + ").replace(" minus ", " - ").replace(" times ", " * ")


def test_reference_rows_are_reproduced_exactly() -> None:
    rows = json.loads(arithmetic.reference_path().read_text())
    # the packaged copy is the reference study's released file, byte for byte
    released = "d12dd2be219854a6059f117bceef09a02d4407f3ae156e0939cd3519af103e27"
    assert hashlib.sha256(arithmetic.reference_path().read_bytes()).hexdigest() == released
    problems = arithmetic.load_reference_problems()
    assert len(problems) == len(rows) == 71
    for row, p in zip(rows, problems, strict=True):
        a, b, c = p.operands
        again = arithmetic.composite(a, p.operators[0], b, p.operators[1], c)
        assert (again.context, again.completion) == (row["context"], row["completion"])
        if "intermediate" in row:
            assert again.intermediate == row["intermediate"]
    assert problems[5].context == "Question: What is (6 - 5) * 3?\nAnswer:"
    assert (problems[5].completion, problems[5].intermediate) == (" 3", "1")


def test_formats() -> None:
    assert arithmetic.binary("arithmetic_2da", 98, 45).context == "Question: What is 98 plus 45?\nAnswer:"
    assert arithmetic.binary("arithmetic_2da", 98, 45).completion == " 143"
    assert arithmetic.binary("arithmetic_2ds", 20, 73).completion == " -53"
    assert arithmetic.binary("arithmetic_2dm", 17, 44).context == "Question: What is 17 times 44?\nAnswer:"
    p = arithmetic.composite(2, "-", 9, "+", 3)
    assert (p.context, p.completion, p.intermediate) == (
        "Question: What is (2 - 9) + 3?\nAnswer:",
        " -4",
        "-7",
    )
    assert arithmetic.composite(3, "*", 4, "*", 1).completion == " 12"
    assert (
        arithmetic.parse_problem("arithmetic_3ds", "Question: What is 5 minus 999?\nAnswer:").answer == -994
    )
    with pytest.raises(ValueError, match="completion"):
        arithmetic.parse_problem("arithmetic_1dc", "Question: What is (1 + 1) + 1?\nAnswer:", " 4")
    with pytest.raises(ValueError):
        arithmetic.binary("arithmetic_2da", 100, 1)


@pytest.mark.parametrize("task", arithmetic.TASKS)
def test_completions_are_correct(task: str) -> None:
    digits = arithmetic.BINARY.get(task, (1, ""))[0]
    for p in arithmetic.sample(task, 60, "train", seed=3):
        assert p.task == task and p.split == "train"
        expression = question_expression(p.context)
        assert p.completion == f" {evaluate(expression)}"
        assert all(0 <= x < 10**digits for x in p.operands)
        if task == "arithmetic_1dc":
            inner = expression[: expression.index(")") + 1]
            assert p.intermediate == str(evaluate(inner))
            assert len(p.operands) == 3 and set(p.operators) <= {"+", "-", "*"}
        else:
            assert p.intermediate is None


def test_1dc_space_and_intermediates() -> None:
    every = arithmetic.enumerate_all("arithmetic_1dc")
    assert len(every) == len({p.context for p in every}) == 10 * 10 * 10 * 3 * 3
    for p in every[::97]:
        inner = question_expression(p.context)
        assert p.intermediate == str(evaluate(inner[: inner.index(")") + 1]))
    assert any(p.completion.startswith(" -") for p in every) and any(len(p.completion) > 3 for p in every)


def test_sampling_is_seeded() -> None:
    for task in ("arithmetic_1dc", "arithmetic_2dm", "arithmetic_4da"):
        a = arithmetic.sample(task, 100, "test", seed=5)
        assert a == arithmetic.sample(task, 100, "test", seed=5)
        assert a != arithmetic.sample(task, 100, "test", seed=6)
        assert len({p.context for p in a}) == 100  # distinct within a sample
    assert arithmetic.sample("arithmetic_1dc", 5, "train", seed=1) != arithmetic.sample(
        "arithmetic_1dc", 5, "test", seed=1
    )
    assert arithmetic.sample("arithmetic_1dc", 0, "test") == []


def test_splits_are_disjoint_and_large_enough() -> None:
    splits = {s: arithmetic.enumerate_all("arithmetic_1dc", s) for s in arithmetic.SPLITS}
    contexts = {s: {p.context for p in ps} for s, ps in splits.items()}
    assert sum(len(v) for v in contexts.values()) == 9000
    assert not contexts["train"] & contexts["test"]
    assert not contexts["train"] & contexts["validation"]
    assert not contexts["validation"] & contexts["test"]
    assert 0.17 < len(contexts["test"]) / 9000 < 0.23 and 0.07 < len(contexts["validation"]) / 9000 < 0.13
    # the split is a function of the text: samples from any seed stay inside their split
    for task in ("arithmetic_1dc", "arithmetic_2ds", "arithmetic_5da"):
        for split in arithmetic.SPLITS:
            for p in arithmetic.sample(task, 50, split, seed=11):
                assert arithmetic.split_of(p.context) == split
    # the reference study's problems (shots included) are never trained on
    assert {p.split for p in arithmetic.load_reference_problems()} == {"test"}
    train = {p.context for p in arithmetic.sample("arithmetic_1dc", len(splits["train"]), "train", seed=0)}
    assert train == contexts["train"]


def test_single_digit_and_bad_requests() -> None:
    for p in arithmetic.sample("arithmetic_1dc", 100, "test", seed=0, single_digit=True):
        assert p.completion.strip() in "0123456789" and p.intermediate in list("0123456789")
    with pytest.raises(ValueError, match="unknown task"):
        arithmetic.sample("arithmetic_9dz", 1)
    with pytest.raises(ValueError, match="unknown split"):
        arithmetic.sample("arithmetic_1dc", 1, split="dev")
    with pytest.raises(ValueError, match="only"):
        arithmetic.sample("arithmetic_1dc", 5000, split="test")
    with pytest.raises(ValueError, match="too many to enumerate"):
        arithmetic.enumerate_all("arithmetic_3da")
    assert len(arithmetic.enumerate_all("arithmetic_2dm")) == 10_000


# ---------------------------------------------------------------------- prompts
Q = "Question: What is (3 * 2) + 1?\nAnswer:"


def test_plain_prompt() -> None:
    text = plain_prompt(Q)
    assert text == (
        "Question: What is (5 + 1) + 1?\nAnswer: 7\n\n"
        "Question: What is (2 + 5) - 1?\nAnswer: 6\n\n"
        "Question: What is (6 - 4) + 5?\nAnswer: 7\n\n"
        "Question: What is (2 + 4) - 1?\nAnswer: 5\n\n"
        "Question: What is (3 * 2) + 1?\nAnswer:"
    )
    assert plain_prompt(Q, shots=()) == Q == plain_template(0).render(Q)
    assert plain_prompt(arithmetic.composite(3, "*", 2, "+", 1), shots=[("A?", " 1")]) == "A? 1\n\n" + Q
    assert resolve_template("Solve: {question}").render("x") == "Solve: x"


def test_template_checks_and_records() -> None:
    with pytest.raises(ValueError, match=r"no \{question\} slot"):
        PromptTemplate("bad", template="Question: {q}")
    with pytest.raises(ValueError, match=r"no \{question\} slot"):
        PromptTemplate("bad", template="no slot here")
    with pytest.raises(ValueError, match="unknown slot"):
        PromptTemplate("bad", template="{question} {answer}")
    with pytest.raises(ValueError, match="question"):
        resolve_template("Q: {x}")
    with pytest.raises(ValueError, match="unknown prompt template"):
        resolve_template("chatty")
    record = chat_template().to_dict()
    assert json.loads(json.dumps(record)) == record
    assert (
        record["name"] == "chat-4shot"
        and record["template"] == "{question}"
        and record["system"] == SYSTEM_MESSAGE
    )
    assert record["shots"] == [list(s) for s in reference_shots()] and record["answer_prefix"] == "\n\n"
    assert plain_template().to_dict()["answer_prefix"] == ""
    assert resolve_template(None, None).name == "plain" and resolve_template("plain-4shot").shots == tuple(
        reference_shots()
    )
    with pytest.raises(ValueError, match="chat template"):
        chat_template().render(Q, None)


def test_chat_prompt_matches_the_reference_for_huginn() -> None:
    tok = Tokenizer.from_dir(HUGINN_0125)
    text = chat_prompt(tok, Q)
    assert text.startswith(
        "<|begin_text|><|begin_header|>system<|end_header|>\n\n" + SYSTEM_MESSAGE + "<|end_turn|>"
    )
    assert "<|begin_header|>Huginn<|end_header|>\n\n7<|end_turn|>" in text
    assert text.endswith(
        "<|begin_header|>user<|end_header|>\n\n" + Q + "<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n"
    )
    template = resolve_template(None, tok)
    assert template.name == "chat" and template.render(Q, tok) == text
    assert tok.decode(tok.encode(text)) == text
    # the first answer token as Huginn must emit it: the bare digit after the header ("7" = 55)
    prefix = template.answer_prefix
    answer = template.expected_answer(" 7")
    assert tok.encode(prefix + answer)[len(tok.encode(prefix)) :] == [55]
