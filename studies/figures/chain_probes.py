"""Chains figure — when does each value of a chain become linearly decodable?

For each number of hops (one row of panels) and anchor (one column: ``statement``, the last token of
the statement assigning the value's variable; ``last``, the answer position): the held-out accuracy
of a linear probe (logistic regression, ``probes.linear``) reading the chain's ``k``-th value
(a digit, 10 classes) from the latent at each unrolled layer, one line per value, with a Wilson 95 %
interval and the majority-class baseline. The table adds, per value, the first layer where the probe
reaches :data:`DECODABLE` — if the model follows the chain one hop per iteration, that layer grows
with ``k``.

Example:
    >>> import pandas as pd
    >>> from lens.layout import UnrolledLayout
    >>> probes = pd.DataFrame({"task": "chains_1hop", "target": ["value_0"] * 2 + ["value_1"] * 2,
    ...     "anchor": "statement", "site": ["prelude.0", "core.0"] * 2, "iteration": [0, 1] * 2,
    ...     "unrolled_index": [0, 1] * 2, "test_accuracy": [0.95, 0.97, 0.1, 0.9],
    ...     "majority_baseline": 0.12, "n_test": 100})
    >>> tab = table({"linear_probes": probes}, Layout(UnrolledLayout(prelude=1, core=1, coda=1), 1))
    >>> tab.drop_duplicates("target")[["target", "first_decodable_layer"]].to_dict("list")
    {'target': ['value_0', 'value_1'], 'first_decodable_layer': [0, 1]}
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from matplotlib.figure import Figure as MplFigure
from plotly.subplots import make_subplots

from probes.palette import band_trace
from studies.figures.base import FigureSpec, Headline, Tables, require_columns
from studies.figures.chain_ranks import target_label
from studies.figures.layout import Layout
from studies.figures.stats import wilson_interval
from studies.figures.style import (
    TARGET_COLORS,
    decorate_unrolled,
    decorate_unrolled_plotly,
    marker_size,
    mpl_style,
    new_figure,
    plotly_layout,
    unrolled_xlabel,
    value_color,
)

__all__ = ["ANCHORS", "DECODABLE", "FIGURE", "draw", "headline", "table"]

NAME = "chain_probes"
DECODABLE = 0.8
"""Held-out probe accuracy from which a value counts as decodable at a layer."""

ANCHORS = {"statement": "at its own assignment", "last": "at the answer position"}
COLUMNS = [
    "hops",
    "anchor",
    "target",
    "value_index",
    "final",
    "unrolled_index",
    "site",
    "iteration",
    "test_accuracy",
    "ci_low",
    "ci_high",
    "majority_baseline",
    "n_test",
    "first_decodable_layer",
]


def table(tables: Tables, layout: Layout) -> pd.DataFrame:
    """Probe accuracy per hops × anchor × value × layer, with Wilson CI and the first decodable layer."""
    probes = tables["linear_probes"]
    require_columns(
        probes,
        ["task", "target", "anchor", "site", "iteration", "unrolled_index", "test_accuracy", "n_test"],
        "linear_probes",
    )
    d = probes[(probes["unrolled_index"] >= 0) & (probes["unrolled_index"] < layout.n_unrolled)].copy()
    d["hops"] = pd.to_numeric(d["task"].astype(str).str.extract(r"chains_(\d+)hop")[0])
    d["value_index"] = pd.to_numeric(d["target"].astype(str).str.extract(r"value_(\d+)")[0])
    d = d.dropna(subset=["hops", "value_index"]).astype({"hops": int, "value_index": int})
    if d.empty:
        return pd.DataFrame(columns=COLUMNS)
    d["final"] = d["value_index"] == d["hops"]
    n = d["n_test"].to_numpy(dtype=float)
    d["ci_low"], d["ci_high"] = wilson_interval(np.round(d["test_accuracy"].to_numpy() * n), n)
    if "majority_baseline" not in d.columns:
        d["majority_baseline"] = np.nan
    d = d.sort_values(["hops", "anchor", "value_index", "unrolled_index"]).reset_index(drop=True)
    reached = d[d["test_accuracy"] >= DECODABLE].groupby(["hops", "anchor", "target"])["unrolled_index"].min()
    d["first_decodable_layer"] = [
        reached.get((h, a, t), -1) for h, a, t in zip(d["hops"], d["anchor"], d["target"], strict=True)
    ]
    return d[COLUMNS]


def headline(tab: pd.DataFrame, layout: Layout) -> Headline:
    """Per hops and anchor: the first decodable layer of each value in chain order (``-1``: never),
    and whether it never decreases along the chain (hop k no earlier than hop k−1)."""
    out: Headline = {}
    for (hops, anchor), d in tab.groupby(["hops", "anchor"], sort=True):
        first = d.drop_duplicates("target").sort_values("value_index")["first_decodable_layer"].tolist()
        out[f"h{hops}_{anchor}_first_decodable_layers"] = ",".join(str(int(x)) for x in first)
        reached = [x for x in first if x >= 0]
        out[f"h{hops}_{anchor}_later_hop_later_layer"] = bool(
            len(reached) == len(first) and all(b >= a for a, b in zip(first[:-1], first[1:], strict=True))
        )
    return out


def _color(value_index: int, final: bool) -> str:
    return TARGET_COLORS["final"] if final else value_color(value_index)


def _mpl(tab: pd.DataFrame, layout: Layout, title: str) -> MplFigure:
    hops_list = sorted(tab["hops"].unique())
    anchors = [a for a in ANCHORS if a in set(tab["anchor"])]
    with mpl_style():
        fig = new_figure(5.2 * len(anchors) + 1.8, 1.2 + 2.1 * len(hops_list))
        axes = fig.subplots(len(hops_list), len(anchors), sharex=True, sharey=True, squeeze=False)
        for r, hops in enumerate(hops_list):
            for c, anchor in enumerate(anchors):
                ax = axes[r, c]
                d = tab[(tab["hops"] == hops) & (tab["anchor"] == anchor)]
                for (k, final), s in d.groupby(["value_index", "final"], sort=True):
                    color = _color(k, final)
                    x = s["unrolled_index"].to_numpy()
                    ax.fill_between(x, s["ci_low"], s["ci_high"], color=color, alpha=0.10, lw=0)
                    ax.plot(
                        x,
                        s["test_accuracy"],
                        color=color,
                        lw=1.8 if final else 1.2,
                        marker="o",
                        ms=marker_size(layout),
                        label=target_label(f"value_{k}", hops),
                    )
                base = d.groupby("unrolled_index")["majority_baseline"].mean()
                ax.plot(base.index, base.values, color="#8C8C8C", ls="--", lw=0.9, label="majority class")
                ax.axhline(DECODABLE, color="#b0b0b0", lw=0.6, ls=":")
                ax.set_ylim(-0.02, 1.02)
                ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
                ax.set_ylabel(f"{hops} hop{'s' if hops > 1 else ''}\nprobe accuracy" if c == 0 else "")
                decorate_unrolled(ax, layout, xlabel=False)
                if r == 0:
                    ax.set_title(f"value read {ANCHORS[anchor]}", loc="left", fontweight="bold")
                if c == len(anchors) - 1:
                    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
        n = int(tab["n_test"].max()) if len(tab) else 0
        fig.supxlabel(unrolled_xlabel(layout), fontsize=9)
        fig.suptitle(
            f"{title}\nlinear-probe accuracy for each value of the chain (held-out, {n} problems per row; "
            f"shaded: Wilson 95 % CI; dotted: {DECODABLE:.0%})",
            fontsize=10,
        )
    return fig


def _plotly(tab: pd.DataFrame, layout: Layout, title: str) -> go.Figure:
    hops_list = sorted(tab["hops"].unique())
    anchors = [a for a in ANCHORS if a in set(tab["anchor"])]
    fig = make_subplots(
        rows=len(hops_list),
        cols=len(anchors),
        shared_xaxes=True,
        shared_yaxes=True,
        vertical_spacing=0.04,
        subplot_titles=[f"{h} hops · value read {ANCHORS[a]}" for h in hops_list for a in anchors],
    )
    shown: set[str] = set()
    for r, hops in enumerate(hops_list, start=1):
        for c, anchor in enumerate(anchors, start=1):
            d = tab[(tab["hops"] == hops) & (tab["anchor"] == anchor)]
            for (k, final), s in d.groupby(["value_index", "final"], sort=True):
                color = _color(k, final)
                label = "final answer" if final else target_label(f"value_{k}", 99)
                x = s["unrolled_index"].tolist()
                fig.add_trace(
                    band_trace(x, s["ci_low"], s["ci_high"], color, 0.10, legendgroup=label),
                    row=r,
                    col=c,
                )
                fig.add_trace(
                    go.Scatter(
                        x=x,
                        y=s["test_accuracy"],
                        mode="lines+markers",
                        name=label,
                        legendgroup=label,
                        showlegend=label not in shown,
                        line=dict(color=color, width=2.2 if final else 1.6),
                        marker=dict(size=4),
                        customdata=s[["site", "iteration", "ci_low", "ci_high", "n_test"]].to_numpy(),
                        hovertemplate=(
                            f"{hops} hops · {target_label(f'value_{k}', hops)} · {anchor}<br>"
                            "%{customdata[0]} t=%{customdata[1]} · accuracy %{y:.0%} "
                            "[%{customdata[2]:.0%}, %{customdata[3]:.0%}] · n=%{customdata[4]}<extra></extra>"
                        ),
                    ),
                    row=r,
                    col=c,
                )
                shown.add(label)
            base = d.groupby("unrolled_index")["majority_baseline"].mean()
            fig.add_trace(
                go.Scatter(
                    x=base.index.tolist(),
                    y=base.values,
                    mode="lines",
                    name="majority class",
                    legendgroup="majority",
                    showlegend="majority" not in shown,
                    line=dict(color="#8C8C8C", dash="dash", width=1),
                ),
                row=r,
                col=c,
            )
            shown.add("majority")
            fig.update_yaxes(range=[-0.02, 1.02], tickformat=".0%", row=r, col=c)
            decorate_unrolled_plotly(fig, layout, row=r, col=c, xlabel=r == len(hops_list))
    plotly_layout(
        fig,
        f"{title} — linear-probe accuracy for each value of the chain (band: Wilson 95 % CI)",
        height=160 + 220 * len(hops_list),
    )
    return fig


def draw(tab: pd.DataFrame, layout: Layout, title: str) -> tuple[MplFigure, go.Figure]:
    return _mpl(tab, layout, title), _plotly(tab, layout, title)


FIGURE = FigureSpec(
    NAME,
    ("linear_probes",),
    table,
    draw,
    headline,
    description="linear-probe accuracy for each value of a variable chain across unrolled layers",
)
