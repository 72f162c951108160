"""Shared look of the study figures: colors per lens and target, unrolled-layer axes, rank axes, saving.

One lens keeps one color in every figure and in the explorer (``probes.palette``, re-exported here);
separators between prelude / iterations / coda are drawn the same way everywhere; rank axes are
logarithmic with ``1, 10, 100, 1k, …`` labels. PNGs are written with the Agg canvas of a bare
:class:`matplotlib.figure.Figure` (no pyplot state), HTML with plotly sharing one ``plotly.min.js``
per folder. Every file is written atomically (``probes.store.atomic_write``): a full disk fails the
write and leaves no partial file behind.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib as mpl
import pandas as pd
import plotly.graph_objects as go
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from probes.palette import (
    LENS_COLORS,
    LENS_LABELS,
    TARGET_COLORS,
    TARGET_LABELS,
    TARGET_ORDER,
    lens_color,
    lens_label,
    lens_order,
    rgba,
)
from probes.store import atomic_write
from studies.figures.layout import Layout

__all__ = [
    "DPI",
    "LENS_COLORS",
    "LENS_LABELS",
    "TARGET_COLORS",
    "TARGET_LABELS",
    "TARGET_DASH",
    "TARGET_ORDER",
    "VALUE_COLORS",
    "decorate_unrolled",
    "decorate_unrolled_plotly",
    "lens_color",
    "lens_label",
    "lens_order",
    "marker_size",
    "separator_iterations",
    "mpl_style",
    "new_figure",
    "plotly_layout",
    "rank_axis",
    "rank_axis_plotly",
    "rgba",
    "save_html",
    "save_png",
    "save_table",
    "value_color",
    "write_plotly_bundle",
]

DPI = 150

TARGET_DASH: dict[str, tuple[str, str]] = {  # (matplotlib linestyle, plotly dash)
    "intermediate": ("-", "solid"),
    "final": ("-", "solid"),
    "control": (":", "dot"),
    "digit_baseline": ("--", "dash"),
}

#: Values along a variable chain (value_0 = the chain's constant, …): one colour per position in
#: the chain, the same in every figure; the final answer keeps ``TARGET_COLORS["final"]``.
VALUE_COLORS = ("#56B4E9", "#009E73", "#E69F00", "#CC79A7", "#0072B2", "#D55E00", "#999933")


def value_color(index: int) -> str:
    """Colour of the chain's ``index``-th value (0 = its constant)."""
    return VALUE_COLORS[index % len(VALUE_COLORS)]


_RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.35,
    "grid.linewidth": 0.5,
    "axes.axisbelow": True,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.dpi": DPI,
    "lines.linewidth": 1.4,
}


@contextmanager
def mpl_style() -> Iterator[None]:
    """rcParams of the study figures, applied while a figure is built."""
    with mpl.rc_context(_RC):
        yield


def new_figure(width: float, height: float, **kwargs) -> MplFigure:
    """A pyplot-free figure (Agg canvas), constrained layout."""
    return MplFigure(figsize=(width, height), layout="constrained", **kwargs)


# ---------------------------------------------------------------- unrolled axes
def iteration_ticks(layout: Layout, max_labels: int = 17) -> tuple[list[float], list[str]]:
    """Tick positions (iteration centres, plus P / C for prelude and coda) and their labels."""
    step = max(1, math.ceil(layout.steps / max_labels))
    ticks: list[float] = []
    labels: list[str] = []
    if layout.prelude:
        ticks.append((layout.prelude - 1) / 2)
        labels.append("P")
    for t in range(1, layout.steps + 1):
        # thinned: multiples of ``step``, leaving room for the P and C labels at both ends
        if (t == 1 or t % step == 0) if step == 1 else (t % step == 0 and t != layout.steps):
            ticks.append(layout.core_start + (t - 1) * layout.core + (layout.core - 1) / 2)
            labels.append(str(t))
    if layout.coda:
        ticks.append(layout.coda_start + (layout.coda - 1) / 2)
        labels.append("C")
    return ticks, labels


def separator_iterations(layout: Layout, max_lines: int = 32) -> list[int]:
    """Iterations after which a dotted separator is drawn (every one, or every k-th for long runs)."""
    step = max(1, math.ceil(layout.steps / max_lines))
    return [t for t in range(1, layout.steps) if t % step == 0]


def marker_size(layout: Layout) -> float:
    """Markers on every layer while they stay distinguishable, lines only beyond ~120 layers."""
    return 2.6 if layout.n_unrolled <= 120 else 0.0


def unrolled_xlabel(layout: Layout) -> str:
    parts = [f"P prelude ({layout.prelude})"] if layout.prelude else []
    parts.append(f"recurrent iteration t = 1…{layout.steps} ({layout.core} core blocks each)")
    parts += [f"C coda ({layout.coda})"] if layout.coda else []
    return "unrolled layer — " + ", ".join(parts)


def decorate_unrolled(ax: Axes, layout: Layout, *, xlabel: bool = True, top_index: bool = False) -> None:
    """Shade prelude and coda, draw stage and iteration separators, label iterations on x."""
    n = layout.n_unrolled
    if layout.prelude:
        ax.axvspan(-0.5, layout.core_start - 0.5, color="#000000", alpha=0.06, lw=0, zorder=0)
    if layout.coda:
        ax.axvspan(layout.coda_start - 0.5, n - 0.5, color="#000000", alpha=0.06, lw=0, zorder=0)
    for t in separator_iterations(layout):
        ax.axvline(layout.core_start + t * layout.core - 0.5, color="#b0b0b0", lw=0.5, ls=":", zorder=0.5)
    for x in (layout.core_start - 0.5, layout.coda_start - 0.5):
        ax.axvline(x, color="#606060", lw=0.9, zorder=0.5)
    ax.set_xlim(-0.5, n - 0.5)
    ticks, labels = iteration_ticks(layout)
    ax.set_xticks(ticks, labels)
    if n <= 100:
        ax.set_xticks(range(n), minor=True)
        ax.tick_params(axis="x", which="minor", length=2)
    ax.tick_params(axis="x", which="major", length=0)
    ax.grid(False, axis="x")
    if xlabel:
        ax.set_xlabel(unrolled_xlabel(layout))
    if top_index:
        top = ax.secondary_xaxis("top")
        every = _nice_step(n)
        top.set_xticks(range(0, n, every))
        top.tick_params(labelsize=7, length=2, colors="#555555")
        top.set_xlabel("unrolled layer index", fontsize=7, color="#555555")


def _nice_step(n: int) -> int:
    for step in (1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64, 100, 128):
        if n / step <= 18:
            return step
    return max(1, n // 16)


def _axis_refs(fig: go.Figure, row: int | None, col: int | None) -> tuple[str, str]:
    if row is None:
        return "x", "y"
    sub = fig.get_subplot(row, col)
    return (sub.xaxis.plotly_name.replace("axis", ""), sub.yaxis.plotly_name.replace("axis", ""))


def decorate_unrolled_plotly(
    fig: go.Figure, layout: Layout, row: int | None = None, col: int | None = None, xlabel: bool = True
) -> None:
    """Plotly twin of :func:`decorate_unrolled` for one subplot (or the only one).

    Shapes are appended in one batch (``add_vline`` per iteration is slow for 64+ iterations).
    """
    where = {"row": row, "col": col} if row is not None else {}
    x, y = _axis_refs(fig, row, col)
    n = layout.n_unrolled
    shapes: list[dict] = []
    spans = [(-0.5, layout.core_start - 0.5)] if layout.prelude else []
    spans += [(layout.coda_start - 0.5, n - 0.5)] if layout.coda else []
    for x0, x1 in spans:
        shapes.append(
            dict(
                type="rect",
                xref=x,
                yref=f"{y} domain",
                x0=x0,
                x1=x1,
                y0=0,
                y1=1,
                fillcolor="black",
                opacity=0.06,
                line_width=0,
                layer="below",
            )
        )
    for t in separator_iterations(layout):
        xt = layout.core_start + t * layout.core - 0.5
        shapes.append(
            dict(
                type="line",
                xref=x,
                yref=f"{y} domain",
                x0=xt,
                x1=xt,
                y0=0,
                y1=1,
                layer="below",
                line=dict(color="#c0c0c0", width=0.6, dash="dot"),
            )
        )
    for xs in (layout.core_start - 0.5, layout.coda_start - 0.5):
        shapes.append(
            dict(
                type="line",
                xref=x,
                yref=f"{y} domain",
                x0=xs,
                x1=xs,
                y0=0,
                y1=1,
                layer="below",
                line=dict(color="#606060", width=1),
            )
        )
    fig.layout.shapes = tuple(fig.layout.shapes) + tuple(go.layout.Shape(**sh) for sh in shapes)
    ticks, labels = iteration_ticks(layout, max_labels=24)
    fig.update_xaxes(
        range=[-0.5, n - 0.5],
        tickvals=ticks,
        ticktext=labels,
        showgrid=False,
        title_text=unrolled_xlabel(layout) if xlabel else None,
        **where,
    )


# ---------------------------------------------------------------- rank axes
def _rank_label(v: float, _pos: object = None) -> str:
    if v <= 0:
        return ""
    exp = round(math.log10(v))
    if abs(math.log10(v) - exp) > 1e-6:
        return ""
    return {0: "1", 1: "10", 2: "100", 3: "1k", 4: "10k", 5: "100k", 6: "1M"}.get(exp, f"1e{exp}")


def rank_axis(ax: Axes, label: str = "rank (log; 1 = top)", top: float | None = None) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10))
    ax.yaxis.set_major_formatter(FuncFormatter(_rank_label))
    ax.yaxis.set_minor_formatter(NullFormatter())
    lo = 0.7
    hi = max(10.0, (top or 10.0) * 1.8)
    ax.set_ylim(lo, hi)
    ax.set_ylabel(label)


def rank_axis_plotly(
    fig: go.Figure,
    row: int | None = None,
    col: int | None = None,
    label: str = "rank (log)",
    top: float | None = None,
) -> None:
    where = {"row": row, "col": col} if row is not None else {}
    hi = max(10.0, (top or 10.0) * 1.8)
    vals = [10**k for k in range(0, int(math.log10(hi)) + 1)]
    fig.update_yaxes(
        type="log",
        range=[math.log10(0.7), math.log10(hi)],
        tickvals=vals,
        ticktext=[_rank_label(v) for v in vals],
        title_text=label,
        **where,
    )


def plotly_layout(fig: go.Figure, title: str, height: int, width: int | None = None, top: int = 80) -> None:
    """Common plotly look; ``width=None`` lets the figure fill the browser window."""
    fig.update_layout(
        template="plotly_white",
        title=dict(text=title, x=0.01, xanchor="left"),
        height=height,
        width=width,
        autosize=width is None,
        font=dict(size=12),
        hovermode="closest",
        margin=dict(l=70, r=30, t=top, b=90),
        legend=dict(orientation="h", yanchor="top", y=-0.10, x=0.5, xanchor="center"),
    )


# ---------------------------------------------------------------- saving
def save_png(fig: MplFigure, path: Path, dpi: int = DPI) -> Path:
    """The figure as a PNG, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with mpl_style():
        fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    atomic_write(path, buffer.getvalue())
    return path


def save_html(fig: go.Figure, path: Path) -> Path:
    """Interactive HTML; ``plotly.min.js`` is written once beside it and shared by the folder.

    Both files are written atomically; a ``plotly.min.js`` that differs from this plotly's bundle (a
    partial one from an older writer, another plotly version) is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_plotly_bundle(path.parent)
    html = fig.to_html(include_plotlyjs="directory", full_html=True)
    atomic_write(path, html.encode("utf-8"))
    return path


def write_plotly_bundle(folder: Path) -> Path:
    """``folder/plotly.min.js`` as this plotly ships it, (re)written atomically unless already identical."""
    from plotly.offline import get_plotlyjs

    bundle = Path(folder) / "plotly.min.js"
    data = get_plotlyjs().encode("utf-8")
    try:
        if bundle.stat().st_size == len(data) and bundle.read_bytes() == data:
            return bundle
    except OSError:
        pass
    atomic_write(bundle, data)
    return bundle


def save_table(table: pd.DataFrame, path: Path) -> Path:
    """A figure's table as Parquet, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    atomic_write(path, buffer.getvalue())
    return path
