"""``looplens tuned-lens``: train Tuned Lenses (shared over iterations and per iteration) on arithmetic
prompts and print their held-out KL to the final distribution next to the Logit Lens's."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

import lens
from lens.runtime import configure_threads
from probes.lenses.tuned_training import train_and_compare
from studies.tasks import arithmetic
from studies.tasks.prompts import resolve_template


def summarize(table: pd.DataFrame, sites: list[str]) -> pd.DataFrame:
    """Mean held-out KL per site (core sites averaged over iterations), in the model's block order."""
    order = {site: i for i, site in enumerate(sites)}
    columns = [c for c in table.columns if c.startswith("kl_")]
    out = table.groupby("site")[columns].mean().reset_index()
    return out.sort_values("site", key=lambda s: s.map(order)).reset_index(drop=True)


def train_tuned_lenses(
    model_name: str, steps: int, n: int, epochs: int, save: Path | None, console: Console | None = None
) -> pd.DataFrame:
    console = console or Console()
    model = lens.load_model(model_name)
    configure_threads(model.num_parameters())
    template = resolve_template(None, model.tokenizer)
    problems = arithmetic.sample("arithmetic_1dc", n, split="train", seed=0)
    prompts = [
        model.tokenizer.encode(
            template.render(p.context, model.tokenizer) + template.expected_answer(p.completion)
        )
        for p in problems
    ]
    layout = model.layout
    console.print(
        f"{model_name}: {layout.family} ({layout.describe()}); lenses that apply: {', '.join(layout.lenses())}"
        + ("" if layout.coda else " (no coda, so no Coda Lens)")
    )
    lenses, table = train_and_compare(model, prompts, steps, epochs=epochs, lr=3e-3)
    summary = summarize(table, model.layout.block_sites())
    rich_table = Table(title=f"held-out KL(final ‖ lens), nats — {model_name}, T={steps}")
    for column in summary.columns:
        rich_table.add_column(column)
    for row in summary.itertuples(index=False):
        rich_table.add_row(row[0], *[f"{v:.3f}" for v in row[1:]])
    console.print(rich_table)
    for mode in lenses:
        wins = (table[f"kl_tuned_{mode}"] < table["kl_logit"]).mean()
        console.print(f"tuned ({mode}) beats the Logit Lens at {wins:.0%} of (site, iteration) pairs")
    if save is not None:
        for mode, tuned in lenses.items():
            tuned.save(save / mode)
        console.print(f"saved to {save}")
    return table
