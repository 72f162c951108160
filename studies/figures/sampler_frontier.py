"""The speed–accuracy frontier of the sampler study: accuracy against sequential model calls and wall time.

One point per setting (fixed-depth and adaptive-exit autoregressive decoding, the diffusion sampler
faithful and corrected); x is the cost per generated token — sequential forward passes and sequential
core iterations (the latency a parallel machine pays) and wall time on this machine — and y the share
of prompts whose continuation equals the reference's. The step line is the Pareto frontier: the best
accuracy reachable at each cost.

Example:
    >>> import pandas as pd
    >>> rows = pd.DataFrame({"setting": ["ar-T16", "diff"], "sampler": ["autoregressive", "diffusion"],
    ...     "options": ['{"num_steps": 16}', '{"headway": 2}'], "correct": [True, True],
    ...     "token_agreement": [1.0, 1.0], "answer_correct": [True, True], "new_tokens": [20, 20],
    ...     "model_calls": [20, 8], "core_iterations": [320, 64], "core_passes": [400, 300],
    ...     "seconds": [1.0, 0.5]})
    >>> from lens.layout import UnrolledLayout
    >>> layout = Layout(UnrolledLayout(prelude=1, core=1, coda=1), steps=16)
    >>> head = headline(table({"sampler": rows}, layout), layout)
    >>> head["best_diffusion"], head["calls_ratio_at_equal_accuracy"]
    ('diff', 2.5)
"""

from __future__ import annotations

import json

import pandas as pd
import plotly.graph_objects as go
from matplotlib.figure import Figure as MplFigure
from plotly.subplots import make_subplots

from studies.figures.base import FigureSpec, Headline, Tables, require_columns, to_builtin
from studies.figures.layout import Layout
from studies.figures.style import mpl_style, new_figure, plotly_layout

__all__ = ["FIGURE", "draw", "headline", "table"]

NAME = "sampler_frontier"
FAMILY_COLORS = {
    "fixed depth": "#332288",
    "adaptive exit": "#117733",
    "diffusion": "#CC6677",
    "diffusion (corrected)": "#DDCC77",
}
AXES = (
    ("calls_per_token", "sequential model calls per token"),
    ("iterations_per_token", "sequential core iterations per token"),
    ("ms_per_token", "wall time per token (ms)"),
)


def family(sampler: str, options: str) -> str:
    opts = json.loads(options) if options else {}
    if sampler == "diffusion":
        return "diffusion" if opts.get("faithful", True) else "diffusion (corrected)"
    return "adaptive exit" if opts.get("exit_criterion") else "fixed depth"


def table(tables: Tables, layout: Layout) -> pd.DataFrame:
    """One row per setting: family, accuracy (and answer accuracy), calls / iterations / ms per token."""
    from studies.sampler import summarize

    rows = tables["sampler"]
    require_columns(rows, ["setting", "sampler", "options", "correct", "model_calls", "seconds"], "sampler")
    out = summarize(rows)
    out["family"] = [family(s, o) for s, o in zip(out["sampler"], out["options"], strict=True)]
    out["ms_per_token"] = 1000 / out["tokens_per_s"]
    return out


def _pareto(tab: pd.DataFrame, x: str) -> pd.DataFrame:
    """The settings no other setting beats on both cost ``x`` (lower) and accuracy (higher)."""
    ordered = tab.sort_values([x, "accuracy"], ascending=[True, False])
    best, keep = -1.0, []
    for row in ordered.itertuples():
        if row.accuracy > best:
            keep.append(row.Index)
            best = row.accuracy
    return ordered.loc[keep]


def headline(tab: pd.DataFrame, layout: Layout) -> Headline:
    """The reference's cost, and the cheapest diffusion setting within 1 point of its accuracy."""
    ref = tab.iloc[0]
    out: Headline = {
        "reference": str(ref["setting"]),
        "reference_accuracy": to_builtin(ref["accuracy"]),
        "reference_calls_per_token": to_builtin(round(float(ref["calls_per_token"]), 3)),
    }
    fixed = tab[tab["family"] == "fixed depth"]
    diffusion = tab[tab["sampler"] == "diffusion"]
    close = diffusion[diffusion["accuracy"] >= ref["accuracy"] - 0.01]
    if len(close):
        best = close.sort_values(["calls_per_token", "ms_per_token"]).iloc[0]
        out["best_diffusion"] = str(best["setting"])
        out["best_diffusion_accuracy"] = to_builtin(best["accuracy"])
        out["calls_ratio_at_equal_accuracy"] = to_builtin(
            round(float(ref["calls_per_token"] / best["calls_per_token"]), 3)
        )
        out["wall_time_ratio_at_equal_accuracy"] = to_builtin(
            round(float(ref["ms_per_token"] / best["ms_per_token"]), 3)
        )
    out["fixed_depth_settings"] = len(fixed)
    return out


def _label(setting: str) -> str:
    return setting.replace("-corrected", "*")


def _mpl(tab: pd.DataFrame, title: str) -> MplFigure:
    with mpl_style():
        fig = new_figure(14, 4.4)
        axes = fig.subplots(1, len(AXES), sharey=True)
        for ax, (x, label) in zip(axes, AXES, strict=True):
            front = _pareto(tab, x)
            ax.step(
                front[x],
                front["accuracy"],
                where="post",
                color="#808080",
                lw=1,
                ls="--",
                label="Pareto frontier",
            )
            for fam, color in FAMILY_COLORS.items():
                d = tab[tab["family"] == fam]
                if len(d):
                    ax.scatter(d[x], d["accuracy"], s=22, color=color, label=fam, zorder=3)
            for row in tab.itertuples():
                ax.annotate(_label(row.setting), (getattr(row, x), row.accuracy), xytext=(3, 2),
                            textcoords="offset points", fontsize=5.5, color="#505050")  # fmt: skip
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(lambda v, _pos: f"{v:g}")
            ax.xaxis.set_minor_formatter(lambda v, _pos: f"{v:g}" if str(f"{v:g}")[0] in "25" else "")
            ax.set_xlabel(label + " (log)")
            ax.set_ylim(-0.03, 1.05)
            ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
        axes[0].set_ylabel("accuracy (continuation = reference)")
        axes[-1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.suptitle(f"{title}\nspeed–accuracy frontier (* = corrected sampler)", fontsize=10)
    return fig


def _plotly(tab: pd.DataFrame, title: str) -> go.Figure:
    fig = make_subplots(
        rows=1, cols=len(AXES), shared_yaxes=True, subplot_titles=[label for _, label in AXES]
    )
    for col, (x, _label_text) in enumerate(AXES, start=1):
        front = _pareto(tab, x)
        fig.add_trace(
            go.Scatter(
                x=front[x],
                y=front["accuracy"],
                mode="lines",
                line=dict(shape="hv", dash="dash", color="#808080"),
                name="Pareto frontier",
                showlegend=col == 1,
                hoverinfo="skip",
            ),  # fmt: skip
            row=1,
            col=col,
        )
        for fam, color in FAMILY_COLORS.items():
            d = tab[tab["family"] == fam]
            if not len(d):
                continue
            hover = [
                f"<b>{r.setting}</b><br>accuracy {r.accuracy:.1%} (answers {r.answer_accuracy:.1%})<br>"
                f"{r.calls_per_token:.2f} calls, {r.iterations_per_token:.1f} iterations, {r.ms_per_token:.2f} ms per token"
                for r in d.itertuples()
            ]
            fig.add_trace(
                go.Scatter(
                    x=d[x],
                    y=d["accuracy"],
                    mode="markers",
                    marker=dict(color=color, size=8),
                    name=fam,
                    showlegend=col == 1,
                    text=hover,
                    hoverinfo="text",
                ),  # fmt: skip
                row=1,
                col=col,
            )
        fig.update_xaxes(type="log", title_text=_label_text + " (log)", row=1, col=col)
    fig.update_yaxes(tickformat=".0%", range=[-0.03, 1.05], title_text="accuracy", row=1, col=1)
    plotly_layout(fig, f"{title} · speed–accuracy frontier", 460)
    return fig


def draw(tab: pd.DataFrame, layout: Layout, title: str) -> tuple[MplFigure, go.Figure]:
    return _mpl(tab, title), _plotly(tab, title)


FIGURE = FigureSpec(
    NAME, ("sampler",), table, draw, headline, "accuracy against sequential calls and wall time per token"
)
