"""Exit gate — where an exit-gated model (Ouro) would stop: λ_t, the exit distribution p_t, and its
cumulative mass, per recurrent iteration, over the probed prompts (their last position).

The table has one row per iteration: the median and quartiles of ``λ_t`` and of the cumulative exit
probability, the mean ``p_t`` (the expected exit distribution), and the share of prompts whose
threshold exit (cumulative ≥ 0.5, the authors' threshold mode) falls at that iteration. Drawn only
for runs that recorded an ``exit_gate`` table (families with an exit gate).

Example:
    >>> import pandas as pd
    >>> from lens.layout import UnrolledLayout
    >>> gate = pd.DataFrame({"prompt_id": [0, 0, 1, 1], "position": -1, "iteration": [1, 2, 1, 2],
    ...                      "num_steps": 2, "gate_lambda": [0.6, 0.9, 0.2, 0.5],
    ...                      "exit_prob": [0.6, 0.4, 0.2, 0.8], "exit_cdf": [0.6, 1.0, 0.2, 1.0]})
    >>> layout = Layout(UnrolledLayout(core=2, prelude=0, coda=0), steps=2)
    >>> headline(table({"exit_gate": gate}, layout), layout)
    {'expected_exit_step': 1.6, 'threshold_exit_share_before_T': 0.5, 'lambda_median_t1': 0.4}
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from matplotlib.figure import Figure as MplFigure
from plotly.subplots import make_subplots

from probes.palette import band_trace
from studies.figures.base import FigureSpec, Headline, Tables, require_columns, to_builtin
from studies.figures.layout import Layout
from studies.figures.stats import last_position
from studies.figures.style import mpl_style, new_figure, plotly_layout

__all__ = ["FIGURE", "THRESHOLD", "draw", "headline", "table"]

NAME = "exit_gate"
THRESHOLD = 0.5
COLUMNS = [
    "iteration",
    "n",
    "lambda_median",
    "lambda_q25",
    "lambda_q75",
    "cdf_median",
    "cdf_q25",
    "cdf_q75",
    "exit_prob_mean",
    "threshold_exit_share",
]
_LAMBDA, _CDF, _P = "#0072B2", "#D55E00", "#009E73"


def table(tables: Tables, layout: Layout) -> pd.DataFrame:
    """Per iteration: λ and cumulative exit probability (median, quartiles), mean p, threshold-exit share."""
    gate = tables["exit_gate"]
    require_columns(gate, ["prompt_id", "iteration", "gate_lambda", "exit_prob", "exit_cdf"], "exit_gate")
    gate = last_position(gate)
    first = gate[gate["exit_cdf"] >= THRESHOLD].groupby("prompt_id")["iteration"].min()
    exits = first.reindex(gate["prompt_id"].unique()).fillna(gate["iteration"].max())
    n_prompts = max(len(exits), 1)
    rows = []
    for t, g in gate.groupby("iteration", sort=True):
        lam, cdf = g["gate_lambda"].to_numpy(float), g["exit_cdf"].to_numpy(float)
        rows.append(
            {
                "iteration": int(t),
                "n": len(g),
                "lambda_median": float(np.median(lam)),
                "lambda_q25": float(np.quantile(lam, 0.25)),
                "lambda_q75": float(np.quantile(lam, 0.75)),
                "cdf_median": float(np.median(cdf)),
                "cdf_q25": float(np.quantile(cdf, 0.25)),
                "cdf_q75": float(np.quantile(cdf, 0.75)),
                "exit_prob_mean": float(g["exit_prob"].mean()),
                "threshold_exit_share": float((exits == t).sum() / n_prompts),
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def headline(tab: pd.DataFrame, layout: Layout) -> Headline:
    """The expected exit iteration Σ t·p̄_t, the share exiting before the last iteration, the first λ."""
    if tab.empty:
        return {}
    last = int(tab["iteration"].max())
    return {
        "expected_exit_step": to_builtin(round(float((tab["iteration"] * tab["exit_prob_mean"]).sum()), 4)),
        "threshold_exit_share_before_T": to_builtin(
            round(float(tab.loc[tab["iteration"] < last, "threshold_exit_share"].sum()), 4)
        ),
        "lambda_median_t1": to_builtin(round(float(tab["lambda_median"].iloc[0]), 4)),
    }


def _mpl(tab: pd.DataFrame, layout: Layout, title: str) -> MplFigure:
    t = tab["iteration"].to_numpy()
    with mpl_style():
        fig = new_figure(9.0, 3.8)
        left, right = fig.subplots(1, 2)
        left.fill_between(t, tab["lambda_q25"], tab["lambda_q75"], color=_LAMBDA, alpha=0.15, lw=0)
        left.plot(t, tab["lambda_median"], color=_LAMBDA, marker="o", ms=4, label="gate λ_t (median, IQR)")
        left.fill_between(t, tab["cdf_q25"], tab["cdf_q75"], color=_CDF, alpha=0.15, lw=0)
        left.plot(t, tab["cdf_median"], color=_CDF, marker="s", ms=4, label="P(exited by t) (median, IQR)")
        left.axhline(THRESHOLD, color="#808080", ls=":", lw=0.9)
        left.set_ylim(-0.02, 1.02)
        left.set_xticks(t)
        left.set_xlabel("recurrent iteration t")
        left.set_ylabel("probability")
        left.set_title("(a) exit gate and cumulative exit probability", loc="left")
        left.legend(loc="lower right", frameon=False)
        width = 0.38
        right.bar(t - width / 2, tab["exit_prob_mean"], width, color=_P, label="mean p_t (exit distribution)")
        right.bar(
            t + width / 2,
            tab["threshold_exit_share"],
            width,
            color="#999999",
            label=f"share exiting at t (threshold {THRESHOLD})",
        )
        right.set_xticks(t)
        right.set_ylim(0, 1.02)
        right.set_xlabel("recurrent iteration t")
        right.set_title("(b) where the model would stop", loc="left")
        right.legend(loc="upper left", frameon=False)
        n = int(tab["n"].max()) if len(tab) else 0
        fig.suptitle(f"{title}\nexit gate over {n} prompts (last position)", fontsize=10)
    return fig


def _plotly(tab: pd.DataFrame, layout: Layout, title: str) -> go.Figure:
    t = tab["iteration"].tolist()
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("exit gate λ_t and P(exited by t)", "where the model would stop"),
        horizontal_spacing=0.1,
    )
    for col, color, name in (("lambda", _LAMBDA, "gate λ_t"), ("cdf", _CDF, "P(exited by t)")):
        fig.add_trace(
            band_trace(t, tab[f"{col}_q25"], tab[f"{col}_q75"], color, 0.15, legendgroup=name),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=t,
                y=tab[f"{col}_median"],
                mode="lines+markers",
                name=f"{name} (median, IQR)",
                legendgroup=name,
                line=dict(color=color, width=2),
                hovertemplate=f"t=%{{x}} · {name} median %{{y:.3f}}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    fig.add_trace(
        go.Bar(x=t, y=tab["exit_prob_mean"], name="mean p_t", marker_color=_P),
        row=1,
        col=2,
    )
    fig.add_trace(
        go.Bar(
            x=t,
            y=tab["threshold_exit_share"],
            name=f"share exiting at t (threshold {THRESHOLD})",
            marker_color="#999",
        ),
        row=1,
        col=2,
    )
    fig.update_xaxes(title_text="recurrent iteration t", dtick=1)
    fig.update_yaxes(range=[-0.02, 1.02])
    plotly_layout(fig, f"{title} — exit gate", height=440)
    return fig


def draw(tab: pd.DataFrame, layout: Layout, title: str) -> tuple[MplFigure, go.Figure]:
    return _mpl(tab, layout, title), _plotly(tab, layout, title)


FIGURE = FigureSpec(
    NAME,
    ("exit_gate",),
    table,
    draw,
    headline,
    "exit-gate readings per iteration: λ_t, the exit distribution, where a threshold exit stops",
)
