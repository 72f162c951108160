"""Figure 4 — accuracy against the number of recurrent iterations, one line per task format.

The table is the run's ``depth`` table (task, num_steps, n, correct, accuracy) with a Wilson 95 %
interval added; the x axis is log2 (depths are usually 1, 2, 4, …, 64) and the probed depth of
the lens figures is marked.

Example:
    >>> import pandas as pd
    >>> depth = pd.DataFrame({"task": ["a", "a"], "num_steps": [1, 4], "n": [10, 10], "correct": [2, 9],
    ...                       "accuracy": [0.2, 0.9]})
    >>> from lens.layout import UnrolledLayout
    >>> layout = Layout(UnrolledLayout(prelude=1, core=1, coda=1), steps=4)
    >>> headline(table({"depth": depth}, layout), layout)
    {'a_accuracy_T4': 0.9, 'a_best_steps': 4, 'a_accuracy_best': 0.9}
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import FixedLocator, NullLocator

from probes.palette import band_trace
from studies.figures.base import FigureSpec, Headline, Tables, require_columns, to_builtin
from studies.figures.layout import Layout
from studies.figures.stats import wilson_interval
from studies.figures.style import mpl_style, new_figure, plotly_layout

__all__ = ["FIGURE", "draw", "headline", "table", "task_colors"]

NAME = "depth_scaling"
COLUMNS = ["task", "num_steps", "n", "correct", "accuracy", "ci_low", "ci_high"]
# Tol muted plus two greys: one colour per task format (10 formats), distinct from the lens colours
_PALETTE = [
    "#332288",
    "#117733",
    "#AA4499",
    "#44AA99",
    "#999933",
    "#882255",
    "#DDCC77",
    "#88CCEE",
    "#555555",
    "#BBBBBB",
]


def task_colors(tasks: list[str]) -> dict[str, str]:
    return {t: _PALETTE[i % len(_PALETTE)] for i, t in enumerate(sorted(tasks))}


def table(tables: Tables, layout: Layout) -> pd.DataFrame:
    """The ``depth`` table, sorted, with ``accuracy`` recomputed if absent and Wilson ci_low/ci_high."""
    depth = tables["depth"].copy()
    require_columns(depth, ["task", "num_steps", "n", "correct"], "depth")
    depth["n"] = depth["n"].astype(int)
    depth["correct"] = depth["correct"].astype(int)
    if "accuracy" not in depth.columns:
        depth["accuracy"] = depth["correct"] / depth["n"]
    lo, hi = wilson_interval(depth["correct"].to_numpy(), depth["n"].to_numpy())
    depth["ci_low"], depth["ci_high"] = lo, hi
    depth = depth.sort_values(["task", "num_steps"]).reset_index(drop=True)
    return depth[COLUMNS]


def headline(tab: pd.DataFrame, layout: Layout) -> Headline:
    """Per task: accuracy at the probed depth (or the nearest measured), and the best depth."""
    out: Headline = {}
    for task, d in tab.groupby("task", sort=True):
        near = d.iloc[int(np.argmin(np.abs(np.log2(d["num_steps"].to_numpy()) - np.log2(layout.steps))))]
        suffix = (
            f"T{layout.steps}" if int(near["num_steps"]) == layout.steps else f"T{int(near['num_steps'])}"
        )
        out[f"{task}_accuracy_{suffix}"] = to_builtin(near["accuracy"])
        best = d.loc[d["accuracy"].idxmax()]
        out[f"{task}_best_steps"] = to_builtin(best["num_steps"])
        out[f"{task}_accuracy_best"] = to_builtin(best["accuracy"])
    return out


def _mpl(tab: pd.DataFrame, layout: Layout, title: str) -> MplFigure:
    tasks = sorted(tab["task"].unique())
    colors = task_colors(tasks)
    steps = sorted(tab["num_steps"].unique())
    with mpl_style():
        fig = new_figure(7.5, 4.6)
        ax = fig.subplots()
        for task in tasks:
            d = tab[tab["task"] == task]
            ax.fill_between(d["num_steps"], d["ci_low"], d["ci_high"], color=colors[task], alpha=0.12, lw=0)
            ax.plot(d["num_steps"], d["accuracy"], color=colors[task], marker="o", ms=4, lw=1.6, label=task)
        ax.axvline(layout.steps, color="#606060", ls="--", lw=0.9)
        ax.annotate(
            f"probed depth T = {layout.steps}",
            (layout.steps, 1.0),
            xytext=(4, -2),
            textcoords="offset points",
            fontsize=7.5,
            color="#404040",
            va="top",
        )
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(steps))
        ax.xaxis.set_major_formatter(lambda v, _pos: f"{v:g}")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_ylim(-0.02, 1.02)
        ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
        ax.set_xlabel("recurrent iterations T (log2)")
        ax.set_ylabel("accuracy (shaded: Wilson 95 % CI)")
        n = int(tab["n"].median()) if len(tab) else 0
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title="task format", frameon=False)
        fig.suptitle(
            f"{title}\naccuracy vs number of recurrent iterations (≈{n} problems per task and depth)",
            fontsize=10,
        )
    return fig


def _plotly(tab: pd.DataFrame, layout: Layout, title: str) -> go.Figure:
    tasks = sorted(tab["task"].unique())
    colors = task_colors(tasks)
    fig = go.Figure()
    for task in tasks:
        d = tab[tab["task"] == task]
        x = d["num_steps"].tolist()
        fig.add_trace(band_trace(x, d["ci_low"], d["ci_high"], colors[task], 0.12, legendgroup=task))
        fig.add_trace(
            go.Scatter(
                x=x,
                y=d["accuracy"],
                mode="lines+markers",
                name=task,
                legendgroup=task,
                line=dict(color=colors[task], width=2),
                customdata=np.stack([d["correct"], d["n"], d["ci_low"], d["ci_high"]], axis=1),
                hovertemplate=(
                    "T=%{x} · accuracy %{y:.1%} (%{customdata[0]}/%{customdata[1]}) "
                    f"[%{{customdata[2]:.1%}}, %{{customdata[3]:.1%}}]<extra>{task}</extra>"
                ),
            )
        )
    # shapes and annotations on a log axis take log10 coordinates; a trace takes data coordinates
    fig.add_trace(
        go.Scatter(
            x=[layout.steps, layout.steps],
            y=[-0.02, 1.05],
            mode="lines",
            showlegend=False,
            line=dict(color="#606060", dash="dash", width=1),
            hoverinfo="skip",
        )
    )
    fig.add_annotation(
        x=np.log10(layout.steps),
        y=1.04,
        text=f"probed depth T = {layout.steps}",
        showarrow=False,
        xanchor="left",
        yanchor="top",
        xshift=4,
        font=dict(size=11, color="#404040"),
    )
    steps = sorted(tab["num_steps"].unique())
    fig.update_xaxes(
        type="log",
        tickvals=steps,
        ticktext=[str(s) for s in steps],
        title_text="recurrent iterations T (log2)",
    )
    fig.update_yaxes(range=[-0.02, 1.05], tickformat=".0%", title_text="accuracy (band: Wilson 95 % CI)")
    plotly_layout(fig, f"{title} — accuracy vs number of recurrent iterations", height=480)
    fig.update_layout(
        legend=dict(orientation="v", x=1.02, xanchor="left", y=1, yanchor="top"), margin=dict(r=220)
    )
    return fig


def draw(tab: pd.DataFrame, layout: Layout, title: str) -> tuple[MplFigure, go.Figure]:
    return _mpl(tab, layout, title), _plotly(tab, layout, title)


FIGURE = FigureSpec(
    NAME,
    ("depth",),
    table,
    draw,
    headline,
    description="accuracy vs number of recurrent iterations per task format",
)
