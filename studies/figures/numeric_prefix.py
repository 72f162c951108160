"""Figure 2 — how numeric the lens decodings are: share of top-5 tokens that are digits or a minus.

A decoded token counts as numeric when its text, stripped of whitespace, is non-empty and starts
with a digit ``0-9`` or a minus sign (``-`` or ``−``). The share is taken over all top-k slots of
all prompts at one lens and unrolled layer. A lens whose intermediate decodings are numeric even
where the answer token is not yet on top shows the model is "in number space" early.

Example:
    >>> [is_numeric(t) for t in [" 7", "12", "-", " -3", " the", "", "\\n", "IV"]]
    [True, True, True, True, False, False, False, False]
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure

from studies.figures.base import FigureSpec, Headline, Tables, block_rows, require_columns, to_builtin
from studies.figures.layout import Layout
from studies.figures.style import (
    decorate_unrolled,
    decorate_unrolled_plotly,
    lens_color,
    lens_label,
    lens_order,
    marker_size,
    mpl_style,
    new_figure,
    plotly_layout,
)

__all__ = ["FIGURE", "add_panel_plotly", "draw", "draw_panel", "headline", "is_numeric", "table"]

NAME = "numeric_prefix"
COLUMNS = ["lens", "unrolled_index", "stage", "iteration", "block", "share", "n_tokens", "n_prompts"]
_DIGITS = frozenset("0123456789-−")


def is_numeric(token: object) -> bool:
    """Stripped text non-empty and starting with a digit or a minus sign."""
    text = str(token).strip() if token is not None else ""
    return bool(text) and text[0] in _DIGITS


def table(tables: Tables, layout: Layout, k: int = 5) -> pd.DataFrame:
    """Share of numeric tokens among the top-``k`` decodings per lens and unrolled layer."""
    topk = tables["topk"]
    require_columns(topk, ["prompt_id", "site", "unrolled_index", "lens", "k", "token"], "topk")
    rows = block_rows(topk[topk["k"] <= k], layout)
    if rows.empty:
        return pd.DataFrame(columns=COLUMNS)
    tokens = rows["token"].astype(object)
    numeric = np.fromiter((is_numeric(t) for t in tokens), dtype=bool, count=len(tokens))
    grouped = rows.assign(numeric=numeric).groupby(["lens", "unrolled_index"])
    out = grouped.agg(
        share=("numeric", "mean"), n_tokens=("numeric", "size"), n_prompts=("prompt_id", "nunique")
    ).reset_index()
    out = out.merge(layout.frame()[["unrolled_index", "stage", "iteration", "block"]], on="unrolled_index")
    order = {lens: i for i, lens in enumerate(lens_order(out["lens"].unique()))}
    out = out.sort_values(["lens", "unrolled_index"], key=lambda s: s.map(order) if s.name == "lens" else s)
    return out[COLUMNS].reset_index(drop=True)


def headline(tab: pd.DataFrame, layout: Layout) -> Headline:
    """Per lens: numeric share at the last decoded layer, its peak and where the peak is."""
    out: Headline = {}
    for lens in lens_order(tab["lens"].unique()):
        d = tab[tab["lens"] == lens].sort_values("unrolled_index")
        out[f"{lens}_share_last"] = to_builtin(d["share"].iloc[-1])
        peak = d.loc[d["share"].idxmax()]
        out[f"{lens}_share_peak"] = to_builtin(peak["share"])
        out[f"{lens}_share_peak_layer"] = to_builtin(peak["unrolled_index"])
        core = d[d["stage"] == "core"]
        if len(core):
            out[f"{lens}_share_core_mean"] = to_builtin(core["share"].mean())
    return out


def draw_panel(
    ax: Axes,
    tab: pd.DataFrame,
    layout: Layout,
    *,
    xlabel: bool = True,
    top_index: bool = False,
    legend: bool = True,
) -> None:
    for lens in lens_order(tab["lens"].unique()):
        d = tab[tab["lens"] == lens].sort_values("unrolled_index")
        ax.plot(
            d["unrolled_index"],
            d["share"],
            color=lens_color(lens),
            lw=1.2,
            marker="o",
            ms=marker_size(layout),
            label=lens_label(lens),
        )
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("numeric share of top-5")
    ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
    decorate_unrolled(ax, layout, xlabel=xlabel, top_index=top_index)
    if legend:
        ax.legend(
            loc="lower center", bbox_to_anchor=(0.5, 1.0 if not top_index else 1.12), ncols=3, frameon=False
        )


def _mpl(tab: pd.DataFrame, layout: Layout, title: str) -> MplFigure:
    n_prompts = int(tab["n_prompts"].max()) if len(tab) else 0
    with mpl_style():
        fig = new_figure(12, 3.8)
        ax = fig.subplots()
        draw_panel(ax, tab, layout, top_index=False)
        fig.suptitle(
            f"{title}\nshare of top-5 decoded tokens that are digits or a minus sign ({n_prompts} prompts)",
            fontsize=10,
        )
    return fig


def add_panel_plotly(
    fig: go.Figure,
    tab: pd.DataFrame,
    layout: Layout,
    row: int | None = None,
    col: int | None = None,
    *,
    showlegend: bool = True,
    xlabel: bool = True,
) -> None:
    where = {"row": row, "col": col} if row is not None else {}
    for lens in lens_order(tab["lens"].unique()):
        d = tab[tab["lens"] == lens].sort_values("unrolled_index")
        custom = np.stack([d["stage"], d["iteration"], d["block"] + 1, d["n_tokens"]], axis=1)
        fig.add_trace(
            go.Scatter(
                x=d["unrolled_index"],
                y=d["share"],
                mode="lines+markers",
                name=lens_label(lens),
                legendgroup=lens,
                showlegend=showlegend,
                line=dict(color=lens_color(lens), width=1.6),
                marker=dict(size=4),
                customdata=custom,
                hovertemplate=(
                    "layer %{x} · %{customdata[0]} · t=%{customdata[1]} · block %{customdata[2]}<br>"
                    "numeric share %{y:.0%} of %{customdata[3]} tokens"
                    f"<extra>{lens_label(lens)}</extra>"
                ),
            ),
            **where,
        )
    fig.update_yaxes(range=[-0.03, 1.03], tickformat=".0%", title_text="numeric share of top-5", **where)
    decorate_unrolled_plotly(fig, layout, row=row, col=col, xlabel=xlabel)


def _plotly(tab: pd.DataFrame, layout: Layout, title: str) -> go.Figure:
    fig = go.Figure()
    add_panel_plotly(fig, tab, layout)
    plotly_layout(fig, f"{title} — share of top-5 decoded tokens that are digits or a minus sign", height=440)
    return fig


def draw(tab: pd.DataFrame, layout: Layout, title: str) -> tuple[MplFigure, go.Figure]:
    return _mpl(tab, layout, title), _plotly(tab, layout, title)


FIGURE = FigureSpec(
    NAME,
    ("topk",),
    table,
    draw,
    headline,
    description="share of numeric tokens among the top-5 decodings per unrolled layer",
)
