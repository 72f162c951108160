"""The EleutherAI "arithmetic" formats (GPT-3's arithmetic battery), generated reproducibly.

- ``arithmetic_1dc`` (one-digit composite): ``"Question: What is (6 - 5) * 3?\\nAnswer:"`` → ``" 3"``;
  three digits 0–9, operators among ``+ - *``, parentheses around the first two; the parenthesised
  result is the problem's ``intermediate`` (``"1"``), the target of the latent chain-of-thought
  probes. Answers may be negative or have two digits (``" -4"``, ``" 12"``), as in EleutherAI's data.
- ``arithmetic_{2,3,4,5}d{a,s}`` and ``arithmetic_2dm``: ``"Question: What is 98 plus 45?\\nAnswer:"``
  → ``" 143"``; operands uniform in ``[0, 10**d)``, ``plus`` / ``minus`` / ``times``; a difference
  may be negative (``" -53"``).

A problem's split is a function of its question text alone (a salted hash; the reference study's
filtered problems are pinned to ``test``), so the splits are disjoint by construction, whatever the
task, seed or sample size: a training run never sees a held-out problem.

>>> from studies.tasks import arithmetic
>>> p = arithmetic.composite(6, "-", 5, "*", 3)
>>> p.context, p.completion, p.intermediate
('Question: What is (6 - 5) * 3?\\nAnswer:', ' 3', '1')
>>> len(arithmetic.enumerate_all("arithmetic_1dc"))
9000
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache, lru_cache
from importlib import resources
from typing import Any

OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}
"""The operators of the one-digit composite task, in EleutherAI's notation."""

WORDS: dict[str, str] = {"plus": "+", "minus": "-", "times": "*"}
"""Operator words of the two-operand formats."""

BINARY: dict[str, tuple[int, str]] = {
    "arithmetic_2da": (2, "plus"),
    "arithmetic_2ds": (2, "minus"),
    "arithmetic_2dm": (2, "times"),
    "arithmetic_3da": (3, "plus"),
    "arithmetic_3ds": (3, "minus"),
    "arithmetic_4da": (4, "plus"),
    "arithmetic_4ds": (4, "minus"),
    "arithmetic_5da": (5, "plus"),
    "arithmetic_5ds": (5, "minus"),
}
"""Two-operand task → (digits per operand, operator word)."""

COMPOSITE = "arithmetic_1dc"
TASKS: tuple[str, ...] = (COMPOSITE, *BINARY)
"""Every task name, EleutherAI's spelling."""


def task_label(task: str) -> str:
    """A task name a reader understands: ``arithmetic_1dc`` → ``one-digit composite (a ∘ b) ∘ c``,
    ``arithmetic_2da`` → ``2-digit plus``; any other name is returned as it is.

    >>> task_label("arithmetic_1dc"), task_label("arithmetic_4ds"), task_label("mine")
    ('one-digit composite (a ∘ b) ∘ c', '4-digit minus', 'mine')
    """
    if task == COMPOSITE:
        return "one-digit composite (a ∘ b) ∘ c"
    if task in BINARY:
        digits, word = BINARY[task]
        return f"{digits}-digit {word}"
    return task


SPLITS: dict[str, tuple[int, int]] = {"train": (0, 70), "validation": (70, 80), "test": (80, 100)}
"""Split → half-open range of hash buckets out of 100 (70 / 10 / 20 %)."""

SPLIT_SALT = "looplens/arithmetic/split/v1"
REFERENCE_FILE = ("reference", "huginn-latent-cot", "filtered_arithmetic_dataset.json")
ENUMERABLE_LIMIT = 10_000  # problems; larger spaces are sampled, never listed

_COMPOSITE_RE = re.compile(r"Question: What is \((\d) ([-+*]) (\d)\) ([-+*]) (\d)\?\nAnswer:")
_BINARY_RE = re.compile(r"Question: What is (\d+) (plus|minus|times) (\d+)\?\nAnswer:")


@dataclass(frozen=True)
class Problem:
    """One problem: what the model reads, what it should write, and the numbers behind them.

    ``completion`` carries EleutherAI's leading space (``" 7"``); ``intermediate`` is the
    parenthesised result of a composite problem (``None`` for two-operand formats).
    """

    task: str
    context: str
    completion: str
    intermediate: str | None
    operands: tuple[int, ...]
    operators: tuple[str, ...]

    @property
    def answer(self) -> int:
        """The answer as a number."""
        return int(self.completion)

    @property
    def split(self) -> str:
        """The split this problem belongs to (see :func:`split_of`)."""
        return split_of(self.context)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready row (operands and operators as lists)."""
        row = asdict(self)
        row["operands"], row["operators"] = list(self.operands), list(self.operators)
        return row


# ---------------------------------------------------------------------- construction
def composite(a: int, op1: str, b: int, op2: str, c: int) -> Problem:
    """The one-digit composite problem ``(a op1 b) op2 c``."""
    for x in (a, b, c):
        if not 0 <= x <= 9:
            raise ValueError(f"one-digit composite operands are 0..9, got {x}")
    for op in (op1, op2):
        if op not in OPS:
            raise ValueError(f"unknown operator {op!r}; operators are {' '.join(OPS)}")
    inner = OPS[op1](a, b)
    answer = OPS[op2](inner, c)
    context = f"Question: What is ({a} {op1} {b}) {op2} {c}?\nAnswer:"
    return Problem(COMPOSITE, context, f" {answer}", str(inner), (a, b, c), (op1, op2))


def binary(task: str, a: int, b: int) -> Problem:
    """The two-operand problem ``a <word> b`` of ``task`` (e.g. ``arithmetic_2ds``: ``a minus b``)."""
    if task not in BINARY:
        raise ValueError(f"{task!r} is not a two-operand task; those are {', '.join(BINARY)}")
    digits, word = BINARY[task]
    for x in (a, b):
        if not 0 <= x < 10**digits:
            raise ValueError(f"{task} operands are in [0, {10**digits}), got {x}")
    op = WORDS[word]
    context = f"Question: What is {a} {word} {b}?\nAnswer:"
    return Problem(task, context, f" {OPS[op](a, b)}", None, (a, b), (op,))


def parse_problem(task: str, context: str, completion: str | None = None) -> Problem:
    """Rebuild a :class:`Problem` from its text; checks ``completion`` against the arithmetic."""
    if task == COMPOSITE:
        m = _COMPOSITE_RE.fullmatch(context)
        if m is None:
            raise ValueError(f"not a one-digit composite question: {context!r}")
        problem = composite(int(m[1]), m[2], int(m[3]), m[4], int(m[5]))
    elif task in BINARY:
        m = _BINARY_RE.fullmatch(context)
        if m is None or m[2] != BINARY[task][1]:
            raise ValueError(f"not an {task} question: {context!r}")
        problem = binary(task, int(m[1]), int(m[3]))
    else:
        raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
    if completion is not None and completion != problem.completion:
        raise ValueError(f"{context!r}: completion {completion!r} != computed {problem.completion!r}")
    return problem


# ---------------------------------------------------------------------- splits
def split_of(context: str) -> str:
    """The split of a problem, from its question text alone (so identical texts share a split).

    A salted SHA-256 bucket out of 100 decides (:data:`SPLITS`); the reference study's filtered
    problems are always ``test``, so a model trained here can be compared with Huginn on exactly
    those problems without having seen them.
    """
    if context in _reference_contexts():
        return "test"
    digest = hashlib.sha256(f"{SPLIT_SALT}\x00{context}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    for name, (lo, hi) in SPLITS.items():
        if lo <= bucket < hi:
            return name
    raise AssertionError(bucket)  # pragma: no cover - the ranges cover 0..99


def space_size(task: str) -> int:
    """How many distinct problems ``task`` has."""
    _check_task(task)
    if task == COMPOSITE:
        return 10**3 * len(OPS) ** 2
    return 10 ** (2 * BINARY[task][0])


@cache
def enumerate_all(task: str = COMPOSITE, split: str | None = None) -> tuple[Problem, ...]:
    """Every problem of a small task (``arithmetic_1dc``: 9,000; two-digit formats: 10,000), in a
    fixed order, optionally only those of ``split``."""
    _check_task(task)
    _check_split(split)
    if space_size(task) > ENUMERABLE_LIMIT:
        raise ValueError(f"{task} has {space_size(task):,} problems, too many to enumerate; use sample()")
    if task == COMPOSITE:
        problems = (
            composite(a, o1, b, o2, c)
            for a, o1, b, o2, c in itertools.product(range(10), OPS, range(10), OPS, range(10))
        )
    else:
        size = 10 ** BINARY[task][0]
        problems = (binary(task, a, b) for a in range(size) for b in range(size))
    return tuple(p for p in problems if split is None or split_of(p.context) == split)


def sample(
    task: str, n: int, split: str = "train", seed: int = 0, single_digit: bool = False
) -> list[Problem]:
    """``n`` distinct problems of ``task`` from ``split``; the same arguments give the same list.

    Small tasks are drawn without replacement from :func:`enumerate_all`; larger ones uniformly
    over the operands, keeping those of ``split``. ``single_digit`` (composite only) keeps problems
    whose answer and intermediate are single non-negative digits, as in the reference study's
    filtered set.
    """
    _check_task(task)
    _check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if single_digit and task != COMPOSITE:
        raise ValueError("single_digit applies to arithmetic_1dc only")
    rng = random.Random(_seed(task, split, seed, single_digit))
    if space_size(task) <= ENUMERABLE_LIMIT:
        pool = enumerate_all(task, split)
        if single_digit:
            pool = tuple(p for p in pool if _is_single_digit(p))
        if n > len(pool):
            raise ValueError(f"{task} has only {len(pool)} problems in the {split!r} split, asked for {n}")
        return rng.sample(pool, n)
    if n > space_size(task) // 10:
        raise ValueError(
            f"asked for {n} distinct {task} problems; at most {space_size(task) // 10} are sampled"
        )
    digits = BINARY[task][0]
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < n:
        p = binary(task, rng.randrange(10**digits), rng.randrange(10**digits))
        if p.context not in seen and split_of(p.context) == split:
            seen.add(p.context)
            out.append(p)
    return out


# ---------------------------------------------------------------------- the reference study's problems
def reference_path() -> Any:
    """Where the packaged copy of the reference study's filtered set lives (a Traversable)."""
    return resources.files("studies").joinpath(*REFERENCE_FILE)


@lru_cache(maxsize=1)
def _reference_rows() -> tuple[dict[str, str], ...]:
    return tuple(json.loads(reference_path().read_text(encoding="utf-8")))


@lru_cache(maxsize=1)
def _reference_contexts() -> frozenset[str]:
    return frozenset(row["context"] for row in _reference_rows())


def load_reference_problems() -> list[Problem]:
    """The reference study's 71 filtered one-digit composite problems, in its order.

    The first 4 rows are its few-shot examples; the rest are the problems Huginn-3.5B answered
    correctly. Each row is checked against our generator (context, completion and intermediate).
    """
    problems = []
    for row in _reference_rows():
        p = parse_problem(COMPOSITE, row["context"], row["completion"])
        if "intermediate" in row and row["intermediate"] != p.intermediate:
            raise ValueError(
                f"{row['context']!r}: intermediate {row['intermediate']!r} != {p.intermediate!r}"
            )
        problems.append(p)
    return problems


# ---------------------------------------------------------------------- helpers
def _seed(task: str, split: str, seed: int, single_digit: bool) -> int:
    key = f"{task}/{split}/{seed}/{int(single_digit)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def _is_single_digit(p: Problem) -> bool:
    return (
        len(p.completion.strip()) == 1
        and p.completion.strip().isdigit()
        and p.intermediate is not None
        and len(p.intermediate) == 1
        and p.intermediate.isdigit()
    )


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
