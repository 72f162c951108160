"""Figure 1 — rank of the model's own first answer token across every unrolled layer, per lens.

For each lens (logit, coda, tuned when recorded) and unrolled layer: the median over prompts of
the rank of the ``predicted`` target (the token the model itself emits first), a percentile
bootstrap 95 % interval over prompts, the geometric mean and the share of prompts at rank 1.
Ranks are heavy-tailed, so the figure shows medians on a log axis, one panel per lens, with the
prelude / iteration / coda structure drawn in.

Example:
    >>> import pandas as pd
    >>> from lens.layout import UnrolledLayout
    >>> from studies.figures.layout import Layout
    >>> layout = Layout(UnrolledLayout(prelude=1, core=1, coda=1), steps=1)
    >>> ranks = pd.DataFrame({"prompt_id": [0, 0, 0], "site": ["prelude.0", "core.0", "coda.0"],
    ...     "iteration": [0, 1, 0], "block": [0, 0, 0], "unrolled_index": [0, 1, 2],
    ...     "lens": "logit", "target_kind": "predicted", "rank": [50, 3, 1]})
    >>> table({"ranks": ranks}, layout)[["unrolled_index", "stage", "median"]].to_dict("list")
    {'unrolled_index': [0, 1, 2], 'stage': ['prelude', 'core', 'coda'], 'median': [50.0, 3.0, 1.0]}
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure
from plotly.subplots import make_subplots

from probes.palette import band_trace
from probes.trajectory import summarize_ranks
from studies.figures.base import (
    RANK_COLUMNS,
    FigureSpec,
    Headline,
    Tables,
    block_rows,
    require_columns,
    to_builtin,
)
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
    rank_axis,
    rank_axis_plotly,
)

__all__ = ["FIGURE", "add_panel_plotly", "draw", "draw_panel", "headline", "table"]

NAME = "rank_trajectory"
COLUMNS = [
    "lens",
    "unrolled_index",
    "stage",
    "iteration",
    "block",
    "median",
    "ci_low",
    "ci_high",
    "geo_mean",
    "top1",
    "n",
]


def table(tables: Tables, layout: Layout, target: str = "predicted") -> pd.DataFrame:
    """Median / bootstrap CI / geometric mean of ``target``'s rank per lens and unrolled layer."""
    ranks = tables["ranks"]
    require_columns(ranks, RANK_COLUMNS, "ranks")
    rows = block_rows(ranks[ranks["target_kind"] == target], layout)
    if rows.empty:
        return pd.DataFrame(columns=COLUMNS)
    summary = summarize_ranks(rows, ["lens", "unrolled_index"])
    where = layout.frame()[["unrolled_index", "stage", "iteration", "block"]]
    out = summary.merge(where, on="unrolled_index", how="left")
    order = {lens: i for i, lens in enumerate(lens_order(out["lens"].unique()))}
    out = out.sort_values(["lens", "unrolled_index"], key=lambda s: s.map(order) if s.name == "lens" else s)
    return out[COLUMNS].reset_index(drop=True)


def headline(tab: pd.DataFrame, layout: Layout) -> Headline:
    """Per lens: median rank and rank-1 share at the last layer it decodes, at the last core layer,
    and the first unrolled layer whose median rank is 1."""
    out: Headline = {}
    if tab.empty:
        return out
    out["n_prompts"] = to_builtin(tab["n"].max())
    for lens in lens_order(tab["lens"].unique()):
        d = tab[tab["lens"] == lens].sort_values("unrolled_index")
        last = d.iloc[-1]
        out[f"{lens}_median_rank_last"] = to_builtin(last["median"])
        out[f"{lens}_top1_share_last"] = to_builtin(last["top1"])
        last_core = d[d["unrolled_index"] == layout.coda_start - 1]
        if len(last_core):
            out[f"{lens}_median_rank_last_core"] = to_builtin(last_core["median"].iloc[0])
        first = d.loc[d["median"] <= 1, "unrolled_index"]
        out[f"{lens}_first_layer_median_rank1"] = to_builtin(first.min()) if len(first) else None
    return out


# ---------------------------------------------------------------- drawing
def draw_panel(
    ax: Axes,
    tab: pd.DataFrame,
    layout: Layout,
    lenses: list[str],
    *,
    xlabel: bool = True,
    top_index: bool = False,
    top: float | None = None,
    legend: bool = False,
) -> None:
    """Median line + bootstrap band of each lens in ``lenses`` on one axes (used by the overlay too)."""
    for lens in lenses:
        d = tab[tab["lens"] == lens].sort_values("unrolled_index")
        if d.empty:
            continue
        color = lens_color(lens)
        x = d["unrolled_index"].to_numpy()
        ax.fill_between(x, d["ci_low"], d["ci_high"], color=color, alpha=0.18, lw=0, zorder=1)
        ax.plot(
            x,
            d["median"],
            color=color,
            lw=1.1,
            marker="o",
            ms=marker_size(layout),
            zorder=3,
            label=f"{lens_label(lens)} median",
        )
    rank_axis(ax, "median rank (log)", top=top if top is not None else float(tab["ci_high"].max()))
    decorate_unrolled(ax, layout, xlabel=xlabel, top_index=top_index)
    if legend:
        ax.legend(loc="upper right", ncols=len(lenses), framealpha=0.85, frameon=True)


def _mpl(tab: pd.DataFrame, layout: Layout, title: str) -> MplFigure:
    lenses = lens_order(tab["lens"].unique())
    n_prompts = int(tab["n"].max()) if len(tab) else 0
    with mpl_style():
        fig = new_figure(12, 1.1 + 2.3 * len(lenses))
        axes = fig.subplots(len(lenses), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
        top = float(tab["ci_high"].max())
        for i, (ax, lens) in enumerate(zip(axes, lenses, strict=True)):
            draw_panel(ax, tab, layout, [lens], xlabel=i == len(lenses) - 1, top_index=i == 0, top=top)
            ax.set_title(f"{lens_label(lens)}", loc="left", color=lens_color(lens), fontweight="bold")
            if i < len(lenses) - 1:
                ax.tick_params(axis="x", labelbottom=False)
        fig.suptitle(
            f"{title}\nrank of the model's own first answer token — median over {n_prompts} prompts, "
            f"shaded: 95 % bootstrap CI",
            fontsize=10,
        )
    return fig


def add_panel_plotly(
    fig: go.Figure,
    tab: pd.DataFrame,
    layout: Layout,
    lenses: list[str],
    row: int,
    col: int,
    *,
    showlegend: bool,
    name_suffix: str = "",
    xlabel: bool = True,
    top: float | None = None,
) -> None:
    """Plotly twin of :func:`draw_panel` into subplot (row, col)."""
    for lens in lenses:
        d = tab[tab["lens"] == lens].sort_values("unrolled_index")
        if d.empty:
            continue
        color = lens_color(lens)
        x = d["unrolled_index"].tolist()
        fig.add_trace(
            band_trace(x, d["ci_low"], d["ci_high"], color, 0.18, legendgroup=lens),
            row=row,
            col=col,
        )
        custom = np.stack(
            [
                d["stage"],
                d["iteration"],
                d["block"] + 1,
                d["ci_low"],
                d["ci_high"],
                d["geo_mean"],
                d["top1"],
                d["n"],
            ],
            axis=1,
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=d["median"],
                mode="lines+markers",
                name=f"{lens_label(lens)}{name_suffix}",
                legendgroup=lens,
                line=dict(color=color, width=1.6),
                marker=dict(size=4),
                customdata=custom,
                showlegend=showlegend,
                hovertemplate=(
                    "layer %{x} · %{customdata[0]} · t=%{customdata[1]} · block %{customdata[2]}<br>"
                    "median rank %{y:.4g} [%{customdata[3]:.4g}, %{customdata[4]:.4g}]<br>"
                    "geo-mean %{customdata[5]:.4g} · rank-1 share %{customdata[6]:.0%} · n=%{customdata[7]}"
                    f"<extra>{lens_label(lens)}</extra>"
                ),
            ),
            row=row,
            col=col,
        )
    rank_axis_plotly(
        fig,
        row=row,
        col=col,
        label="median rank (log)",
        top=top if top is not None else float(tab["ci_high"].max()),
    )
    decorate_unrolled_plotly(fig, layout, row=row, col=col, xlabel=xlabel)


def _plotly(tab: pd.DataFrame, layout: Layout, title: str) -> go.Figure:
    lenses = lens_order(tab["lens"].unique())
    fig = make_subplots(
        rows=len(lenses),
        cols=1,
        shared_xaxes=True,
        shared_yaxes=True,
        vertical_spacing=0.07,
        subplot_titles=[lens_label(lens) for lens in lenses],
    )
    top = float(tab["ci_high"].max())
    for i, lens in enumerate(lenses, start=1):
        add_panel_plotly(
            fig, tab, layout, [lens], row=i, col=1, showlegend=True, xlabel=i == len(lenses), top=top
        )
    n_prompts = int(tab["n"].max()) if len(tab) else 0
    plotly_layout(
        fig,
        f"{title} — rank of the model's own first answer token (median over {n_prompts} prompts, "
        "band: 95 % bootstrap CI)",
        height=180 + 260 * len(lenses),
    )
    return fig


def draw(tab: pd.DataFrame, layout: Layout, title: str) -> tuple[MplFigure, go.Figure]:
    return _mpl(tab, layout, title), _plotly(tab, layout, title)


FIGURE = FigureSpec(
    NAME,
    ("ranks",),
    table,
    draw,
    headline,
    description="rank of the model's own first answer token across unrolled layers, per lens",
)
