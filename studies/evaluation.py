"""Exact-match accuracy of greedy answers, per task format and number of recurrent iterations.

``looplens eval`` evaluates a model on its own task family (tiny-arith: the arithmetic formats,
tiny-chains: the variable chains by hops and form), writes the answers as a run with the
depth-scaling figure and, with ``--card``, regenerates the accuracy table of the embedded model's
card (between its table markers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

import lens
from lens.errors import InputError
from lens.generation import generate
from lens.model import RecurrentDepthLM
from lens.runtime import configure_threads
from probes.records import records
from studies import tasks as task_registry
from studies.tasks import arithmetic, chains
from studies.tasks.prompts import PromptTemplate, resolve_template

CARD_BEGIN = "<!-- accuracy-table:begin -->"
CARD_END = "<!-- accuracy-table:end -->"


def _answer_text(text: str) -> str:
    """The answer as written: up to the first newline, end-of-turn or end-of-text (never shown)."""
    for stop in ("\n", "<|end_turn|>", "<|end_text|>"):
        text = text.split(stop)[0]
    return text


@torch.no_grad()
def evaluate_answers(
    model: RecurrentDepthLM,
    problems: Sequence[Any],
    prompt_ids_tokens: Sequence[Sequence[int]],
    num_steps: int,
    seed: int = 0,
    prompt_ids: Iterable[int] | None = None,
    texts: Sequence[str] | None = None,
    task: str | None = None,
    purpose: str = "eval",
) -> pd.DataFrame:
    """Greedy answers for already-tokenised prompts; one ``answers`` row per problem (checked against
    the schema here). ``purpose`` (``probe``, ``depth`` or ``eval``) says why they were generated."""
    tok = model.tokenizer
    budget = max(len(tok.encode(p.completion)) for p in problems) + 2
    gen = torch.Generator(device=model.device).manual_seed(seed)
    res = generate(
        model, [list(p) for p in prompt_ids_tokens], budget, num_steps, generator=gen, stop_strings=["\n"]
    )
    rows = []
    ids = list(prompt_ids) if prompt_ids is not None else list(range(len(problems)))
    for i, p in enumerate(problems):
        generated = _answer_text(tok.decode(res.tokens[i]))
        rows.append(
            {
                "prompt_id": ids[i],
                "task": task or p.task,
                "purpose": purpose,
                "num_steps": num_steps,
                "prompt": texts[i] if texts is not None else tok.decode(list(prompt_ids_tokens[i])),
                "expected": p.completion,
                "generated": generated,
                "correct": generated.strip() == p.completion.strip(),
                "first_token_id": res.tokens[i][0] if res.tokens[i] else -1,
                "intermediate": p.intermediate,
            }
        )
    return records("answers", rows)


FAMILY_OF_MODEL: dict[str, str] = {"tiny-arith": "arithmetic", "tiny-chains": "chains"}
"""Task family a model is evaluated on, by its config name; other models get ``arithmetic``."""

CARD_TASKS: dict[str, tuple[str, ...]] = {
    "arithmetic": arithmetic.TASKS,
    "chains": tuple(f"chains_{h}hop" for h in chains.HOPS)
    + tuple(f"chains_{h}hop_trace" for h in (1, 2, 3, 4)),
}
"""The rows of each family's card: every arithmetic format; chains of 0–6 hops with a short answer,
and the long answer from one to four hops (longer traces run to 100+ tokens)."""

DEFAULT_N: dict[str, int] = {"arithmetic": 400, "chains": 300}
"""Problems per task when ``n`` is not given (``arithmetic_1dc`` then uses its whole test split)."""


def default_tasks(model: RecurrentDepthLM) -> tuple[str, ...]:
    """The tasks of the model's own family (its card's rows)."""
    return CARD_TASKS[FAMILY_OF_MODEL.get(model.config.name, "arithmetic")]


def problem_counts(tasks: Sequence[str], n: int | None) -> dict[str, int | None]:
    """Problems per task: ``n`` for every task when given; else the family's :data:`DEFAULT_N`, and
    ``None`` (the whole held-out split, 1,870 problems) for one-digit composite, as the tiny-arith card
    measures it."""
    if n is not None and n < 1:
        raise InputError(f"--n must be >= 1, got {n}")
    return {
        t: n
        if n is not None
        else None
        if t == arithmetic.COMPOSITE
        else DEFAULT_N[task_registry.family_of(t)]
        for t in tasks
    }


def task_problems(task: str, count: int | None, split: str = "test", seed: int = 0) -> list[Any]:
    """``count`` held-out problems of ``task`` (``None``: every problem of the split, small tasks only)."""
    if count is None:
        return list(arithmetic.enumerate_all(task, split))
    return task_registry.sample(task, count, split=split, seed=seed)


def answer_budget(tokenizer: Any, problems: Sequence[Any]) -> int:
    """New tokens to generate: the longest expected answer and two more (so a longer answer shows)."""
    return max(len(tokenizer.encode(p.completion)) for p in problems) + 2


def evaluate_tasks(
    model: RecurrentDepthLM,
    tasks: Sequence[str],
    num_steps: int,
    n: int | None,
    seed: int = 0,
    template: PromptTemplate | None = None,
    batch_size: int = 64,
    split: str = "test",
    id_offset: int = 0,
    counts: Mapping[str, int | None] | None = None,
    progress: Callable[[int], None] | None = None,
    purpose: str = "eval",
) -> pd.DataFrame:
    """Answers for ``n`` held-out problems of each task at one depth (``counts`` overrides ``n`` per
    task; a count of ``None`` takes the whole split). ``progress`` is called with each batch's work
    (prompt and answer tokens × blocks run), the unit of :func:`work_units`."""
    template = template or resolve_template(None, model.tokenizer)
    frames = []
    for t, task in enumerate(tasks):
        count = counts[task] if counts is not None and task in counts else n
        problems = task_problems(task, count, split, seed)
        texts = [template.render(p.context, model.tokenizer) for p in problems]
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            ids = [model.tokenizer.encode(x) for x in texts[start : start + batch_size]]
            frames.append(
                evaluate_answers(
                    model,
                    chunk,
                    ids,
                    num_steps,
                    seed=seed + start,
                    prompt_ids=range(
                        id_offset + t * 100_000 + start, id_offset + t * 100_000 + start + len(chunk)
                    ),
                    texts=texts[start : start + batch_size],
                    task=task,
                    purpose=purpose,
                )
            )
            if progress is not None:
                progress(sum(_work(model, x, p, num_steps) for x, p in zip(ids, chunk, strict=True)))
    return pd.concat(frames, ignore_index=True)


def _work(model: RecurrentDepthLM, prompt_ids: Sequence[int], problem: Any, num_steps: int) -> int:
    """One problem's work: its prompt and expected answer tokens × the blocks each token runs through."""
    tokens = len(prompt_ids) + len(model.tokenizer.encode(problem.completion)) + 1
    return tokens * (model.layout.prelude + num_steps * model.layout.core + model.layout.coda)


def work_units(
    model: RecurrentDepthLM,
    tasks: Sequence[str],
    depths: Sequence[int],
    counts: Mapping[str, int | None],
    template: PromptTemplate,
    seed: int = 0,
    split: str = "test",
) -> dict[tuple[int, str], int]:
    """Work per (depth, task) in :func:`evaluate_tasks`'s progress unit, so a progress bar's rate and
    time left hold across depths (a T=64 problem costs about 30 times a T=1 problem)."""
    out = {}
    for task in tasks:
        problems = task_problems(task, counts[task], split, seed)
        ids = [model.tokenizer.encode(template.render(p.context, model.tokenizer)) for p in problems]
        for depth in depths:
            out[(depth, task)] = sum(_work(model, x, p, depth) for x, p in zip(ids, problems, strict=True))
    return out


def accuracy_table(answers: pd.DataFrame) -> pd.DataFrame:
    """Rows task × num_steps with n, correct and accuracy."""
    grouped = answers.groupby(["task", "num_steps"])["correct"]
    out = grouped.agg(n="size", correct="sum").reset_index()
    out["accuracy"] = out["correct"] / out["n"]
    return out


def markdown_table(acc: pd.DataFrame, order: Sequence[str] | None = None) -> str:
    """Accuracy (%) as a Markdown table: tasks as rows (in ``order``, else sorted), iterations as columns."""
    wide = acc.pivot(index="task", columns="num_steps", values="accuracy")
    wide = wide.reindex([t for t in order if t in wide.index]) if order is not None else wide.sort_index()
    counts = acc.groupby("task")["n"].max()
    head = "| task | n | " + " | ".join(f"T={c}" for c in wide.columns) + " |"
    rule = "|---|---:|" + "---:|" * len(wide.columns)
    lines = [head, rule]
    for task, row in wide.iterrows():
        cells = " | ".join(f"{100 * v:.1f}" for v in row.values)
        lines.append(f"| {task} | {int(counts[task])} | {cells} |")
    return "\n".join(lines)


def write_card_table(card: Path, table_md: str) -> None:
    text = card.read_text()
    if CARD_BEGIN not in text or CARD_END not in text:
        raise InputError(f"{card} has no accuracy-table markers")
    before, rest = text.split(CARD_BEGIN, 1)
    _, after = rest.split(CARD_END, 1)
    card.write_text(f"{before}{CARD_BEGIN}\n{table_md}\n{CARD_END}{after}")


def card_accuracy(model_name: str | Path, task: str, num_steps: int) -> tuple[float, int] | None:
    """``(accuracy, n)`` of ``task`` at ``num_steps`` from a model card's accuracy table (the one
    ``write_card_table`` writes), or None when the model has no card, no table or no such cell."""
    try:
        card = lens.loading.resolve_model_path(model_name) / "README.md"
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if CARD_BEGIN not in text or CARD_END not in text:
        return None
    lines = [
        line.strip().strip("|").split("|")
        for line in text.split(CARD_BEGIN, 1)[1].split(CARD_END, 1)[0].strip().splitlines()
    ]
    if len(lines) < 3:
        return None
    head = [cell.strip() for cell in lines[0]]
    column = f"T={num_steps}"
    if column not in head or "task" not in head or "n" not in head:
        return None
    for row in lines[2:]:
        cells = [cell.strip() for cell in row]
        if len(cells) == len(head) and cells[head.index("task")] == task:
            try:
                return float(cells[head.index(column)]) / 100, int(cells[head.index("n")])
            except ValueError:
                return None
    return None


def default_depths(mean_recurrence: int) -> list[int]:
    """Powers of two up to four times the model's default depth, and the default depth itself
    (tiny-arith, default 16: 1 … 64; tiny-chains, default 8: 1 … 32)."""
    top = 4 * mean_recurrence
    return sorted({2**k for k in range(top.bit_length()) if 2**k <= top} | {mean_recurrence, top})


def run_evaluation(
    model_name: str,
    depths: Sequence[int] | None = None,
    n: int | None = None,
    out: Path = Path("runs"),
    seed: int = 0,
    card: bool = False,
    console: Console | None = None,
    tasks: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Evaluate every task at every depth, write a run with answers + figure, optionally the card table.

    ``tasks`` defaults to the model's family (:func:`default_tasks`); ``n`` problems per task, or the
    card's counts when ``None`` (:func:`problem_counts`). Each (depth, task) is one shard: an
    interrupted evaluation resumes where it stopped and says so.
    """
    from probes.store import Run
    from studies.figures import FIGURES, Layout, render_figure

    console = console or Console()
    model = lens.load_model(model_name)
    configure_threads(model.num_parameters())
    depths = list(depths) if depths else default_depths(model.config.mean_recurrence)
    if any(d < 1 for d in depths):
        raise InputError(f"depths must be >= 1, got {list(depths)}")
    tasks = list(tasks) if tasks else list(default_tasks(model))
    for task in tasks:
        task_registry.family_of(task)
    counts = problem_counts(tasks, n)
    template = resolve_template(None, model.tokenizer)
    settings = {
        "depths": list(depths),
        "n": n,
        "counts": {t: c for t, c in counts.items()},
        "seed": seed,
        "tasks": tasks,
    }
    run = Run.create(
        out,
        f"eval-{Path(str(model_name)).name}-n{n if n is not None else 'card'}-s{seed}",
        {
            "model": {
                "name": str(model_name),
                "weights": lens.loading.weights_fingerprint(model_name),
                "layout": model.layout.to_dict(),
            },
            "settings": settings,
            "prompt_template": template.to_dict(),
        },
    )
    with run:  # an error from here on marks the run failed, with the reason, before it propagates
        work = work_units(model, tasks, depths, counts, template, seed)
        sizes = {t: len(task_problems(t, c, "test", seed)) if c is None else c for t, c in counts.items()}
        answers = sum(sizes.values()) * len(depths)
        console.print(
            f"[bold]eval {model_name}[/]: {len(tasks)} tasks × {len(depths)} depths "
            f"(T = {', '.join(map(str, depths))}) × {_count_text(sizes)} problems = {answers:,} greedy answers "
            f"on the held-out test split → {run.path}",
            soft_wrap=True,
        )
        done = [(d, t) for d in depths for t in tasks if run.has_shard("answers", _shard(d, t))]
        if done:
            console.print(
                f"resuming: {len(done)} of {len(work)} (depth, task) parts already done "
                f"({sum(work[k] for k in done) / sum(work.values()):.0%} of the work), computing the rest",
                soft_wrap=True,
            )
        with tqdm(
            total=sum(work.values()),
            initial=sum(work[k] for k in done),
            desc="eval",
            unit=" token-blocks",
            unit_scale=True,
            bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}] {postfix}",
        ) as bar:
            for depth in depths:
                for t, task in enumerate(tasks):
                    if run.has_shard("answers", _shard(depth, task)):
                        continue
                    bar.set_postfix_str(f"T={depth} {task}")
                    frame = evaluate_tasks(
                        model,
                        [task],
                        depth,
                        n,
                        seed=seed,
                        template=template,
                        counts=counts,
                        id_offset=t * 100_000,
                        progress=bar.update,
                    )
                    run.write_shard("answers", _shard(depth, task), frame.assign(run=run.name))
        acc = accuracy_table(run.table("answers"))
        layout = Layout(model.layout, steps=model.config.mean_recurrence)
        render_figure(
            FIGURES["depth_scaling"],
            {"depth": acc},
            layout,
            run.figures_dir,
            f"{model_name}: exact-match accuracy vs iterations",
        )
        run.mark_complete()
    table_md = markdown_table(acc, order=tasks)
    rich_table = Table(title=f"exact-match accuracy (%) of {model_name}")
    for col in table_md.splitlines()[0].strip("|").split("|"):
        rich_table.add_column(col.strip(), no_wrap=True)
    for line in table_md.splitlines()[2:]:
        rich_table.add_row(*[c.strip() for c in line.strip("|").split("|")])
    console.print(rich_table)
    if card:
        card_path = lens.loading.resolve_model_path(model_name) / "README.md"
        write_card_table(card_path, table_md)
        console.print(f"model card table rewritten: {card_path}")
    console.print(f"run: {run.path}")
    return acc


def _shard(depth: int, task: str) -> str:
    return f"T{depth:04d}-{task}"


def _count_text(sizes: Mapping[str, int]) -> str:
    values = sorted(set(sizes.values()))
    if len(values) == 1:
        return f"{values[0]:,}"
    return (
        " / ".join(f"{c:,}" for c in values)
        + " ("
        + ", ".join(f"{t}: {c:,}" for t, c in sizes.items() if c != values[0])
        + ")"
    )
