"""Multi-hop variable chains: a task whose answer takes one latent step per hop, and a long-answer form.

A problem is a short program of single-letter assignments made of two interleaved chains, each a
constant followed by ``hops`` assignments that each use the previous variable of their chain; the
question asks for the last value of the chain that starts first (the other one is the distractor)::

    chains_3hop:        "k=3;x=7;q=k+2;y=x-1;m=q-1;w=y+3;z=m+3;v=w-2;z=?"   →  " 7"
    chains_3hop_trace:  "k=3;x=7;q=k+2;y=x-1;m=q-1;w=y+3;z=m+3;v=w-2;trace z:"
                        →  " k=3;x=7;q=3+2;y=7-1;m=5-1;w=6+3;z=4+3=7"

- Every value is a digit and every operation is ``+ d`` or ``- d`` (d = 1, 2 or 3) **modulo 10**, so
  each hop is a permutation of the digits: nothing but following the chain tells the answer (every
  digit is equally likely given everything but the chain's constant), and consecutive values differ.
  Small operands keep a value near its source's, which is what lets a small model start learning.
- The chains alternate statement by statement, so each assignment's source is the statement two
  before it, and the queried variable is always assigned second to last: fixed distances, as the
  operands of the arithmetic formats sit at fixed places. The names are consistent but never needed:
  with sources at random distances (or a question naming either chain), which only a match of names
  finds, the 2 MB model did not learn even to look a constant up by its name within the CPU budget
  (see the tiny-chains card). The distractor chain looks exactly like the queried one, so a model
  that computes every assignment computes both.
- The long-answer form (``_trace``) writes the program out again with every variable replaced by
  its value, up to the queried assignment, and ends with that assignment's value: an explicit chain
  of thought whose items line up with the statements (at least 16 tokens from one hop).
- A problem's split is a salted hash of its program (the statements without the question), so the
  short and the long form of one program always share a split, whatever the task, seed or sample
  size: a model trained on the ``train`` split never saw a held-out program in either form.

>>> p = chain_problem([("k", 3), ("x", 7), ("q", "k", "+", 2), ("y", "x", "-", 1)], "answer", "q")
>>> p.context, p.completion, p.values
('k=3;x=7;q=k+2;y=x-1;q=?', ' 5', (3, 5))
>>> trace = chain_problem([("k", 3), ("x", 7), ("q", "k", "+", 2), ("y", "x", "-", 1)], "trace", "y")
>>> trace.context, trace.completion, trace.names
('k=3;x=7;q=k+2;y=x-1;trace y:', ' k=3;x=7;q=3+2;y=7-1=6', ('x', 'y'))
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from lens.errors import InputError

HOPS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
"""The difficulty knob: the number of dependent assignments from the constant to the queried variable
(0: the queried variable is a constant, a plain lookup)."""

FORMS: tuple[str, ...] = ("answer", "trace")
"""``answer``: the final value (one token); ``trace``: every value of the program up to the query."""

ANSWER_TASKS: tuple[str, ...] = tuple(f"chains_{h}hop" for h in HOPS)
TRACE_TASKS: tuple[str, ...] = tuple(f"chains_{h}hop_trace" for h in HOPS)
TASKS: tuple[str, ...] = ANSWER_TASKS + TRACE_TASKS
"""Every task name: ``chains_{hops}hop`` (short answer) and ``chains_{hops}hop_trace`` (long answer)."""

MODULUS = 10
OPERANDS: tuple[int, ...] = (1, 2, 3)
"""The digits an assignment adds or subtracts: small, so a value stays near its source's value
(what lets a model learn to look the source up before it has learned the whole sum)."""
SPLITS: dict[str, tuple[int, int]] = {"train": (0, 70), "validation": (70, 80), "test": (80, 100)}
"""Split → half-open range of hash buckets out of 100 (70 / 10 / 20 %), as for arithmetic."""

SPLIT_SALT = "looplens/chains/split/v1"
NAMES = string.ascii_lowercase

_TASK_RE = re.compile(r"chains_([0-9]+)hop(_trace)?")
_STATEMENT_RE = re.compile(r"([a-z])=(?:([0-9])|([a-z])([-+])([0-9]))")

Form = Literal["answer", "trace"]
Statement = tuple[str, int] | tuple[str, str, str, int]
"""``(name, constant)`` or ``(name, source, "+" | "-", operand)``."""


@dataclass(frozen=True)
class Problem:
    """One chain problem: what the model reads and writes, and every value behind it.

    ``names`` and ``values`` follow the chain from its constant (``values[0]``) to the queried
    variable (``values[-1]``, the answer); ``intermediate`` holds the values before the answer as
    text (``"3,7,2"``), the column the answers and prompts tables keep; ``program`` is the
    statements alone (what the split is a function of).
    """

    task: str
    context: str
    completion: str
    intermediate: str | None
    hops: int
    form: str
    program: str
    names: tuple[str, ...]
    values: tuple[int, ...]

    @property
    def answer(self) -> int:
        """The queried variable's value."""
        return self.values[-1]

    @property
    def split(self) -> str:
        """The split this problem belongs to (see :func:`split_of`)."""
        return split_of(self.program)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready row."""
        row = asdict(self)
        row["names"], row["values"] = list(self.names), list(self.values)
        return row


# ---------------------------------------------------------------------- construction
def task_name(hops: int, form: Form = "answer") -> str:
    """``chains_4hop`` or ``chains_4hop_trace``."""
    return f"chains_{hops}hop" + ("_trace" if form == "trace" else "")


def parse_task(task: str) -> tuple[int, Form]:
    """``(hops, form)`` of a task name."""
    m = _TASK_RE.fullmatch(task)
    if m is None or int(m[1]) not in HOPS:
        raise InputError(f"unknown chains task {task!r}; tasks are {', '.join(TASKS)}")
    return int(m[1]), ("trace" if m[2] else "answer")


def render_statement(statement: Statement) -> str:
    if len(statement) == 2:
        return f"{statement[0]}={statement[1]}"
    name, source, op, operand = statement
    return f"{name}={source}{op}{operand}"


def substituted(statement: Statement, values: dict[str, int]) -> str:
    """``q=k+2`` with ``k``'s value written in: ``q=3+2`` (a constant stays as it is)."""
    if len(statement) == 2:
        return render_statement(statement)
    name, source, op, operand = statement
    return f"{name}={values[source]}{op}{operand}"


def evaluate_program(statements: Sequence[Statement]) -> dict[str, int]:
    """Every variable's value (mod 10); an undefined or redefined variable is an error."""
    values: dict[str, int] = {}
    for st in statements:
        name = st[0]
        if name in values:
            raise InputError(f"variable {name!r} is assigned twice")
        if len(st) == 2:
            value = int(st[1])
        else:
            _, source, op, operand = st
            if source not in values:
                raise InputError(f"{render_statement(st)!r} uses {source!r} before it is assigned")
            value = values[source] + operand if op == "+" else values[source] - operand
        if not 0 <= int(st[-1]) <= 9:
            raise InputError(f"{render_statement(st)!r}: numbers are single digits")
        values[name] = value % MODULUS
    return values


def chain_of(statements: Sequence[Statement], query: str) -> list[str]:
    """The names from the query's constant to the query, following each assignment's source."""
    by_name = {st[0]: st for st in statements}
    if query not in by_name:
        raise InputError(f"the queried variable {query!r} is not assigned")
    chain = [query]
    while len(by_name[chain[-1]]) == 4:
        chain.append(by_name[chain[-1]][1])  # type: ignore[misc]
    return chain[::-1]


def chain_problem(
    statements: Sequence[Statement], form: Form = "answer", query: str | None = None
) -> Problem:
    """The problem asking for ``query`` (default: the variable of the last statement) of a program."""
    if form not in FORMS:
        raise InputError(f"unknown form {form!r}; forms are {', '.join(FORMS)}")
    values = evaluate_program(statements)
    query = query if query is not None else statements[-1][0]
    names = chain_of(statements, query)
    hops = len(names) - 1
    if hops not in HOPS:
        raise InputError(f"the chain to {query!r} has {hops} hops; tasks have {HOPS[0]}..{HOPS[-1]}")
    program = "".join(render_statement(st) + ";" for st in statements)
    chain_values = tuple(values[n] for n in names)
    if form == "answer":
        context, completion = f"{program}{query}=?", f" {chain_values[-1]}"
    else:
        context = f"{program}trace {query}:"
        order = [st[0] for st in statements]
        items = [substituted(st, values) for st in statements[: order.index(query) + 1]]
        completion = " " + ";".join(items) + (f"={chain_values[-1]}" if hops else "")
    intermediate = ",".join(str(v) for v in chain_values[:-1])
    return Problem(
        task_name(hops, form),
        context,
        completion,
        intermediate,
        hops,
        form,
        program,
        tuple(names),
        chain_values,
    )


def random_program(rng: random.Random, hops: int) -> tuple[list[Statement], str]:
    """Two interleaved chains of ``hops`` hops with distinct random names; returns the statements and
    the last variable of the chain that starts first (assigned second to last)."""
    names = rng.sample(NAMES, 2 * (hops + 1))
    chains_ = [names[: hops + 1], names[hops + 1 :]]
    out: list[Statement] = [(chains_[0][0], rng.randrange(MODULUS)), (chains_[1][0], rng.randrange(MODULUS))]
    for k in range(1, hops + 1):
        for chain in chains_:
            out.append((chain[k], chain[k - 1], rng.choice("+-"), rng.choice(OPERANDS)))
    return out, chains_[0][-1]


def generate(rng: random.Random, hops: int, form: Form = "answer") -> Problem:
    """One random problem of ``hops`` hops in ``form``."""
    if hops not in HOPS:
        raise InputError(f"hops must be in {HOPS[0]}..{HOPS[-1]}, got {hops}")
    statements, query = random_program(rng, hops)
    return chain_problem(statements, form, query)


def parse_program(program: str) -> list[Statement]:
    """Statements back from a program's text (``"k=3;q=k+4;"``)."""
    statements: list[Statement] = []
    for piece in program.rstrip(";").split(";"):
        m = _STATEMENT_RE.fullmatch(piece)
        if m is None:
            raise InputError(f"not an assignment: {piece!r} in {program!r}")
        if m[2] is not None:
            statements.append((m[1], int(m[2])))
        else:
            statements.append((m[1], m[3], m[4], int(m[5])))
    return statements


def parse_problem(task: str, context: str, completion: str | None = None) -> Problem:
    """Rebuild a :class:`Problem` from its text; checks ``completion`` against the program."""
    _, form = parse_task(task)
    if form == "answer":
        m = re.fullmatch(r"((?:[^;]+;)+)([a-z])=\?", context)
    else:
        m = re.fullmatch(r"((?:[^;]+;)+)trace ([a-z]):", context)
    if m is None:
        raise InputError(f"not a {task} question: {context!r}")
    problem = chain_problem(parse_program(m[1]), form, m[2])
    if problem.task != task:
        raise InputError(f"{context!r} is a {problem.task} question, not {task}")
    if completion is not None and completion != problem.completion:
        raise InputError(f"{context!r}: completion {completion!r} != computed {problem.completion!r}")
    return problem


# ---------------------------------------------------------------------- splits and sampling
def split_of(program: str) -> str:
    """The split of a program (its statements' text), by a salted SHA-256 bucket out of 100."""
    digest = hashlib.sha256(f"{SPLIT_SALT}\x00{program}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    for name, (lo, hi) in SPLITS.items():
        if lo <= bucket < hi:
            return name
    raise AssertionError(bucket)  # pragma: no cover - the ranges cover 0..99


def sample(
    task: str, n: int, split: str = "train", seed: int = 0, distinct_values: bool = False
) -> list[Problem]:
    """``n`` distinct problems of ``task`` from ``split``; the same arguments give the same list.

    ``distinct_values`` keeps problems whose chain values are pairwise distinct, so that each value's
    digit stands for one hop (what the chains study probes).
    """
    hops, form = parse_task(task)
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    if n < 0:
        raise InputError(f"n must be >= 0, got {n}")
    key = f"{task}/{split}/{seed}".encode()
    rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < n:
        p = generate(rng, hops, form)
        if distinct_values and len(set(p.values)) < len(p.values):
            continue
        if p.program not in seen and p.split == split:
            seen.add(p.program)
            out.append(p)
    return out
