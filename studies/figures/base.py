"""What a study figure is: a plot-ready table computed from run tables, drawn twice, summed up.

Every figure module exposes ``table(tables, layout)``, ``draw(table, layout, title)`` and
``headline(table, layout)`` and registers them as one :class:`FigureSpec`. The table is the
figure's whole content (the caller saves it as Parquet next to the PNG and HTML), so a figure
can be redrawn from its table alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import pandas as pd
import plotly.graph_objects as go
from matplotlib.figure import Figure as MplFigure

from studies.figures.layout import Layout
from studies.figures.stats import last_position

__all__ = ["Figure", "FigureSpec", "Headline", "Tables", "block_rows", "require_columns"]

Tables = Mapping[str, pd.DataFrame]
Headline = dict[str, Any]


@runtime_checkable
class Figure(Protocol):
    """A study figure: ``table`` → ``draw`` (PNG via matplotlib, HTML via plotly) → ``headline``."""

    name: str
    requires: tuple[str, ...]

    def table(self, tables: Tables, layout: Layout) -> pd.DataFrame: ...

    def draw(self, table: pd.DataFrame, layout: Layout, title: str) -> tuple[MplFigure, go.Figure]: ...

    def headline(self, table: pd.DataFrame, layout: Layout) -> Headline: ...


@dataclass(frozen=True)
class FigureSpec:
    """A :class:`Figure` made of a module's three functions."""

    name: str
    requires: tuple[str, ...]
    table: Callable[[Tables, Layout], pd.DataFrame]
    draw: Callable[[pd.DataFrame, Layout, str], tuple[MplFigure, go.Figure]]
    headline: Callable[[pd.DataFrame, Layout], Headline]
    description: str = ""

    def available(self, tables: Tables) -> bool:
        """Whether every required input table is present and non-empty."""
        return all(
            name in tables and tables[name] is not None and len(tables[name]) for name in self.requires
        )


def require_columns(df: pd.DataFrame, columns: list[str] | tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"{what} table lacks columns {missing}; has {list(df.columns)}")


RANK_COLUMNS = ("prompt_id", "site", "iteration", "block", "unrolled_index", "lens", "target_kind", "rank")


def block_rows(df: pd.DataFrame, layout: Layout) -> pd.DataFrame:
    """Rows at block sites (``unrolled_index`` within the layout), at each prompt's last position.

    ``latent`` / ``final`` / ``embed`` / ``adapter`` rows carry ``unrolled_index = -1`` and are
    dropped; ``stage`` is added from the site name.
    """
    out = last_position(df)
    out = out[(out["unrolled_index"] >= 0) & (out["unrolled_index"] < layout.n_unrolled)]
    out = out.assign(stage=out["site"].astype(str).str.split(".").str[0])
    return out[out["stage"].isin(["prelude", "core", "coda"])]


def to_builtin(value: Any) -> Any:
    """numpy scalars → Python numbers (headlines are printed and written as JSON)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:  # NaN
        return None
    return value
