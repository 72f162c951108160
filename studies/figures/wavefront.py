"""The diffusion sampler's wavefront for one prompt: diffusion step × position.

Three panels from the ``wavefront`` table (the state each step ends with, ``latent``): which positions
were frozen or still being refined, how many core iterations each had received, and the rank of the
finally generated next token under each lens — how the window converges on the answer, step by step.

Example:
    >>> import pandas as pd
    >>> rows = pd.DataFrame({"prompt_id": 0, "setting": "s", "diffusion_step": [0, 0, 1], "position": [3, 4, 4],
    ...     "site": "latent", "iteration": 4, "lens": "logit", "token_id": 7, "rank": [5, 1, 1],
    ...     "logprob": -1.0, "frozen": [True, False, True], "recurrence": [8, 0, 4], "guess_id": 7,
    ...     "stability": 1})
    >>> from lens.layout import UnrolledLayout
    >>> layout = Layout(UnrolledLayout(prelude=1, core=1, coda=1), steps=8)
    >>> headline(table({"wavefront": rows}, layout), layout)
    {'prompt_id': 0, 'steps': 2, 'positions': 2, 'frozen_during_steps': 1, 'logit_top1_share': 0.667}
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure as MplFigure
from plotly.subplots import make_subplots

from studies.figures.base import FigureSpec, Headline, Tables, require_columns, to_builtin
from studies.figures.layout import Layout
from studies.figures.style import lens_label, lens_order, mpl_style, new_figure, plotly_layout

__all__ = ["FIGURE", "draw", "headline", "table"]

NAME = "wavefront"
COLUMNS = ["prompt_id", "setting", "diffusion_step", "position", "lens", "status", "iterations", "rank"]
STATUS = {0: "refined", 1: "frozen this step", 2: "frozen before"}
STATUS_COLORS = ["#F4C7AB", "#C0504D", "#4B2E83"]


def table(tables: Tables, layout: Layout) -> pd.DataFrame:
    """The first traced prompt's window at the end of every diffusion step, one row per position × lens.

    ``status``: 2 = frozen before the step (the window's first position), 1 = frozen by this step (the next
    step's window starts at or after it), 0 = still refined; ``iterations`` counts the core iterations the
    position has received by the end of the step.
    """
    rows = tables["wavefront"]
    require_columns(rows, ["prompt_id", "diffusion_step", "position", "site", "lens", "rank"], "wavefront")
    rows = rows[(rows["site"] == "latent") & (rows["diffusion_step"] >= 0)]
    if rows.empty:
        return pd.DataFrame(columns=COLUMNS)
    rows = rows[rows["prompt_id"] == rows["prompt_id"].min()].copy()
    rows["iterations"] = rows["recurrence"] + rows["iteration"]
    starts = rows.groupby("diffusion_step")["position"].min()
    following = starts.shift(-1)
    next_start = rows["diffusion_step"].map(following)
    frozen_now = next_start.notna() & (rows["position"] <= next_start.fillna(-1))
    rows["status"] = np.where(rows["frozen"], 2, np.where(frozen_now, 1, 0))
    return rows[COLUMNS].sort_values(["lens", "diffusion_step", "position"]).reset_index(drop=True)


def headline(tab: pd.DataFrame, layout: Layout) -> Headline:
    out: Headline = {
        "prompt_id": to_builtin(tab["prompt_id"].iloc[0]),
        "steps": int(tab["diffusion_step"].nunique()),
        "positions": int(tab["position"].nunique()),
        "frozen_during_steps": int(
            (tab.drop_duplicates(["diffusion_step", "position"])["status"] == 1).sum()
        ),
    }
    for name, d in tab.groupby("lens", sort=False):
        out[f"{name}_top1_share"] = round(float((d["rank"] == 1).mean()), 3)
    return out


def _grid(tab: pd.DataFrame, column: str, lens: str | None = None) -> tuple[np.ndarray, list[int], list[int]]:
    """``[steps, positions]``; left of each step's window the frozen positions are filled in (status 2,
    their last iteration count), right of it nothing (not yet in the window)."""
    first_lens = lens if lens is not None else tab["lens"].iloc[0]
    d = tab[tab["lens"] == first_lens]
    steps = sorted(d["diffusion_step"].unique())
    lo, hi = int(d["position"].min()), int(d["position"].max())
    positions = list(range(lo, hi + 1))
    grid = np.full((len(steps), len(positions)), np.nan)
    last: dict[int, float] = {}
    for i, step in enumerate(steps):
        window = d[d["diffusion_step"] == step]
        start = int(window["position"].min())
        if column in ("status", "iterations"):
            for p in range(lo, start):
                grid[i, p - lo] = 2 if column == "status" else last.get(p, np.nan)
        for row in window.itertuples():
            grid[i, row.position - lo] = float(getattr(row, column))
            last[row.position] = float(row.iterations)
    return grid, steps, positions


def _panels(tab: pd.DataFrame) -> list[tuple[str, str | None, str]]:
    lenses = lens_order(tab["lens"].unique())
    return [
        ("status", None, "frozen before · this step · refined"),
        ("iterations", None, "core iterations by the step's end"),
    ] + [("rank", name, f"{lens_label(name)} rank of the final next token") for name in lenses]


def _mpl(tab: pd.DataFrame, title: str) -> MplFigure:
    panels = _panels(tab)
    with mpl_style():
        fig = new_figure(3.3 * len(panels), 4.6)
        axes = fig.subplots(1, len(panels), sharey=True)
        for ax, (column, name, label) in zip(np.atleast_1d(axes), panels, strict=True):
            grid, steps, positions = _grid(tab, column, name)
            extent = (positions[0] - 0.5, positions[-1] + 0.5, steps[-1] + 0.5, steps[0] - 0.5)
            if column == "status":
                image = ax.imshow(grid, aspect="auto", extent=extent, cmap=ListedColormap(STATUS_COLORS),
                                  vmin=-0.5, vmax=2.5, interpolation="nearest")  # fmt: skip
            elif column == "rank":
                image = ax.imshow(grid, aspect="auto", extent=extent, cmap="viridis_r", interpolation="nearest",
                                  norm=LogNorm(vmin=1, vmax=max(2.0, float(np.nanmax(grid)))))  # fmt: skip
                fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
            else:
                image = ax.imshow(grid, aspect="auto", extent=extent, cmap="magma_r", interpolation="nearest")
                fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
            ax.set_title(label, fontsize=8.5)
            ax.set_xlabel("position")
            ax.grid(False)
        np.atleast_1d(axes)[0].set_ylabel("diffusion step")
        setting, prompt = tab["setting"].iloc[0], tab["prompt_id"].iloc[0]
        fig.suptitle(
            f"{title}\nwavefront of prompt {prompt} ({setting}); blank = not in the window", fontsize=10
        )
    return fig


def _plotly(tab: pd.DataFrame, title: str) -> go.Figure:
    panels = _panels(tab)
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True, subplot_titles=[p[2] for p in panels])
    for col, (column, name, _label) in enumerate(panels, start=1):
        grid, steps, positions = _grid(tab, column, name)
        z = np.log10(grid) if column == "rank" else grid
        status_scale = [[0, STATUS_COLORS[0]], [0.5, STATUS_COLORS[1]], [1, STATUS_COLORS[2]]]
        scale = {"status": status_scale, "rank": "Viridis_r", "iterations": "Magma_r"}[column]
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=positions,
                y=steps,
                colorscale=scale,
                showscale=column != "status",
                customdata=grid,
                hovertemplate="step %{y}, position %{x}: %{customdata}<extra></extra>",
                colorbar=dict(x=col / len(panels) - 0.02, len=0.8),
            ),  # fmt: skip
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="position", row=1, col=col)
    fig.update_yaxes(autorange="reversed", title_text="diffusion step", row=1, col=1)
    plotly_layout(fig, f"{title} · wavefront", 480)
    return fig


def draw(tab: pd.DataFrame, layout: Layout, title: str) -> tuple[MplFigure, go.Figure]:
    return _mpl(tab, title), _plotly(tab, title)


FIGURE = FigureSpec(
    NAME, ("wavefront",), table, draw, headline, "diffusion step × position: frozen, iterations, lens ranks"
)
