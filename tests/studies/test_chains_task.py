"""studies.tasks.chains: answers checked by an independent interpreter, seeded and disjoint splits,
the long-answer form's length, bad input."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lens.errors import InputError
from studies import tasks
from studies.tasks import chains
from studies.tiny_arith.tokenizer import build_tokenizer


def interpret(context: str) -> tuple[str, list[tuple[str, int]], list[tuple[str, int]]]:
    """(form, [(name, value) along the queried chain], [(name, value) of every statement up to the
    query]) from the text alone: its own parser and arithmetic."""
    *statements, query = context.split(";")
    env: dict[str, int] = {}
    source: dict[str, str | None] = {}
    for st in statements:
        name, expr = st.split("=")
        assert name not in env, f"{name} assigned twice in {context!r}"
        if expr.isdigit():
            env[name], source[name] = int(expr), None
        else:
            var, op, digit = expr[0], expr[1], int(expr[2:])
            assert var in env, f"{var} used before assignment in {context!r}"
            env[name], source[name] = (env[var] + (digit if op == "+" else -digit)) % 10, var
    if query.startswith("trace "):
        form, target = "trace", query.removeprefix("trace ").removesuffix(":")
    else:
        form, target = "answer", query.removesuffix("=?")
    chain = [target]
    while source[chain[-1]] is not None:
        chain.append(source[chain[-1]])  # type: ignore[arg-type]
    order = list(env)
    return (
        form,
        [(n, env[n]) for n in reversed(chain)],
        [(n, env[n]) for n in order[: order.index(target) + 1]],
    )


@pytest.mark.parametrize("task", chains.TASKS)
def test_answers_match_an_independent_interpreter(task: str) -> None:
    hops, form = chains.parse_task(task)
    for p in chains.sample(task, 150, split="test", seed=3):
        got_form, chain, executed = interpret(p.context)
        assert got_form == form == p.form and p.hops == hops == len(chain) - 1
        assert list(p.names) == [n for n, _ in chain] and list(p.values) == [v for _, v in chain]
        if form == "answer":
            assert p.completion == f" {chain[-1][1]}"
        else:
            assert p.completion == " " + ";".join(f"{n}={v}" for n, v in executed)
            assert p.completion.endswith(f"{chain[-1][0]}={chain[-1][1]}")
        assert p.intermediate == ",".join(str(v) for _, v in chain[:-1])
        assert chains.parse_problem(task, p.context, p.completion) == p


def test_format_and_distractors() -> None:
    p = chains.chain_problem([("k", 3), ("x", 7), ("q", "k", "+", 4), ("w", "q", "-", 1), ("m", "q", "-", 5)])
    assert (p.context, p.completion, p.task) == ("k=3;x=7;q=k+4;w=q-1;m=q-5;m=?", " 2", "chains_2hop")
    assert p.names == ("k", "q", "m") and p.values == (3, 7, 2) and p.intermediate == "3,7"
    assert chains.chain_problem([("a", 8), ("b", "a", "+", 4)]).completion == " 2"  # modulo 10
    assert chains.chain_problem([("a", 1), ("b", "a", "-", 4)]).completion == " 7"
    counts = Counter()
    for p in chains.sample("chains_4hop", 400, split="train", seed=0):
        statements = chains.parse_program(p.program)
        extra = len(statements) - (p.hops + 1)
        assert chains.DISTRACTORS[0] <= extra <= chains.DISTRACTORS[1]
        counts["derived distractor"] += sum(len(s) == 4 and s[0] not in p.names for s in statements)
        counts["chain not last"] += statements[-1][0] != p.names[-1]
        counts["chain not first"] += statements[0][0] != p.names[0]
        assert all(
            a != b for a, b in zip(p.values[:-1], p.values[1:], strict=True)
        )  # each hop changes the value
    assert min(counts.values()) > 50, counts  # distractors are interleaved and sometimes derived


def test_answers_are_uniform_digits_whatever_the_last_operation() -> None:
    problems = chains.sample("chains_3hop", 2000, split="train", seed=1)
    by_digit = Counter(p.answer for p in problems)
    assert set(by_digit) == set(range(10)) and min(by_digit.values()) > 150
    last_plus_nine = Counter(p.answer for p in problems if f"{p.names[-1]}={p.names[-2]}+9;" in p.program)
    assert len(last_plus_nine) == 10  # "+9" does not narrow the answer: arithmetic is modulo 10


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
    shares = Counter(chains.split_of(f"a={i % 10};b=a+{1 + i % 9};c={i};") for i in range(3000))
    assert 0.65 < shares["train"] / 3000 < 0.75 and 0.16 < shares["test"] / 3000 < 0.24


def test_long_answers_have_at_least_16_tokens_from_three_hops() -> None:
    tok = build_tokenizer()
    for hops in chains.HOPS:
        for p in chains.sample(f"chains_{hops}hop_trace", 20, split="test", seed=0):
            statements = p.completion.count("=")
            assert statements >= hops + 1 and len(tok.encode(p.completion)) == 4 * statements
            assert hops < 3 or len(tok.encode(p.completion)) >= 16
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
    with pytest.raises(InputError, match="0 hops"):
        chains.chain_problem([("a", 1)])
    rng = random.Random(0)
    with pytest.raises(InputError, match="hops must be"):
        chains.generate(rng, 0)
