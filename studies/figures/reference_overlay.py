"""Figure 6 — Huginn-3.5B (the reference study's released results) next to our model.

Two columns with the conventions of figures 1 and 3: left the reference study's Huginn-3.5B
numbers (:mod:`studies.reference_data`, 16 iterations), right our run. Rows, one per lens the
reference has (logit, coda): the rank of the model's own first answer token across unrolled
layers (figure 1), then intermediate vs final vs control on the chosen core block across
iterations (figure 3). The reference recorded no digit baseline (the figure says so) and no Tuned
Lens (ours is in figures 1 and 3, it has no counterpart here). Each column keeps its own rank
axis, since vocabulary sizes differ.

The table is figure 1's and figure 3's tables of both models stacked, with ``model``
(``reference`` / ``ours``) and ``panel`` (``rank_trajectory`` / ``intermediate_vs_final``) columns.
"""

from __future__ import annotations

from functools import lru_cache

import pandas as pd
import plotly.graph_objects as go
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure
from plotly.subplots import make_subplots

from studies.figures import intermediate_vs_final as ivf
from studies.figures import rank_trajectory as rt
from studies.figures.base import FigureSpec, Headline, Tables
from studies.figures.intermediate_vs_final import pick_block
from studies.figures.layout import Layout
from studies.figures.style import lens_color, lens_label, lens_order, mpl_style, new_figure, plotly_layout

__all__ = ["FIGURE", "PANELS", "draw", "headline", "table"]

NAME = "reference_overlay"
PANELS = ("rank_trajectory", "intermediate_vs_final")
MODELS = ("reference", "ours")
NO_BASELINE = "no digit baseline in the reference data"
_SHORT_X = "unrolled layer (P prelude · 1…T iterations · C coda)"


def _panels(tables: Tables, layout: Layout) -> list[pd.DataFrame]:
    out = []
    if "ranks" in tables and len(tables["ranks"]):
        out.append(rt.table(tables, layout).assign(panel="rank_trajectory"))
    answers = tables.get("answers")
    if "ranks" in tables and answers is not None and len(answers) and "correct" in answers.columns:
        out.append(ivf.table(tables, layout).assign(panel="intermediate_vs_final"))
    return [p for p in out if len(p)]


@lru_cache(maxsize=1)
def _reference_panels() -> pd.DataFrame:
    """The reference's figure tables (fixed data, fixed bootstrap seed: computed once per process)."""
    from studies.reference_data import HUGINN_LAYOUT, reference_tables

    return pd.concat(
        [p.assign(model="reference") for p in _panels(reference_tables(), HUGINN_LAYOUT)], ignore_index=True
    )


def table(tables: Tables, layout: Layout) -> pd.DataFrame:
    """Figures 1 and 3's tables for the reference (Huginn-3.5B) and for ours, stacked, restricted to
    the lenses the reference has (logit, coda)."""
    ref = _reference_panels().copy()
    ours = [p.assign(model="ours") for p in _panels(tables, layout)]
    out = pd.concat([ref, *ours], ignore_index=True)
    out = out[out["lens"].isin(set(ref["lens"]))]
    out["shown"] = out["shown"].astype("boolean")
    first = ["model", "panel", "lens"]
    return out[first + [c for c in out.columns if c not in first]].reset_index(drop=True)


def _part(tab: pd.DataFrame, model: str, panel: str, lens: str | None = None) -> pd.DataFrame:
    d = tab[(tab["model"] == model) & (tab["panel"] == panel)]
    if lens is not None:
        d = d[d["lens"] == lens]
    d = d.dropna(axis=1, how="all")
    if "shown" in d.columns:
        d = d.assign(shown=d["shown"].astype(bool))
    return d


def headline(tab: pd.DataFrame, layout: Layout) -> Headline:
    """Per model and lens: last-layer median rank and rank-1 share, and the iterations in which the
    intermediate result outranks the final answer."""
    from studies.reference_data import HUGINN_LAYOUT

    out: Headline = {}
    for model, lay in (("reference", HUGINN_LAYOUT), ("ours", layout)):
        r = _part(tab, model, "rank_trajectory")
        if len(r):
            h = rt.headline(r, lay)
            out.update(
                {
                    f"{model}_{k}": v
                    for k, v in h.items()
                    if k.endswith("median_rank_last") or k.endswith("top1_share_last")
                }
            )
        i = _part(tab, model, "intermediate_vs_final")
        if len(i):
            h = ivf.headline(i, lay)
            out.update(
                {f"{model}_{k}": v for k, v in h.items() if k.endswith("iters_intermediate_above_final")}
            )
    return out


# ---------------------------------------------------------------- drawing
def _rows(tab: pd.DataFrame) -> list[tuple[str, str]]:
    lenses = lens_order(tab.loc[tab["model"] == "reference", "lens"].unique())
    return [(panel, lens) for panel in PANELS for lens in lenses]


def _missing(ax: Axes, text: str) -> None:
    ax.text(
        0.5,
        0.5,
        text,
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="#707070",
        fontsize=9,
        style="italic",
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def _title(panel: str, lens: str) -> str:
    if panel == "rank_trajectory":
        return f"{lens_label(lens)} · rank of the model's own first answer token"
    return f"{lens_label(lens)} · intermediate vs final"


def _mpl(tab: pd.DataFrame, layout: Layout, title: str) -> MplFigure:
    from studies.reference_data import HUGINN_LAYOUT, REFERENCE_NAME

    layouts = {"reference": HUGINN_LAYOUT, "ours": layout}
    rows = _rows(tab)
    with mpl_style():
        fig = new_figure(14, 1.2 + 2.75 * len(rows))
        axes = fig.subplots(len(rows), 2, squeeze=False)
        for c, model in enumerate(MODELS):
            lay = layouts[model]
            tops = {
                p: _part(tab, model, p)["ci_high"].max() if len(_part(tab, model, p)) else None
                for p in PANELS
            }
            if tops["intermediate_vs_final"] is not None:
                shown = _part(tab, model, "intermediate_vs_final")
                tops["intermediate_vs_final"] = float(shown.loc[shown["shown"], "ci_high"].max())
            for r, (panel, lens) in enumerate(rows):
                ax = axes[r, c]
                d = _part(tab, model, panel, lens)
                if d.empty:
                    _missing(ax, "not recorded in this run")
                    ax.set_title(_title(panel, lens), loc="left", color=lens_color(lens))
                    continue
                if panel == "rank_trajectory":
                    rt.draw_panel(ax, d, lay, [lens], xlabel=False, top=tops[panel])
                    ax.set_xlabel(_SHORT_X)
                    ax.set_title(
                        _title(panel, lens) + " (median, 95 % CI)",
                        loc="left",
                        color=lens_color(lens),
                        fontweight="bold",
                    )
                else:
                    ivf.draw_panel(ax, d, lens, lay, top=tops[panel])
                    ax.set_title(
                        f"{_title(panel, lens)} · core block {pick_block(lens, lay.core) + 1} of {lay.core}",
                        loc="left",
                        color=lens_color(lens),
                        fontweight="bold",
                    )
                    if model == "reference":
                        ax.text(
                            0.99,
                            0.97,
                            NO_BASELINE,
                            transform=ax.transAxes,
                            ha="right",
                            va="top",
                            fontsize=7.5,
                            color="#707070",
                            style="italic",
                        )
        for ax, head in ((axes[0, 0], REFERENCE_NAME), (axes[0, 1], title)):
            ax.annotate(
                head,
                (0.5, 1.14),
                xycoords="axes fraction",
                ha="center",
                va="bottom",
                fontsize=11,
                fontweight="bold",
            )
        handles: dict[str, object] = {}
        for ax in axes[len(rows) // 2 :].flat:
            for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, h)
        fig.legend(
            list(handles.values()), list(handles.keys()), loc="outside lower center", ncols=len(handles)
        )
        fig.suptitle(
            "Huginn-3.5B (reference study, 16 iterations) vs ours: same lenses, same conventions\n"
            "rank: median over prompts, log scale, shaded 95 % bootstrap CI; intermediate vs final: "
            f"correctly answered problems only; {NO_BASELINE}",
            fontsize=10,
        )
    return fig


def _plotly(tab: pd.DataFrame, layout: Layout, title: str) -> go.Figure:
    from studies.reference_data import HUGINN_LAYOUT, REFERENCE_NAME

    layouts = {"reference": HUGINN_LAYOUT, "ours": layout}
    rows = _rows(tab)
    titles = []
    for r, (panel, lens) in enumerate(rows):
        for model in MODELS:
            head = f"<b>{REFERENCE_NAME if model == 'reference' else title}</b><br>" if r == 0 else ""
            titles.append(head + _title(panel, lens))
    fig = make_subplots(
        rows=len(rows), cols=2, subplot_titles=titles, vertical_spacing=0.08, horizontal_spacing=0.07
    )
    seen: set[str] = set()
    for c, model in enumerate(MODELS, start=1):
        lay = layouts[model]
        for r, (panel, lens) in enumerate(rows, start=1):
            d = _part(tab, model, panel, lens)
            if d.empty:
                fig.add_annotation(
                    text="not recorded in this run",
                    showarrow=False,
                    row=r,
                    col=c,
                    x=0.5,
                    y=0.5,
                    xref="x domain",
                    yref="y domain",
                    font=dict(color="#707070"),
                )
                continue
            before = len(fig.data)
            if panel == "rank_trajectory":
                rt.add_panel_plotly(fig, d, lay, [lens], r, c, showlegend=True, xlabel=False)
            else:
                ivf.add_panel_plotly(fig, d, lens, lay, r, c, showlegend=True)
                if model == "reference":
                    fig.add_annotation(
                        text=NO_BASELINE,
                        showarrow=False,
                        row=r,
                        col=c,
                        x=0.98,
                        y=0.98,
                        xref="x domain",
                        yref="y domain",
                        xanchor="right",
                        yanchor="top",
                        font=dict(size=10, color="#707070"),
                    )
            for trace in fig.data[before:]:  # one legend entry per name across the grid
                if trace.showlegend is not False and trace.name:
                    trace.showlegend = trace.name not in seen
                    seen.add(trace.name)
    plotly_layout(
        fig,
        f"Huginn-3.5B (reference study) vs ours, same lenses and conventions; {NO_BASELINE}",
        height=180 + 330 * len(rows),
        top=120,
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
    description="figures 1-3 for Huginn-3.5B (reference study) next to ours",
)
