"""studies.tiny_arith.tokenizer: single-token digits and words, exact round trips, stable ids, file format."""

from __future__ import annotations

import pytest

from lens.tokenizer import Tokenizer
from studies.tasks import arithmetic
from studies.tasks.prompts import plain_prompt
from studies.tiny_arith.tokenizer import build_tokenizer, main

FIXED_IDS = {
    "<|pad|>": 0,
    "<|begin_text|>": 1,
    "<|end_text|>": 2,
    "<|unk|>": 3,
    " -": 4,
    " +": 5,
    " *": 6,
    " (": 7,
    " )": 8,
    " =": 9,
    "\n": 10,
    **{f" {d}": 11 + d for d in range(10)},
    "Question": 21,
    "Answer": 22,
    " What": 23,
    " is": 24,
    " plus": 25,
    " minus": 26,
    " times": 27,
    " the": 28,
    **{str(d): 48 + d for d in range(10)},  # ASCII codes, as in Huginn
    "-": 45,
    "+": 43,
    "*": 42,
    "(": 40,
    ")": 41,
    ":": 58,
    "?": 63,
    " ": 32,
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_tokenizer()


def test_size_and_special_tokens(tok: Tokenizer) -> None:
    assert tok.vocab_size == 128
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert not tok.has_chat_template
    assert tok.encode("Question", add_bos=True)[0] == 1
    assert tok.decode([1, 21, 2]) == "<|begin_text|>Question<|end_text|>"
    assert tok.decode([1, 21, 2], skip_special_tokens=True) == "Question"


def test_ids_are_fixed_and_stable(tok: Tokenizer) -> None:
    for text, tid in FIXED_IDS.items():
        assert tok.encode(text) == [tid], text
        assert tok.id_to_token(tid) == text
    other = build_tokenizer()
    assert other.backend.get_vocab(with_added_tokens=True) == tok.backend.get_vocab(with_added_tokens=True)
    assert other.backend.to_str() == tok.backend.to_str()


@pytest.mark.parametrize("task", arithmetic.TASKS)
def test_every_task_round_trips(tok: Tokenizer, task: str) -> None:
    problems = arithmetic.sample(task, 200, "train", seed=0) + arithmetic.sample(task, 50, "test", seed=1)
    for p in problems:
        for text in (p.context, p.completion, p.context + p.completion):
            ids = tok.encode(text)
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text
        # the first answer token is a single spaced digit or " -", whatever the context before it
        first = tok.encode(p.completion)[0]
        answer = p.completion.strip()
        assert first == (FIXED_IDS[" -"] if answer.startswith("-") else FIXED_IDS[f" {answer[0]}"])
        assert tok.encode(p.context + p.completion) == tok.encode(p.context) + tok.encode(p.completion)
        if p.intermediate is not None:
            assert len(tok.encode(p.intermediate.lstrip("-")[0])) == 1


def test_question_tokens(tok: Tokenizer) -> None:
    pieces = [tok.id_to_token(i) for i in tok.encode("Question: What is (6 - 5) * 3?\nAnswer:")]
    assert pieces == [
        "Question",
        ":",
        " What",
        " is",
        " (",
        "6",
        " -",
        " 5",
        ")",
        " *",
        " 3",
        "?",
        "\n",
        "Answer",
        ":",
    ]
    pieces = [tok.id_to_token(i) for i in tok.encode("Question: What is 98 minus 45?\nAnswer: -53")]
    assert pieces[4:8] == [" 9", "8", " minus", " 4"] and pieces[-3:] == [" -", "5", "3"]


def test_other_text(tok: Tokenizer) -> None:
    prompt = plain_prompt("Question: What is (3 * 2) + 1?\nAnswer:")
    assert tok.decode(tok.encode(prompt)) == prompt
    for text in ("This island is the place.", "  two  spaces\n\n", "What is it? is, isn't", "x=1/2; y = (3)"):
        ids = tok.encode(text)
        assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert tok.encode("island") == [ord(c) for c in "island"]  # no fixed word inside another word
    assert tok.encode("é") == [tok.unk_token_id]


def test_saved_files_load_back(tok: Tokenizer, tmp_path, capsys) -> None:
    main([str(tmp_path / "out")])
    assert "128 tokens" in capsys.readouterr().out
    again = Tokenizer.from_dir(tmp_path / "out")
    assert again.vocab_size == 128 and (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (
        0,
        1,
        2,
    )
    assert not again.has_chat_template
    text = "Question: What is (2 - 9) + 3?\nAnswer: -4"
    assert again.encode(text) == tok.encode(text) and again.decode(again.encode(text)) == text
