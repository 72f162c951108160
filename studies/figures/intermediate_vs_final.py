"""Figure 3 — does the intermediate result surface before the final answer across iterations?

On the correctly answered problems only (``answers.correct`` at the probed depth), for every lens,
core block position and iteration: the median over prompts (bootstrap 95 % CI) of the rank of

- ``intermediate``: the intermediate result's digit, the better of its two spellings
  (``intermediate`` / ``intermediate_alt``: with and without a leading space, as the reference did);
- ``final``: the correct answer's first token;
- ``control``: a control token (the vocabulary entry "the" as in the reference study, else " the");
- ``digit_baseline``: per prompt, the median rank of the digit tokens that are neither the answer's
  first digit nor the intermediate digit — how high "some digit" ranks by chance.

A latent chain of thought would show the intermediate ranked above the final answer at early
iterations, then overtaken. The table keeps every core block; the figure shows one block per lens
(:func:`pick_block`), since ranks saw-tooth across block positions.

Example:
    >>> pick_block("logit", 4), pick_block("coda", 4), pick_block("tuned", 4), pick_block("logit", 2)
    (2, 3, 3, 1)
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
    TARGET_COLORS,
    TARGET_DASH,
    TARGET_LABELS,
    TARGET_ORDER,
    lens_color,
    lens_label,
    lens_order,
    mpl_style,
    new_figure,
    plotly_layout,
    rank_axis,
    rank_axis_plotly,
)

__all__ = [
    "FIGURE",
    "add_panel_plotly",
    "correct_prompt_ids",
    "draw",
    "draw_panel",
    "headline",
    "pick_block",
    "table",
]

NAME = "intermediate_vs_final"
COLUMNS = [
    "lens",
    "block",
    "iteration",
    "target",
    "median",
    "ci_low",
    "ci_high",
    "geo_mean",
    "n",
    "unrolled_index",
    "shown",
]
_KEY = ["prompt_id", "lens", "iteration", "block", "unrolled_index"]

#: Huginn (4 core blocks): the block positions the reference study plotted (0-based).
HUGINN_BLOCKS = {"logit": 2, "coda": 3}


def pick_block(lens: str, n_core: int) -> int:
    """Core block (0-based) whose ranks the figure shows for ``lens``.

    With Huginn's 4 core blocks: the 3rd (index 2) for the logit lens and the 4th (index 3) for the
    coda lens, as the reference study chose; in every other case the last core block.
    """
    if n_core == 4 and lens in HUGINN_BLOCKS:
        return HUGINN_BLOCKS[lens]
    return n_core - 1


def correct_prompt_ids(answers: pd.DataFrame, steps: int | None = None) -> set[int]:
    """Prompts answered correctly at ``steps`` iterations (every row, if answers were not per depth)."""
    require_columns(answers, ["prompt_id", "correct"], "answers")
    a = answers
    if steps is not None and "num_steps" in a.columns and (a["num_steps"] == steps).any():
        a = a[a["num_steps"] == steps]
    ok = a.assign(correct=a["correct"].fillna(False).astype(bool)).groupby("prompt_id")["correct"].all()
    return {int(i) for i in ok.index[ok.to_numpy()]}


def _first_digit(text: object) -> int | None:
    for ch in str(text or ""):
        if ch.isascii() and ch.isdigit():
            return int(ch)
    return None


def _digit_baseline(rows: pd.DataFrame, answers: pd.DataFrame) -> pd.DataFrame:
    """Per prompt / lens / layer: median rank of the digits other than the answer's and the intermediate's."""
    digits = rows[rows["target_kind"].str.fullmatch(r"digit_[0-9]")]
    if digits.empty:
        return pd.DataFrame(columns=[*_KEY, "rank", "target"])
    digits = digits.assign(digit=digits["target_kind"].str[-1].astype(int))
    excluded: dict[int, set[int]] = {}
    if "token_id" in rows.columns:  # digits spelled like the answer / intermediate token
        ids = rows[rows["target_kind"].isin(["final", "intermediate", "intermediate_alt"])]
        same = (
            digits[["prompt_id", "digit", "token_id"]]
            .drop_duplicates()
            .merge(ids[["prompt_id", "token_id"]].drop_duplicates(), on=["prompt_id", "token_id"])
        )
        for pid, d in zip(same["prompt_id"], same["digit"], strict=True):
            excluded.setdefault(int(pid), set()).add(int(d))
    for col in ("expected", "intermediate"):  # and by text, e.g. "-3" → 3 although its first token is " -"
        if col in answers.columns:
            for pid, text in zip(answers["prompt_id"], answers[col], strict=True):
                d = _first_digit(text)
                if d is not None:
                    excluded.setdefault(int(pid), set()).add(d)
    drop = np.fromiter(
        (d in excluded.get(int(p), ()) for p, d in zip(digits["prompt_id"], digits["digit"], strict=True)),
        dtype=bool,
        count=len(digits),
    )
    kept = digits[~drop]
    base = kept.groupby(_KEY, as_index=False)["rank"].median()
    return base.assign(target="digit_baseline")


def table(tables: Tables, layout: Layout) -> pd.DataFrame:
    """Median rank (bootstrap CI) of intermediate / final / control / digit baseline per lens, block, t."""
    ranks, answers = tables["ranks"], tables["answers"]
    require_columns(ranks, RANK_COLUMNS, "ranks")
    ids = correct_prompt_ids(answers, layout.steps)
    rows = block_rows(ranks[ranks["prompt_id"].isin(ids)], layout)
    rows = rows[rows["stage"] == "core"]
    if rows.empty:
        return pd.DataFrame(columns=COLUMNS)
    parts = []
    inter = rows[rows["target_kind"].isin(["intermediate", "intermediate_alt"])]
    if len(inter):
        parts.append(inter.groupby(_KEY, as_index=False)["rank"].min().assign(target="intermediate"))
    for kind in ("final", "control"):
        sel = rows[rows["target_kind"] == kind]
        if len(sel):
            parts.append(sel[[*_KEY, "rank"]].assign(target=kind))
    parts.append(_digit_baseline(rows, answers[answers["prompt_id"].isin(ids)]))
    long = pd.concat([p for p in parts if len(p)], ignore_index=True)
    out = summarize_ranks(long, ["lens", "block", "iteration", "target"])
    out["unrolled_index"] = [
        layout.unrolled_index("core", int(t), int(b))
        for t, b in zip(out["iteration"], out["block"], strict=True)
    ]
    out["shown"] = [
        int(b) == pick_block(lens, layout.core) for lens, b in zip(out["lens"], out["block"], strict=True)
    ]
    lorder = {lens: i for i, lens in enumerate(lens_order(out["lens"].unique()))}
    torder = {t: i for i, t in enumerate(TARGET_ORDER)}
    out = out.sort_values(
        ["lens", "block", "target", "iteration"],
        key=lambda s: s.map(lorder) if s.name == "lens" else s.map(torder) if s.name == "target" else s,
    )
    return out[COLUMNS].reset_index(drop=True)


def headline(tab: pd.DataFrame, layout: Layout) -> Headline:
    """Correct problems used; per lens (shown block): last-iteration medians of intermediate and final,
    and in how many iterations the intermediate outranks (is above) the final answer."""
    out: Headline = {"n_correct": to_builtin(tab["n"].max()) if len(tab) else 0}
    shown = tab[tab["shown"]]
    for lens in lens_order(shown["lens"].unique()):
        d = shown[shown["lens"] == lens]
        out[f"{lens}_block"] = to_builtin(d["block"].iloc[0])
        wide = d.pivot_table(index="iteration", columns="target", values="median")
        last = wide.index.max()
        for target in ("final", "intermediate"):
            if target in wide:
                out[f"{lens}_{target}_median_last"] = to_builtin(wide.loc[last, target])
        if {"final", "intermediate"} <= set(wide.columns):
            out[f"{lens}_iters_intermediate_above_final"] = int((wide["intermediate"] < wide["final"]).sum())
    return out


# ---------------------------------------------------------------- drawing
def draw_panel(
    ax: Axes, tab: pd.DataFrame, lens: str, layout: Layout, *, top: float | None = None, ylabel: bool = True
) -> None:
    """The shown block of one lens: one line per target with its CI band, across iterations."""
    d = tab[(tab["lens"] == lens) & tab["shown"]]
    for target in TARGET_ORDER:
        s = d[d["target"] == target].sort_values("iteration")
        if s.empty:
            continue
        color = TARGET_COLORS[target]
        ax.fill_between(s["iteration"], s["ci_low"], s["ci_high"], color=color, alpha=0.14, lw=0)
        ax.plot(
            s["iteration"],
            s["median"],
            color=color,
            ls=TARGET_DASH[target][0],
            marker="o",
            ms=3,
            lw=1.5 if target in ("intermediate", "final") else 1.2,
            label=TARGET_LABELS[target],
        )
    rank_axis(
        ax,
        "median rank (log; 1 = top)" if ylabel else "",
        top=top if top is not None else (float(d["ci_high"].max()) if len(d) else None),
    )
    steps = layout.steps
    ax.set_xlim(0.5, steps + 0.5)
    every = max(1, int(np.ceil(steps / 16)))
    ax.set_xticks([t for t in range(1, steps + 1) if t == 1 or t % every == 0])
    ax.set_xlabel("recurrent iteration t")
    block = pick_block(lens, layout.core)
    ax.set_title(
        f"{lens_label(lens)} · core block {block + 1} of {layout.core}",
        loc="left",
        color=lens_color(lens),
        fontweight="bold",
    )


def _mpl(tab: pd.DataFrame, layout: Layout, title: str) -> MplFigure:
    lenses = lens_order(tab["lens"].unique())
    n = int(tab["n"].max()) if len(tab) else 0
    with mpl_style():
        fig = new_figure(max(6.0, 4.3 * len(lenses)), 4.2)
        axes = fig.subplots(1, len(lenses), sharey=True, squeeze=False)[0]
        top = float(tab.loc[tab["shown"], "ci_high"].max())
        for i, (ax, lens) in enumerate(zip(axes, lenses, strict=True)):
            draw_panel(ax, tab, lens, layout, top=top, ylabel=i == 0)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=len(labels))
        fig.suptitle(
            f"{title}\nintermediate result vs final answer on {n} correctly answered problems "
            "(median rank, shaded: 95 % bootstrap CI)",
            fontsize=10,
        )
    return fig


def add_panel_plotly(
    fig: go.Figure,
    tab: pd.DataFrame,
    lens: str,
    layout: Layout,
    row: int,
    col: int,
    *,
    showlegend: bool,
    top: float | None = None,
    ylabel: bool = True,
) -> None:
    d = tab[(tab["lens"] == lens) & tab["shown"]]
    for target in TARGET_ORDER:
        s = d[d["target"] == target].sort_values("iteration")
        if s.empty:
            continue
        color = TARGET_COLORS[target]
        x = s["iteration"].tolist()
        fig.add_trace(
            band_trace(x, s["ci_low"], s["ci_high"], color, 0.14, legendgroup=target),
            row=row,
            col=col,
        )
        custom = np.stack([s["ci_low"], s["ci_high"], s["n"]], axis=1)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=s["median"],
                mode="lines+markers",
                name=TARGET_LABELS[target],
                legendgroup=target,
                showlegend=showlegend,
                line=dict(color=color, dash=TARGET_DASH[target][1], width=1.8),
                marker=dict(size=5),
                customdata=custom,
                hovertemplate=(
                    "t=%{x} · median rank %{y:.4g} [%{customdata[0]:.4g}, %{customdata[1]:.4g}] · "
                    f"n=%{{customdata[2]}}<extra>{TARGET_LABELS[target]} · {lens_label(lens)}</extra>"
                ),
            ),
            row=row,
            col=col,
        )
    rank_axis_plotly(
        fig,
        row=row,
        col=col,
        label="median rank (log)" if ylabel else "",
        top=top if top is not None else (float(d["ci_high"].max()) if len(d) else None),
    )
    fig.update_xaxes(
        range=[0.5, layout.steps + 0.5],
        title_text="recurrent iteration t",
        row=row,
        col=col,
        dtick=max(1, int(np.ceil(layout.steps / 16))),
        tick0=0,
    )


def _plotly(tab: pd.DataFrame, layout: Layout, title: str) -> go.Figure:
    lenses = lens_order(tab["lens"].unique())
    fig = make_subplots(
        rows=1,
        cols=len(lenses),
        shared_yaxes=True,
        horizontal_spacing=0.05,
        subplot_titles=[
            f"{lens_label(lens)} · core block {pick_block(lens, layout.core) + 1}" for lens in lenses
        ],
    )
    top = float(tab.loc[tab["shown"], "ci_high"].max())
    for i, lens in enumerate(lenses, start=1):
        add_panel_plotly(fig, tab, lens, layout, 1, i, showlegend=i == 1, top=top, ylabel=i == 1)
    n = int(tab["n"].max()) if len(tab) else 0
    plotly_layout(
        fig,
        f"{title} — intermediate vs final on {n} correctly answered problems "
        "(median rank, band: 95 % bootstrap CI)",
        height=500,
    )
    return fig


def draw(tab: pd.DataFrame, layout: Layout, title: str) -> tuple[MplFigure, go.Figure]:
    return _mpl(tab, layout, title), _plotly(tab, layout, title)


FIGURE = FigureSpec(
    NAME,
    ("ranks", "answers"),
    table,
    draw,
    headline,
    description="intermediate vs final vs control vs digit baseline rank across iterations",
)
