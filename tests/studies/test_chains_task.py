"""studies.tasks.chains: answers checked by an independent interpreter, seeded and disjoint splits,
the long-answer form's length, bad input."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from lens.errors import InputError
from studies import tasks
from studies.tasks import chains
from studies.tiny_arith.tokenizer import build_tokenizer


def interpret(context: str) -> tuple[str, list[tuple[str, int]], str]:
    """(form, [(name, value) along the queried chain], the long answer) from the text alone: its own
    parser and arithmetic."""
    *statements, query = context.split(";")
    env: dict[str, int] = {}
    source: dict[str, str | None] = {}
    shown = []
    for st in statements:
        name, expr = st.split("=")
        assert name not in env, f"{name} assigned twice in {context!r}"
        if expr.isdigit():
            env[name], source[name] = int(expr), None
            shown.append(st)
        else:
            var, op, digit = expr[0], expr[1], int(expr[2:])
            assert var in env, f"{var} used before assignment in {context!r}"
            env[name], source[name] = (env[var] + (digit if op == "+" else -digit)) % 10, var
            shown.append(f"{name}={env[var]}{op}{digit}")
    if query.startswith("trace "):
        form, target = "trace", query.removeprefix("trace ").removesuffix(":")
    else:
        form, target = "answer", query.removesuffix("=?")
    chain = [target]
    while source[chain[-1]] is not None:
        chain.append(source[chain[-1]])  # type: ignore[arg-type]
    upto = list(env).index(target) + 1
    long = " " + ";".join(shown[:upto]) + (f"={env[target]}" if source[target] is not None else "")
    return form, [(n, env[n]) for n in reversed(chain)], long


@pytest.mark.parametrize("task", chains.TASKS)
def test_answers_match_an_independent_interpreter(task: str) -> None:
    hops, form = chains.parse_task(task)
    for p in chains.sample(task, 150, split="test", seed=3):
        got_form, chain, long = interpret(p.context)
        assert got_form == form == p.form and p.hops == hops == len(chain) - 1
        assert list(p.names) == [n for n, _ in chain] and list(p.values) == [v for _, v in chain]
        if form == "answer":
            assert p.completion == f" {chain[-1][1]}"
        else:
            assert p.completion == long and p.completion.endswith(f"{chain[-1][1]}")
        assert p.intermediate == ",".join(str(v) for _, v in chain[:-1])
        assert chains.parse_problem(task, p.context, p.completion) == p


def test_format_and_the_distractor_chain() -> None:
    p = chains.chain_problem([("k", 3), ("x", 7), ("q", "k", "+", 2), ("y", "x", "-", 1)], query="y")
    assert (p.context, p.completion, p.task) == ("k=3;x=7;q=k+2;y=x-1;y=?", " 6", "chains_1hop")
    assert p.names == ("x", "y") and p.values == (7, 6) and p.intermediate == "7"
    assert chains.chain_problem([("a", 8), ("b", "a", "+", 3)]).completion == " 1"  # modulo 10
    assert chains.chain_problem([("a", 1), ("b", "a", "-", 3)]).completion == " 8"
    for p in chains.sample("chains_4hop", 400, split="train", seed=0):
        statements = chains.parse_program(p.program)
        assert len(statements) == 2 * (p.hops + 1)  # the queried chain and a distractor chain as long
        assert all(len(st) == 2 for st in statements[:2]) and all(len(st) == 4 for st in statements[2:])
        assert all(st[1] == statements[i - 2][0] for i, st in enumerate(statements) if i >= 2)  # two back
        assert len({st[0] for st in statements}) == len(statements)
        assert statements[-2][0] == p.names[-1] and statements[0][0] == p.names[0]  # the first chain
        assert all(a != b for a, b in zip(p.values[:-1], p.values[1:], strict=True))  # each hop changes it


def test_answers_are_uniform_digits_whatever_the_last_operation() -> None:
    problems = chains.sample("chains_3hop", 2000, split="train", seed=1)
    by_digit = Counter(p.answer for p in problems)
    assert set(by_digit) == set(range(10)) and min(by_digit.values()) > 150
    last_plus_three = Counter(p.answer for p in problems if f"{p.names[-1]}={p.names[-2]}+3;" in p.program)
    assert len(last_plus_three) == 10  # "+3" does not narrow the answer: arithmetic is modulo 10
    assert all(int(d) in chains.OPERANDS for p in problems for d in re.findall(r"[-+](\d)", p.program))


def test_splits_are_disjoint_seeded_and_shared_by_both_forms() -> None:
    seen = {}
    for split in chains.SPLITS:
        a = chains.sample("chains_2hop", 300, split=split, seed=7)
        assert a == chains.sample("chains_2hop", 300, split=split, seed=7)  # same arguments, same list
        assert a != chains.sample("chains_2hop", 300, split=split, seed=8)
        assert len({p.program for p in a}) == 300 and all(p.split == split for p in a)
        seen[split] = {p.program for p in a}
    assert not (seen["train"] & seen["test"]) and not (seen["train"] & seen["validation"])
    # the split is a function of the program alone: the long form of a held-out program is held out too
    for p in chains.sample("chains_2hop", 50, split="test", seed=7):
        statements = chains.parse_program(p.program)
        trace = chains.chain_problem(statements, "trace", p.names[-1])
        assert trace.split == "test" and trace.values == p.values
    shares = Counter(
        chains.split_of(f"a={i % 10};b={i // 10 % 10};c=a+{1 + i % 3};d=b-{i // 100};") for i in range(3000)
    )
    assert 0.65 < shares["train"] / 3000 < 0.75 and 0.16 < shares["test"] / 3000 < 0.24


def test_long_answers_have_at_least_16_tokens_from_one_hop() -> None:
    tok = build_tokenizer()
    for hops in chains.HOPS:
        for p in chains.sample(f"chains_{hops}hop_trace", 20, split="test", seed=0):
            assert p.completion.count(";") >= 2 * hops
            assert hops < 1 or len(tok.encode(p.completion)) >= 16
            assert tok.decode(tok.encode(p.context + p.completion)) == p.context + p.completion
    for p in chains.sample("chains_4hop", 20, split="test", seed=0):
        assert len(tok.encode(p.completion)) == 1  # the short answer is one digit token


def test_registry_routes_families() -> None:
    assert tasks.family_of("chains_6hop") == "chains" and tasks.family_of("arithmetic_2da") == "arithmetic"
    assert tasks.resolve_tasks("chains") == chains.TASKS
    assert tasks.resolve_tasks("chains_1hop, arithmetic_1dc") == ("chains_1hop", "arithmetic_1dc")
    assert tasks.sample("chains_3hop", 4, split="validation", seed=2) == chains.sample(
        "chains_3hop", 4, split="validation", seed=2
    )


def test_bad_input_is_one_clear_error() -> None:
    with pytest.raises(InputError, match="unknown chains task"):
        chains.sample("chains_7hop", 1)
    with pytest.raises(InputError, match="unknown task"):
        tasks.family_of("chains")
    with pytest.raises(InputError, match="unknown split"):
        chains.sample("chains_1hop", 1, split="dev")
    with pytest.raises(InputError, match="before it is assigned"):
        chains.chain_problem([("b", "a", "+", 1)])
    with pytest.raises(InputError, match="assigned twice"):
        chains.chain_problem([("a", 1), ("a", 2)])
    with pytest.raises(InputError, match="completion"):
        chains.parse_problem("chains_1hop", "a=1;b=a+1;b=?", " 3")
    with pytest.raises(InputError, match="not a chains_1hop_trace question"):
        chains.parse_problem("chains_1hop_trace", "a=1;b=a+1;b=?")
    with pytest.raises(InputError, match="7 hops"):
        chains.chain_problem([("a", 1)] + [(n, p, "+", 1) for p, n in zip("abcdefg", "bcdefgh", strict=True)])
    rng = random.Random(0)
    with pytest.raises(InputError, match="hops must be"):
        chains.generate(rng, 7)
