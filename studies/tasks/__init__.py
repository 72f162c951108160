"""Tasks the studies run on: problem generators with held-out splits, and prompt templates.

Two families, each with the same interface (``TASKS``, ``sample(task, n, split, seed)``, problems
with ``task``, ``context``, ``completion`` and ``intermediate``): :mod:`studies.tasks.arithmetic`
(EleutherAI's arithmetic formats) and :mod:`studies.tasks.chains` (multi-hop variable chains).
:func:`sample` routes a task name to its family.

>>> family_of("arithmetic_1dc"), family_of("chains_4hop_trace")
('arithmetic', 'chains')
>>> sample("chains_2hop", 1, split="test")[0].hops
2
"""

from __future__ import annotations

from typing import Any

from lens.errors import InputError
from studies.tasks import arithmetic, chains

FAMILIES: dict[str, tuple[str, ...]] = {"arithmetic": arithmetic.TASKS, "chains": chains.TASKS}
"""Family name → its task names."""

_MODULES = {"arithmetic": arithmetic, "chains": chains}


def family_of(task: str) -> str:
    """The family a task name belongs to."""
    for family, tasks in FAMILIES.items():
        if task in tasks:
            return family
    raise InputError(
        f"unknown task {task!r}; tasks are {', '.join(t for ts in FAMILIES.values() for t in ts)}"
    )


def sample(task: str, n: int, split: str = "train", seed: int = 0) -> list[Any]:
    """``n`` distinct problems of ``task`` from ``split`` (the family's own ``sample``)."""
    return _MODULES[family_of(task)].sample(task, n, split=split, seed=seed)


def resolve_tasks(spec: str) -> tuple[str, ...]:
    """Task names from a family name (``chains``) or a comma-separated list of task names."""
    if spec in FAMILIES:
        return FAMILIES[spec]
    tasks = tuple(t.strip() for t in spec.split(",") if t.strip())
    if not tasks:
        raise InputError("no task given; name a family (arithmetic, chains) or tasks separated by commas")
    for t in tasks:
        family_of(t)
    return tasks
