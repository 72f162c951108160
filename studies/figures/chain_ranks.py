"""Chains figure — rank of every value along a variable chain, through every lens, per number of hops.

For each number of hops (one row of panels) and lens (one column): at the last prompt position
(where the answer is written), the median over prompts (bootstrap 95 % CI) of the rank of each value
of the chain — ``value_0`` (the constant), the intermediate values, and ``value_{hops}``, the final
answer — and of a control token, across every unrolled layer. The study only probes problems whose
chain values are pairwise distinct, so each value's token stands for one hop.

A latent chain of thought computed at the answer position would show ``value_k`` rising to rank 1
at a later layer than ``value_{k-1}``; values computed elsewhere (where their variables are assigned)
and only fetched at the end show only the final answer rising.

Example:
    >>> import pandas as pd
    >>> from lens.layout import UnrolledLayout
    >>> layout = Layout(UnrolledLayout(prelude=1, core=1, coda=1), steps=1)
    >>> ranks = pd.DataFrame({"prompt_id": 0, "site": ["prelude.0", "core.0", "coda.0"] * 2,
    ...     "iteration": [0, 1, 0] * 2, "block": 0, "unrolled_index": [0, 1, 2] * 2, "lens": "logit",
    ...     "target_kind": ["value_0"] * 3 + ["value_1"] * 3, "rank": [9, 5, 4, 50, 3, 1]})
    >>> prompts = pd.DataFrame({"prompt_id": [0], "task": ["chains_1hop"]})
    >>> tab = table({"ranks": ranks, "prompts": prompts}, layout)
    >>> tab[tab["target"] == "value_1"][["unrolled_index", "median", "final"]].to_dict("list")
    {'unrolled_index': [0, 1, 2], 'median': [50.0, 3.0, 1.0], 'final': [True, True, True]}
"""

from __future__ import annotations

import re

import pandas as pd
import plotly.graph_objects as go
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
    TARGET_COLORS,
    TARGET_DASH,
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
    unrolled_xlabel,
    value_color,
)

__all__ = ["FIGURE", "draw", "headline", "hops_of_prompts", "table", "target_label"]

NAME = "chain_ranks"
COLUMNS = [
    "hops",
    "lens",
    "target",
    "value_index",
    "final",
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
_VALUE = re.compile(r"value_(\d+)")
_HOPS = re.compile(r"chains_(\d+)hop")


def hops_of_prompts(prompts: pd.DataFrame) -> pd.DataFrame:
    """``prompt_id → hops`` from the prompts table's task names (``chains_4hop`` → 4)."""
    require_columns(prompts, ["prompt_id", "task"], "prompts")
    hops = prompts["task"].astype(str).str.extract(_HOPS)[0]
    out = pd.DataFrame({"prompt_id": prompts["prompt_id"], "hops": pd.to_numeric(hops)})
    return out.dropna().astype({"hops": int}).drop_duplicates("prompt_id")


def target_label(target: str, hops: int) -> str:
    """``value_0`` → "a = constant", ``value_{hops}`` → "final answer", else "value after hop k"."""
    if target == "control":
        return "control token"
    k = int(_VALUE.fullmatch(target)[1])  # type: ignore[index]
    if k == hops:
        return f"final answer (value {k})"
    return "value 0 (the constant)" if k == 0 else f"value {k} (after hop {k})"


def table(tables: Tables, layout: Layout) -> pd.DataFrame:
    """Median / bootstrap CI of each chain value's and the control's rank per hops, lens and layer."""
    ranks = tables["ranks"]
    require_columns(ranks, RANK_COLUMNS, "ranks")
    wanted = ranks["target_kind"].astype(str).str.fullmatch(_VALUE) | (ranks["target_kind"] == "control")
    rows = block_rows(ranks[wanted], layout)
    rows = rows.merge(hops_of_prompts(tables["prompts"]), on="prompt_id", how="inner")
    if rows.empty:
        return pd.DataFrame(columns=COLUMNS)
    summary = summarize_ranks(rows, ["hops", "lens", "target_kind", "unrolled_index"])
    summary = summary.rename(columns={"target_kind": "target"})
    index = summary["target"].str.extract(_VALUE)[0]
    summary["value_index"] = pd.to_numeric(index).fillna(-1).astype(int)
    summary["final"] = summary["value_index"] == summary["hops"]
    where = layout.frame()[["unrolled_index", "stage", "iteration", "block"]]
    out = summary.merge(where, on="unrolled_index", how="left")
    out = out.sort_values(["hops", "lens", "value_index", "unrolled_index"]).reset_index(drop=True)
    return out[COLUMNS]


def headline(tab: pd.DataFrame, layout: Layout) -> Headline:
    """Per hops and lens: the first layer where the final answer's median rank is 1, and the best
    median rank any intermediate value reaches."""
    out: Headline = {}
    for (hops, lens), d in tab.groupby(["hops", "lens"], sort=True):
        final = d[d["final"]].sort_values("unrolled_index")
        first = final.loc[final["median"] <= 1, "unrolled_index"]
        out[f"h{hops}_{lens}_final_first_rank1_layer"] = to_builtin(first.min()) if len(first) else None
        inter = d[(d["value_index"] >= 0) & ~d["final"]]
        out[f"h{hops}_{lens}_best_intermediate_median"] = (
            to_builtin(inter["median"].min()) if len(inter) else None
        )
    return out


def _targets(d: pd.DataFrame) -> list[str]:
    """Values in chain order, then the control."""
    order = d.drop_duplicates("target").sort_values("value_index")
    values = [t for t in order["target"] if t != "control"]
    return values + (["control"] if "control" in set(d["target"]) else [])


def _style(target: str, hops: int) -> tuple[str, str, str, float]:
    """(colour, matplotlib dash, plotly dash, width)."""
    if target == "control":
        return TARGET_COLORS["control"], TARGET_DASH["control"][0], TARGET_DASH["control"][1], 1.0
    k = int(_VALUE.fullmatch(target)[1])  # type: ignore[index]
    if k == hops:
        return TARGET_COLORS["final"], "-", "solid", 1.8
    return value_color(k), "-", "solid", 1.2


def _mpl(tab: pd.DataFrame, layout: Layout, title: str) -> MplFigure:
    hops_list = sorted(tab["hops"].unique())
    lenses = lens_order(tab["lens"].unique())
    top = float(tab["ci_high"].max())
    with mpl_style():
        fig = new_figure(4.2 * len(lenses) + 1.8, 1.2 + 2.2 * len(hops_list))
        axes = fig.subplots(len(hops_list), len(lenses), sharex=True, sharey=True, squeeze=False)
        for r, hops in enumerate(hops_list):
            for c, lens in enumerate(lenses):
                ax = axes[r, c]
                d = tab[(tab["hops"] == hops) & (tab["lens"] == lens)]
                for target in _targets(d):
                    s = d[d["target"] == target].sort_values("unrolled_index")
                    color, dash, _, width = _style(target, hops)
                    x = s["unrolled_index"].to_numpy()
                    ax.fill_between(x, s["ci_low"], s["ci_high"], color=color, alpha=0.10, lw=0)
                    ax.plot(
                        x,
                        s["median"],
                        color=color,
                        ls=dash,
                        lw=width,
                        marker="o",
                        ms=marker_size(layout),
                        label=target_label(target, hops),
                    )
                rank_axis(ax, f"{hops} hop{'s' if hops > 1 else ''}\nmedian rank" if c == 0 else "", top=top)
                decorate_unrolled(ax, layout, xlabel=False)
                if r == 0:
                    ax.set_title(lens_label(lens), loc="left", color=lens_color(lens), fontweight="bold")
                if c == len(lenses) - 1:
                    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
        n = int(tab["n"].max()) if len(tab) else 0
        fig.supxlabel(unrolled_xlabel(layout), fontsize=9)
        fig.suptitle(
            f"{title}\nrank of each value along the chain at the answer position (median over up to {n} "
            "problems per row, shaded: 95 % bootstrap CI)",
            fontsize=10,
        )
    return fig


def _plotly(tab: pd.DataFrame, layout: Layout, title: str) -> go.Figure:
    hops_list = sorted(tab["hops"].unique())
    lenses = lens_order(tab["lens"].unique())
    fig = make_subplots(
        rows=len(hops_list),
        cols=len(lenses),
        shared_xaxes=True,
        shared_yaxes=True,
        vertical_spacing=0.04,
        horizontal_spacing=0.04,
        subplot_titles=[f"{lens_label(lens)} · {h} hops" for h in hops_list for lens in lenses],
    )
    top = float(tab["ci_high"].max())
    shown: set[str] = set()
    for r, hops in enumerate(hops_list, start=1):
        for c, lens in enumerate(lenses, start=1):
            d = tab[(tab["hops"] == hops) & (tab["lens"] == lens)]
            for target in _targets(d):
                s = d[d["target"] == target].sort_values("unrolled_index")
                color, _, dash, width = _style(target, hops)
                label = (
                    "final answer" if target != "control" and s["final"].iloc[0] else target_label(target, 99)
                )
                x = s["unrolled_index"].tolist()
                fig.add_trace(
                    band_trace(x, s["ci_low"], s["ci_high"], color, 0.10, legendgroup=label),
                    row=r,
                    col=c,
                )
                fig.add_trace(
                    go.Scatter(
                        x=x,
                        y=s["median"],
                        mode="lines+markers",
                        name=label,
                        legendgroup=label,
                        showlegend=label not in shown,
                        line=dict(color=color, width=width + 0.4, dash=dash),
                        marker=dict(size=4),
                        customdata=s[["ci_low", "ci_high", "top1", "n"]].to_numpy(),
                        hovertemplate=(
                            f"{hops} hops · {target_label(target, hops)}<br>layer %{{x}} · median rank %{{y:.3g}} "
                            "[%{customdata[0]:.3g}, %{customdata[1]:.3g}] · rank-1 share %{customdata[2]:.0%} "
                            f"· n=%{{customdata[3]}}<extra>{lens_label(lens)}</extra>"
                        ),
                    ),
                    row=r,
                    col=c,
                )
                shown.add(label)
            rank_axis_plotly(fig, row=r, col=c, label="median rank" if c == 1 else "", top=top)
            decorate_unrolled_plotly(fig, layout, row=r, col=c, xlabel=r == len(hops_list))
    plotly_layout(
        fig,
        f"{title} — rank of each chain value at the answer position (median, band: 95 % bootstrap CI)",
        height=160 + 230 * len(hops_list),
    )
    return fig


def draw(tab: pd.DataFrame, layout: Layout, title: str) -> tuple[MplFigure, go.Figure]:
    return _mpl(tab, layout, title), _plotly(tab, layout, title)


FIGURE = FigureSpec(
    NAME,
    ("ranks", "prompts"),
    table,
    draw,
    headline,
    description="rank of every value along a variable chain across unrolled layers, per hops and lens",
)
