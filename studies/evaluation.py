"""Exact-match accuracy of greedy answers, per task format and number of recurrent iterations.

``looplens eval`` writes the answers as a run with the depth-scaling figure and, with ``--card``,
regenerates the accuracy table of the embedded model's card (between its table markers).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

import lens
from lens.generation import generate
from lens.model import RecurrentDepthLM
from lens.runtime import configure_threads
from probes.records import records
from studies.tasks import arithmetic
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


def evaluate_tasks(
    model: RecurrentDepthLM,
    tasks: Sequence[str],
    num_steps: int,
    n: int,
    seed: int = 0,
    template: PromptTemplate | None = None,
    batch_size: int = 64,
    split: str = "test",
    id_offset: int = 0,
    all_composite: bool = False,
    purpose: str = "eval",
) -> pd.DataFrame:
    """Answers for ``n`` held-out problems of each task at one depth (``all_composite``: every
    one-digit composite problem of the split instead of ``n``)."""
    template = template or resolve_template(None, model.tokenizer)
    frames = []
    for t, task in enumerate(tasks):
        if all_composite and task == "arithmetic_1dc":
            problems = list(arithmetic.enumerate_all(task, split))
        else:
            problems = arithmetic.sample(task, n, split=split, seed=seed)
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
    return pd.concat(frames, ignore_index=True)


def accuracy_table(answers: pd.DataFrame) -> pd.DataFrame:
    """Rows task × num_steps with n, correct and accuracy."""
    grouped = answers.groupby(["task", "num_steps"])["correct"]
    out = grouped.agg(n="size", correct="sum").reset_index()
    out["accuracy"] = out["correct"] / out["n"]
    return out


def markdown_table(acc: pd.DataFrame) -> str:
    """Accuracy (%) as a Markdown table: tasks as rows, iterations as columns."""
    wide = acc.pivot(index="task", columns="num_steps", values="accuracy").sort_index()
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
        raise ValueError(f"{card} has no accuracy-table markers")
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
    """Powers of two up to 64 plus the model's default depth and four times it."""
    return sorted({1, 2, 4, 8, 16, 32, 64, mean_recurrence, 4 * mean_recurrence})


def run_evaluation(
    model_name: str,
    depths: Sequence[int] | None = None,
    n: int = 400,
    out: Path = Path("runs"),
    seed: int = 0,
    card: bool = False,
    console: Console | None = None,
) -> pd.DataFrame:
    """Evaluate every task at every depth, write a run with answers + figure, optionally the card table.

    One-digit composite uses its whole held-out split (1,870 problems); other tasks ``n`` each."""
    from probes.store import Run
    from studies.figures import FIGURES, Layout, render_figure

    console = console or Console()
    model = lens.load_model(model_name)
    configure_threads(model.num_parameters())
    depths = list(depths) if depths else default_depths(model.config.mean_recurrence)
    if any(d < 1 for d in depths):
        raise ValueError(f"depths must be >= 1, got {list(depths)}")
    template = resolve_template(None, model.tokenizer)
    settings = {"depths": list(depths), "n": n, "seed": seed, "tasks": list(arithmetic.TASKS)}
    run = Run.create(
        out,
        f"eval-{Path(str(model_name)).name}-n{n}-s{seed}",
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
    for depth in tqdm(depths, desc="eval depths"):
        if not run.has_shard("answers", depth):
            frame = evaluate_tasks(
                model, arithmetic.TASKS, depth, n, seed=seed, template=template, all_composite=True
            )
            run.write_shard("answers", depth, frame.assign(run=run.name))
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
    table_md = markdown_table(acc)
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
