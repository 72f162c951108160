"""Plotly figure builders for the explorer: pure functions of tidy DataFrames, no Streamlit.

Inputs follow the run tables (``probes.records``): rank rows have ``prompt_id, lens, target_kind,
unrolled_index, site, iteration, block, rank``; hover tables map ``(lens, prompt_id, unrolled_index)``
or ``(lens, unrolled_index)`` to an HTML string of decoded top tokens; dynamics rows have
``prompt_id, position, iteration, step_norm, cos_to_last, pc1..pc3``; exit-gate rows have
``prompt_id, position, iteration, gate_lambda, exit_prob, exit_cdf``. The stages along an unrolled
axis come from the model's layout (:class:`lens.layout.Unrolled`: a run's manifest, or the live
model), never from the rows. Every builder returns a ``go.Figure`` and accepts empty input (an empty
figure with a note).

Example:
    >>> import pandas as pd
    >>> rows = pd.DataFrame({"prompt_id": [0, 0], "lens": "coda", "target_kind": "final",
    ...                      "unrolled_index": [0, 1], "site": ["prelude.0", "coda.0"],
    ...                      "iteration": [0, 0], "block": [0, 0], "rank": [40, 1]})
    >>> fig = rank_trajectory(rows)
    >>> fig.layout.yaxis.type
    'log'
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lens.layout import Unrolled
from probes.palette import LENS_ORDER, TARGET_ORDER, band_trace, lens_color, rgba, target_color

__all__ = [
    "DASHES",
    "PROMPT_HOVER",
    "RANK_FLOOR",
    "RUN_COLORS",
    "accuracy_by_depth",
    "cell_budget",
    "compare_trajectories",
    "empty_figure",
    "exit_gate_curves",
    "exit_gate_heatmap",
    "exit_trace_chart",
    "heatmap_grid",
    "hover_by_layer",
    "intermediate_vs_final",
    "layer_label",
    "lens_grid",
    "numeric_share",
    "overlay_trajectories",
    "overview_figure",
    "pca_projections",
    "pca_trajectories",
    "power_label",
    "probability_entropy",
    "rank_heatmap",
    "rank_range",
    "rank_trajectory",
    "series_label",
    "short_token",
    "step_curves",
    "steps_used_bar",
    "token_html",
    "token_label",
    "verdict_bar",
    "verdict_help",
]

#: With several targets on one figure each gets the next dash (lenses and targets keep the colours and
#: the order of ``probes.palette``, the same as in the study figures).
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
_FONT = dict(family="Inter, -apple-system, Segoe UI, Helvetica, Arial, sans-serif", size=13)
_MARGIN = dict(l=60, r=20, t=60, b=50)
_HOVER = dict(
    bgcolor="rgba(255,255,255,0.95)", bordercolor="#999", font=dict(size=12, color="#222"), align="left"
)
_MARGIN_LEGEND = dict(l=60, r=20, t=60, b=110)
_LEGEND_BELOW = dict(orientation="h", yanchor="top", x=0, xanchor="left")


def _style(
    fig: go.Figure,
    *,
    height: int,
    title: str | None = None,
    margin: dict | None = None,
    legend_below: bool = False,
    background: str = "white",
    **layout: Any,
) -> None:
    """Every explorer chart's look in one place: the font, the hover box, the plot area's colour and a
    left-aligned title; ``legend_below`` puts a horizontal legend under the x-axis title (and leaves
    room for it). ``layout`` is the chart's own (axes, shapes…) and wins over these."""
    common: dict[str, Any] = dict(
        height=height,
        font=_FONT,
        hoverlabel=_HOVER,
        margin=margin or (_MARGIN_LEGEND if legend_below else _MARGIN),
        plot_bgcolor=background,
    )
    if title:
        common["title"] = dict(text=title, x=0, xanchor="left", font=dict(size=16))
    if legend_below:  # 58 px under a plot area of the legend margin's height: under the x-axis title
        plot = max(height - _MARGIN_LEGEND["t"] - _MARGIN_LEGEND["b"], 100)
        common["legend"] = {**_LEGEND_BELOW, "y": -58 / plot}
    fig.update_layout(**(common | layout))


_SPECIAL = re.compile(r"^<\|(.+)\|>$")


def token_label(token: str | None) -> str:
    """A token as plain text for a widget, a table or a metric: spaces ``␣``, newlines ``↵``, tabs ``⇥``.

    Streamlit shows widget labels as they are, so nothing is HTML-escaped here (``token_html`` is the
    escaped form for plotly, which reads markup).
    """
    if token is None or (isinstance(token, float) and math.isnan(token)):
        return ""
    return str(token).replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def token_html(token: str | None) -> str:
    """``token_label`` HTML-escaped, for plotly text, ticks and hover (plotly reads ``<b>``, ``<br>``)."""
    return _escape(token_label(token))


def short_token(token: str | None, budget: int) -> str:
    """``token_label`` cut to ``budget`` characters for a narrow cell (HTML-escaped after cutting, so an
    entity is never cut in half); special tokens ``<|end_text|>`` are written ``⟨end_text⟩`` first."""
    text = token_label(token)
    special = _SPECIAL.match(text)
    if special:
        text = f"⟨{special.group(1)}⟩"
    if len(text) > budget:
        text = text[: max(budget - 1, 1)] + "…"
    return _escape(text)


def cell_budget(columns: int, width_px: int = 1000, char_px: float = 7.5) -> int:
    """Characters that fit in one of ``columns`` equal cells across ``width_px`` (at least 2, at most 10)."""
    return int(min(10, max(2, width_px / max(columns, 1) / char_px)))


def layer_label(site: str, iteration: int) -> str:
    """``core.1 · t=3`` for recurrent sites, the site name otherwise."""
    if str(site).startswith(("core", "adapter")) or site == "latent":
        return f"{site} · t={int(iteration)}"
    return str(site)


def series_label(lens: str, target_kind: str) -> str:
    return f"{lens} lens · {target_kind}"


def _series_order(lens: str, kind: str) -> tuple:
    lens_rank = LENS_ORDER.index(lens) if lens in LENS_ORDER else len(LENS_ORDER)
    kind_rank = TARGET_ORDER.index(kind) if kind in TARGET_ORDER else len(TARGET_ORDER)
    return lens_rank, lens, kind_rank, kind


def empty_figure(message: str, height: int = 260) -> go.Figure:
    """A blank figure carrying a centred note (for selections with no data)."""
    fig = go.Figure()
    fig.add_annotation(
        text=message,
        showarrow=False,
        font=dict(size=15, color="#666"),
        xref="paper",
        yref="paper",
        x=0.5,
        y=0.5,
    )
    fig.update_layout(
        height=height,
        xaxis=dict(visible=False),
        yaxis=dict(visible=False),
        margin=dict(l=10, r=10, t=30, b=10),
        font=_FONT,
    )
    return fig


def _stage_shapes(
    layout: Unrolled | None,
    *,
    x_scale: float = 1.0,
    col: int | None = None,
    labels: bool = True,
    inside: bool = False,
) -> tuple[list[dict], list[dict]]:
    """Shapes shading prelude and coda and marking iteration boundaries, and annotations naming the
    stages along the top: plain dicts, set in one layout update by the caller (``add_vline`` per
    line re-validates the whole layout and is slow with many iterations). No layout, no stages."""
    if layout is None:
        return [], []
    L, P, C, J, T = layout.n_unrolled, layout.prelude, layout.coda, layout.core, layout.steps
    xref = "x" if col in (None, 1) else f"x{col}"
    yref = xref.replace("x", "y") + " domain"

    def sx(x: float) -> float:
        return x * x_scale

    shapes: list[dict] = []
    band = dict(type="rect", xref=xref, yref=yref, y0=0, y1=1, line=dict(width=0), layer="below")
    if P:
        shapes.append({**band, "x0": sx(-0.5), "x1": sx(P - 0.5), "fillcolor": "rgba(120,120,160,0.10)"})
    if C:
        shapes.append(
            {**band, "x0": sx(L - C - 0.5), "x1": sx(L - 0.5), "fillcolor": "rgba(160,120,120,0.10)"}
        )
    if J and T > 1:
        stride = max(1, math.ceil(T / 16))
        for t in range(stride, T, stride):
            x = sx(P + t * J - 0.5)
            shapes.append(
                dict(
                    type="line",
                    xref=xref,
                    yref=yref,
                    x0=x,
                    x1=x,
                    y0=0,
                    y1=1,
                    layer="below",
                    line=dict(color="rgba(0,0,0,0.10)", width=1, dash="dot"),
                )
            )
    notes: list[dict] = []
    if labels:
        marks = []
        if P:
            marks.append((sx((P - 1) / 2), "prelude"))
        if J and T:
            marks.append((sx(P + (J * T - 1) / 2), f"core × {T}"))
        if C:
            marks.append((sx(L - C + (C - 1) / 2), "coda"))
        notes = [
            dict(
                x=x,
                y=0.99 if inside else 1.0,
                xref=xref,
                yref=yref if inside else "paper",
                yanchor="top" if inside else "bottom",
                text=text,
                showarrow=False,
                font=dict(size=11, color="#666"),
            )
            for x, text in marks
        ]
    return shapes, notes


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def power_label(exponent: int) -> str:
    """``10**exponent`` as a plain number up to 1,000 and as ``10⁴`` beyond (never an SI prefix: a rank
    or a relative step is a pure number, ``1k`` or ``100μ`` would read as a unit)."""
    if 0 <= exponent <= 3:
        return f"{10**exponent:,}"
    return "10" + str(exponent).translate(_SUPERSCRIPT)


def _log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Tick positions (log10 values) and labels 1, 10, 100, 1,000, 10⁴ … covering ``[lo, hi]`` ranks."""
    top = max(1, math.ceil(math.log10(max(hi, 1))))
    exponents = range(0, top + 1)
    return [float(e) for e in exponents], [power_label(e) for e in exponents]


#: Room kept below rank 1 on a log rank axis (in decades): a lens that reaches the top is drawn clearly
#: above the bottom edge, not on it.
RANK_FLOOR = 0.45


def _hover_lookup(hover: pd.DataFrame | None, keys: Sequence[str]) -> dict[tuple, str]:
    if hover is None or hover.empty:
        return {}
    return dict(zip(map(tuple, hover[list(keys)].to_numpy().tolist()), hover["top"], strict=False))


def _trajectory_traces(
    rows: pd.DataFrame,
    hover: pd.DataFrame | None,
    agg_hover: pd.DataFrame | None,
    *,
    show_prompts: bool,
    x_scale: float = 1.0,
    legend: bool = True,
    color_by: str = "lens",
) -> list[go.Scatter]:
    """Thin per-prompt lines (one trace per series, gaps between prompts) and a bold median per series."""
    traces: list[go.Scatter] = []
    many = rows["prompt_id"].nunique() > 1
    per_prompt = {} if many else _hover_lookup(hover, ["lens", "prompt_id", "unrolled_index"])
    per_layer = _hover_lookup(agg_hover, ["lens", "unrolled_index"]) if many else {}
    groups = sorted(
        rows.groupby(["lens", "target_kind"], sort=False), key=lambda item: _series_order(*item[0])
    )
    kinds = sorted(rows["target_kind"].unique(), key=lambda k: _series_order("", k)[2:])
    for (lens, kind), group in groups:
        color = lens_color(lens) if color_by == "lens" else target_color(kind)
        dash = DASHES[kinds.index(kind) % len(DASHES)] if color_by == "lens" else "solid"  # one target: solid
        name = series_label(lens, kind)
        group = group.sort_values(["prompt_id", "unrolled_index"])
        if show_prompts and many:
            x, y, custom = _prompt_lines(group, x_scale)
            traces.append(
                go.Scatter(
                    x=x,
                    y=y,
                    mode="lines",
                    line=dict(color=rgba(color, 0.28), width=1),
                    name=f"{name} (prompts)",
                    legendgroup=name,
                    showlegend=False,
                    customdata=custom,
                    connectgaps=False,
                    hovertemplate=PROMPT_HOVER,
                )
            )
        med = (
            group.groupby("unrolled_index")
            .agg(rank=("rank", "median"), site=("site", "first"), iteration=("iteration", "first"))
            .reset_index()
        )
        if many:
            tops = [per_layer.get((lens, u), "") for u in med["unrolled_index"]]
            head = f"median of {group['prompt_id'].nunique()} prompts"
        else:
            pid = group["prompt_id"].iloc[0]
            tops = [per_prompt.get((lens, pid, u), "") for u in med["unrolled_index"]]
            head = f"prompt #{pid}"
        text = [
            f"<b>{name}</b> · {layer_label(s, t)}<br>{head}: rank %{{y:,.0f}}<br>{top}"
            for s, t, top in zip(med["site"], med["iteration"], tops, strict=True)
        ]
        traces.append(
            go.Scatter(
                x=med["unrolled_index"] * x_scale,
                y=med["rank"],
                mode="lines+markers",
                name=name,
                legendgroup=name,
                showlegend=legend,
                line=dict(color=color, width=3, dash=dash),
                marker=dict(size=5, color=color),
                customdata=None
                if many
                else np.stack([np.full(len(med), pid), med["unrolled_index"]], axis=1),
                hovertemplate=[t + "<extra></extra>" for t in text],
            )
        )
    return traces


#: Hover of a thin per-prompt line: which prompt and layer (``customdata``), and that a click opens it.
PROMPT_HOVER = (
    "prompt #%{customdata[0]} · layer %{customdata[1]}<br>rank %{y:,.0f}<br>"
    "<i>click to open this prompt</i><extra></extra>"
)


def _prompt_lines(group: pd.DataFrame, x_scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All prompts of one series as one line with a gap (NaN) between prompts; ``customdata`` holds
    ``(prompt_id, unrolled_index)`` per point.

    Only numbers are shipped per point (a 100-prompt × 68-layer series has 6,800 points): the decoded
    top tokens are on the bold median's hover and in the prompt's own view, one click away.
    """
    g = group.sort_values(["prompt_id", "unrolled_index"])
    pid = g["prompt_id"].to_numpy(dtype=np.float32)  # float32: exact for ids, layers and ranks < 2**24,
    layer = g["unrolled_index"].to_numpy(dtype=np.float32)  # and half the bytes sent to the browser
    starts = np.flatnonzero(np.diff(pid)) + 1  # where each next prompt begins
    x = np.insert(layer * np.float32(x_scale), starts, np.nan)
    y = np.insert(g["rank"].to_numpy(dtype=np.float32), starts, np.nan)
    custom = np.stack([np.insert(pid, starts, np.nan), np.insert(layer, starts, np.nan)], axis=1)
    return x, y, custom


def _rank_axis(y_range: tuple[float, float] | None) -> dict:
    """A log rank axis: 1 (the top) drawn with room below it, ticks 1, 10, 100, 1,000, 10⁴ …"""
    hi = max(y_range[1], 10.0) if y_range is not None else 10.0
    tickvals, ticktext = _log_ticks(1, hi * 1.3)
    return dict(
        type="log",
        title="rank (log, 1 = top)",
        gridcolor="rgba(0,0,0,0.08)",
        zeroline=False,
        range=[math.log10(RANK_FLOOR), math.log10(hi * 1.3)],
        tickvals=[10**v for v in tickvals],
        ticktext=ticktext,
    )


def rank_range(*frames: pd.DataFrame) -> tuple[float, float] | None:
    """A shared ``(min, max)`` rank over frames, for side-by-side figures."""
    vals = [f["rank"] for f in frames if f is not None and len(f)]
    if not vals:
        return None
    allv = pd.concat(vals)
    return float(max(allv.min(), 1)), float(allv.max())


def rank_trajectory(
    rows: pd.DataFrame,
    hover: pd.DataFrame | None = None,
    agg_hover: pd.DataFrame | None = None,
    *,
    title: str | None = None,
    show_prompts: bool = True,
    y_range: tuple[float, float] | None = None,
    height: int = 440,
    color_by: str = "lens",
    layout: Unrolled | None = None,
) -> go.Figure:
    """Rank of the target along the unrolled depth on a log axis: the median over prompts in bold,
    each prompt as a thin line; hover shows the decoded top tokens at that layer. ``layout`` (the
    model's, at the run's depth) shades the prelude and coda and marks the iterations."""
    if rows is None or rows.empty:
        return empty_figure("no rank records for this selection")
    width = layout.n_unrolled if layout is not None else int(rows["unrolled_index"].max()) + 1
    fig = go.Figure(_trajectory_traces(rows, hover, agg_hover, show_prompts=show_prompts, color_by=color_by))
    shapes, notes = _stage_shapes(layout)
    _style(
        fig,
        height=height,
        title=title,
        legend_below=True,
        shapes=shapes,
        annotations=notes,
        hovermode="closest",
        xaxis=dict(
            title="unrolled layer (prelude → core iterations → coda)",
            gridcolor="rgba(0,0,0,0.05)",
            range=[-0.7, width - 0.3],
            zeroline=False,
        ),
        yaxis=_rank_axis(y_range or rank_range(rows)),
    )
    return fig


def heatmap_grid(
    rows: pd.DataFrame, layout: Unrolled | None = None, like: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Median rank per unrolled layer laid out as stage/iteration rows × block columns.

    Returns ``(cells, row_labels, col_labels)`` where ``cells`` has ``row, col, unrolled_index,
    site, iteration, rank`` (rows: ``prelude``, ``t=1`` … ``t=T``, ``coda``; top to bottom). With the
    model's ``layout`` every stage row and block column is shown, recorded or not; without it the rows
    and columns are those of ``like`` (every panel's rows, so panels side by side line up) or ``rows``.
    """
    med = (
        rows.groupby("unrolled_index")
        .agg(
            rank=("rank", "median"),
            site=("site", "first"),
            iteration=("iteration", "first"),
            block=("block", "first"),
        )
        .reset_index()
    )
    med["row"] = _grid_row(med)
    med["col"] = med["block"].astype(int)
    if layout is not None:
        row_labels = (
            (["prelude"] if layout.prelude else [])
            + [f"t={t}" for t in range(1, layout.steps + 1)]
            + (["coda"] if layout.coda else [])
        )
        return med, row_labels, [f"b{j}" for j in range(max(layout.prelude, layout.core, layout.coda))]
    ref = like if like is not None and len(like) else rows
    kind = ref["site"].astype(str).str.split(".").str[0]
    steps = sorted(ref.loc[kind == "core", "iteration"].unique())
    row_labels = (
        (["prelude"] if (kind == "prelude").any() else [])
        + [f"t={t}" for t in steps]
        + (["coda"] if (kind == "coda").any() else [])
    )
    width = int(ref["block"].max()) + 1 if len(ref) else 0
    return med, row_labels, [f"b{j}" for j in range(width)]


def _grid_row(frame: pd.DataFrame) -> np.ndarray:
    kind = frame["site"].astype(str).str.split(".").str[0]
    return np.where(kind == "core", "t=" + frame["iteration"].astype(str), kind)


def rank_heatmap(
    rows: pd.DataFrame,
    hover: pd.DataFrame | None = None,
    *,
    title: str | None = None,
    z_range: tuple[float, float] | None = None,
    height: int | None = None,
    show_scale: bool = True,
    layout: Unrolled | None = None,
    like: pd.DataFrame | None = None,
    missing: str = "not decoded by this lens",
) -> go.Figure:
    """Iteration × block heat map of the (median) rank of one lens and target, log colour scale.

    ``hover`` maps ``unrolled_index`` to top-token text (column ``top``). Rows and columns come from
    the model's ``layout`` (or ``like``), so panels of different lenses line up; a cell the lens does
    not decode (the Coda Lens at the coda) is grey, and its hover says why (``missing``).
    """
    if rows is None or rows.empty:
        return empty_figure("no rank records for this selection")
    cells, row_labels, col_labels = heatmap_grid(rows, layout, like)
    R, C = len(row_labels), len(col_labels)
    z = np.full((R, C), np.nan)
    text = np.full((R, C), "", dtype=object)
    hover_text = np.full((R, C), "", dtype=object)
    blocks = {"prelude": layout.prelude, "coda": layout.coda} if layout is not None else {}
    for r, label in enumerate(row_labels):
        stage = label if label in ("prelude", "coda") else "core"
        have = blocks.get(stage, layout.core if layout is not None else C)
        for k in range(C):
            hover_text[r, k] = f"<b>{label} · b{k}</b><br>" + (
                missing if k < have else f"the {stage} has {have} block{'s' if have != 1 else ''}"
            )
    tops = (
        {} if hover is None or hover.empty else dict(zip(hover["unrolled_index"], hover["top"], strict=False))
    )
    rindex = {label: i for i, label in enumerate(row_labels)}
    for c in cells.itertuples():
        if c.row not in rindex or c.col >= C:
            continue
        r, k = rindex[c.row], c.col
        z[r, k] = math.log10(max(c.rank, 1))
        text[r, k] = f"{c.rank:,.0f}"
        hover_text[r, k] = (
            f"<b>{layer_label(c.site, c.iteration)}</b> (layer {c.unrolled_index})<br>"
            f"rank {c.rank:,.0f}<br>{tops.get(c.unrolled_index, '')}"
        )
    lo, hi = (
        z_range if z_range is not None else (1.0, float(np.nanmax(10**z)) if np.isfinite(z).any() else 10.0)
    )
    tickvals, ticktext = _log_ticks(lo, hi)
    show_text = R * C <= 160 and R <= 40  # numbers in cells only where rows are tall enough to read them
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=col_labels,
            y=row_labels,
            text=text if show_text else None,
            texttemplate="%{text}" if show_text else None,
            textfont=dict(size=11),
            customdata=hover_text,
            hovertemplate="%{customdata}<extra></extra>",
            hoverongaps=True,
            colorscale="Viridis_r",
            zmin=math.log10(max(lo, 1)),
            zmax=max(math.log10(max(hi, 1)), 0.5),
            showscale=show_scale,
            colorbar=dict(title=dict(text="rank"), tickvals=tickvals, ticktext=ticktext, len=0.9),
            xgap=2,
            ygap=2,
        )
    )
    _style(
        fig,
        height=height or min(900, max(260, 70 + 26 * R)),
        title=title,
        background="#e9e9ee",  # cells without a value (not decoded, no such block) show as grey
        yaxis=dict(autorange="reversed", title=None, tickfont=dict(size=11)),
        xaxis=dict(side="bottom", title=dict(text="core block", font=dict(size=12)), tickangle=0),
    )
    return fig


def lens_grid(
    cells: pd.DataFrame,
    position_tokens: Sequence[str],
    *,
    title: str | None = None,
    height: int | None = None,
) -> go.Figure:
    """The classic logit-lens picture: layers × positions, the top-1 token in each cell, coloured by its
    probability.

    ``cells`` has ``row`` (layer label, in bottom-to-top order of first appearance), ``position``,
    ``token``, ``prob`` and optionally ``hover``; ``position_tokens`` labels the x axis (the input token
    at each position: the lens predicts the token after it).
    """
    if cells is None or cells.empty:
        return empty_figure("nothing to show: run the probe first")
    rows = list(dict.fromkeys(cells["row"]))
    positions = sorted(cells["position"].unique())
    rindex = {r: i for i, r in enumerate(rows)}
    pindex = {p: i for i, p in enumerate(positions)}
    z = np.full((len(rows), len(positions)), np.nan)
    text = np.full(z.shape, "", dtype=object)
    hov = np.full(z.shape, "", dtype=object)
    budget = cell_budget(len(positions))  # characters that fit in a cell: wide grids get short labels
    for c in cells.itertuples():
        i, j = rindex[c.row], pindex[c.position]
        z[i, j] = c.prob
        text[i, j] = short_token(c.token, budget)
        hov[i, j] = getattr(c, "hover", None) or f"{token_html(c.token)} {c.prob:.3f}"
    labels = [
        short_token(position_tokens[p], max(budget, 4)) if 0 <= p < len(position_tokens) else str(p)
        for p in positions
    ]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(len(positions))),
            y=list(range(len(rows))),
            text=text,
            texttemplate="%{text}",
            textfont=dict(size=11),
            customdata=hov,
            zmin=0,
            zmax=1,
            colorscale="Blues",
            xgap=1,
            ygap=1,
            hovertemplate="%{customdata}<extra></extra>",
            colorbar=dict(title=dict(text="p(top-1)"), len=0.9),
        )
    )
    _style(
        fig,
        height=height or min(1400, max(300, 130 + 30 * len(rows))),
        title=title,
        margin=dict(l=120, r=20, t=50, b=80),
        xaxis=dict(
            tickmode="array",
            tickvals=list(range(len(positions))),
            ticktext=labels,
            side="bottom",
            title=dict(
                text="input token at each position (a cell predicts the token after it)", font=dict(size=12)
            ),
            tickangle=0 if len(positions) <= 24 else -60,
            tickfont=dict(size=12),
        ),
        yaxis=dict(tickmode="array", tickvals=list(range(len(rows))), ticktext=rows, title=None),
    )
    return fig


def _trajectory_label(key: object, color_by: str, labels: Mapping | None) -> str:
    if labels and key in labels:
        return str(labels[key])
    return f"{'prompt #' if color_by == 'prompt_id' else 'position '}{key}"


def step_curves(
    dyn: pd.DataFrame,
    metric: str = "step_norm",
    *,
    color_by: str = "prompt_id",
    labels: Mapping | None = None,
    title: str | None = None,
    height: int = 380,
) -> go.Figure:
    """A per-iteration latent statistic (``step_norm`` on a log axis, ``cos_to_last``, ``norm``), one line
    per trajectory and the median in black."""
    data = dyn.dropna(subset=[metric]) if dyn is not None and len(dyn) else None
    if data is None or data.empty:
        return empty_figure("no dynamics records for this selection")
    fig = go.Figure()
    groups = list(data.groupby(color_by, sort=True))
    palette = _palette(len(groups))
    # a marker per iteration helps read a short loop; past 24 iterations the line alone is as clear and
    # the browser draws hundreds of SVG markers fewer (T = 64, 6 positions: 768 per chart)
    mode = "lines+markers" if data["iteration"].nunique() <= 24 else "lines"
    for (key, g), color in zip(groups, palette, strict=True):
        g = g.sort_values("iteration")
        verdict = g["verdict"].iloc[0] if "verdict" in g and isinstance(g["verdict"].iloc[0], str) else ""
        label = _trajectory_label(key, color_by, labels) + (f" · {verdict}" if verdict else "")
        fig.add_trace(
            go.Scatter(
                x=g["iteration"],
                y=g[metric],
                mode=mode,
                name=label,
                line=dict(color=color, width=1.5),
                marker=dict(size=4),
                opacity=0.85,
                hovertemplate=f"{label}<br>t=%{{x}}<br>{metric} %{{y:.4g}}<extra></extra>",
            )
        )
    if len(groups) > 1:
        med = data.groupby("iteration")[metric].median()
        fig.add_trace(
            go.Scatter(
                x=med.index,
                y=med.values,
                mode="lines",
                name="median",
                line=dict(color="black", width=3),
                hovertemplate=f"median<br>t=%{{x}}<br>{metric} %{{y:.4g}}<extra></extra>",
            )
        )
    names = {
        "step_norm": "relative step (log)",
        "cos_to_last": "cosine to the last iteration",
        "norm": "‖hₜ‖",
    }
    _style(
        fig,
        height=height,
        title=title,
        legend=dict(font=dict(size=11)) if len(groups) <= 12 else dict(visible=False),
        showlegend=len(groups) <= 12,
        xaxis=dict(
            title="iteration t",
            dtick=max(1, math.ceil(int(data["iteration"].max()) / 8)),
            tickangle=0,
            gridcolor="rgba(0,0,0,0.06)",
        ),
        yaxis=dict(
            title=names.get(metric, metric),
            type="log" if metric == "step_norm" else "linear",
            exponentformat="power",  # 10⁻⁴, not "100μ": a relative step has no unit
            gridcolor="rgba(0,0,0,0.08)",
            **(_log_axis_ticks(data[metric]) if metric == "step_norm" else {}),
        ),
    )
    return fig


def _log_axis_ticks(values: pd.Series) -> dict:
    """Ticks of a log axis for ``values``: one per power of ten when they span one; within one decade
    (where plotly would label nothing, or a lone digit) at 1, 2, 5 × 10ᵏ, every digit × 10ᵏ, or else the
    two ends, labelled as plain numbers (never an SI prefix)."""
    positive = values[np.isfinite(values) & (values > 0)]  # a damaged run can hold inf (a zero state)
    if positive.empty:
        return dict(dtick=1)
    lo, hi = float(positive.min()), float(positive.max())
    first = math.floor(math.log10(lo))
    if math.floor(math.log10(hi)) > first:
        return dict(dtick=1)
    ticks = [lo, hi] if hi > lo else [lo]
    for digits in ((1, 2, 5), range(1, 10)):
        steps = [d * 10.0**first for d in digits if lo <= d * 10.0**first <= hi * (1 + 1e-9)]
        if len(steps) >= 2:
            ticks = steps
            break
    return dict(tickvals=ticks, ticktext=[_plain_number(t) for t in ticks])


def _plain_number(value: float) -> str:
    """Three significant digits, ``2.5×10⁻⁵`` outside 0.001 … 9,999 (never ``25μ``)."""
    exponent = math.floor(math.log10(value))
    if -3 <= exponent <= 2:
        return f"{value:.3g}"
    if exponent == 3:
        return f"{value:,.0f}"
    return f"{value / 10.0**exponent:.3g}×{power_label(exponent)}"


def _palette(n: int) -> list[str]:
    import plotly.colors as pc

    base = pc.qualitative.Plotly + pc.qualitative.D3
    if n <= len(base):
        return base[:n]
    return pc.sample_colorscale("Turbo", [i / max(n - 1, 1) for i in range(n)])


def _joined_trajectories(groups: list[tuple[object, pd.DataFrame]], palette: Sequence[str]) -> pd.DataFrame:
    """Every trajectory's rows in iteration order, one after another, each followed by a row of NaN (a
    break in the line), with its colour and its group key: one trace draws them all."""
    parts = []
    for (key, g), color in zip(groups, palette, strict=True):
        g = g.sort_values("iteration").assign(_key=[key] * len(g), _color=color)
        parts.append(g)
        parts.append(pd.DataFrame({"_key": [key], "_color": [color]}))
    return pd.concat(parts, ignore_index=True)


def _faded(color: str, share: float) -> str:
    """``color`` mixed with white, from a pale quarter of it (``share`` 0) to all of it (``share`` 1)."""
    mix = 0.25 + 0.75 * float(share)
    return "rgb({:.0f},{:.0f},{:.0f})".format(*(255 * (1 - mix + mix * v) for v in _unit_rgb(color)))


@functools.lru_cache(maxsize=256)
def _unit_rgb(color: str) -> tuple[float, ...]:
    """A plotly colour (``#RRGGBB``, ``rgb(...)``) as 0-1 floats; cached: a 3-D scene asks once per vertex
    for a handful of colours (6,400 conversions took ~0.2 s of a 100 × 64 scene's 0.8 s)."""
    import plotly.colors as pc

    return tuple(pc.convert_colors_to_same_type([color], colortype="tuple")[0][0])


def _legend_note(palette: Sequence[str], labels: list[str]) -> dict:
    """The legend of a one-trace figure as a note above the plot: a coloured ■ and the label of each
    trajectory (an annotation costs no WebGL object; a trace per entry would)."""
    entries = [f"<span style='color:{c}'>■</span> {lab}" for c, lab in zip(palette, labels, strict=True)]
    return dict(
        text="  ".join(entries),
        x=0,
        y=1.0,
        xref="paper",
        yref="paper",
        xanchor="left",
        yanchor="bottom",
        showarrow=False,
        align="left",
        font=dict(size=11),
    )


def pca_trajectories(
    dyn: pd.DataFrame,
    dims: int = 2,
    *,
    color_by: str = "prompt_id",
    labels: Mapping | None = None,
    title: str | None = None,
    height: int = 480,
) -> go.Figure:
    """Latent trajectories across iterations in their first principal components (2-D or 3-D). In 2-D
    each trajectory is a line from ○ (t=1) to ◆ (t=T), markers shaded by iteration; in 3-D a line that
    goes from pale (t=1) to its full colour (t=T).

    The 3-D scene is kept to what a browser without a graphics card draws quickly (it renders WebGL in
    software): every trajectory in ONE trace (per-vertex colours, a NaN row between trajectories), its
    legend a note above the plot, lines without markers, no axes. Each trace, the markers and the axes
    (box, grid, titles, tick labels) each cost tenths of a second there: switching to 3-D in the explorer
    took 1.8-2.4 s before (a trace per trajectory, markers, axes), 0.7-1.1 s now."""
    cols = ["pc1", "pc2", "pc3"][:dims]
    data = dyn.dropna(subset=cols) if dyn is not None and len(dyn) else None
    if data is None or data.empty:
        return empty_figure("no PCA coordinates for this selection")
    fig = go.Figure()
    groups = list(data.groupby(color_by, sort=True))
    palette = _palette(len(groups))
    T = int(data["iteration"].max())
    if dims == 3:
        joined = _joined_trajectories(groups, palette)
        names = {key: _trajectory_label(key, color_by, labels) for key, _ in groups}
        t = joined["iteration"]
        shade = ((t - 1) / max(T - 1, 1)).fillna(1.0)
        fig.add_trace(
            go.Scatter3d(
                x=joined["pc1"],
                y=joined["pc2"],
                z=joined["pc3"],
                mode="lines",
                name="trajectories",
                line=dict(
                    color=[_faded(c, s) for c, s in zip(joined["_color"], shade, strict=True)], width=5
                ),
                customdata=np.column_stack([joined["_key"].map(names), t.fillna(0).astype(int)]),
                hovertemplate="%{customdata[0]}<br>t=%{customdata[1]}<extra></extra>",
                connectgaps=False,
                showlegend=False,
            )
        )
        if len(groups) <= 12:
            fig.add_annotation(**_legend_note(palette, list(names.values())))
    for (key, g), color in zip(groups if dims == 2 else [], palette, strict=False):
        g = g.sort_values("iteration")
        label = _trajectory_label(key, color_by, labels)
        fig.add_trace(
            go.Scatter(
                x=g["pc1"],
                y=g["pc2"],
                mode="lines+markers",
                name=label,
                line=dict(color=color, width=1.5),
                marker=dict(
                    color=g["iteration"],
                    colorscale="Greys",
                    cmin=0,
                    cmax=T,
                    size=[9 if t in (1, T) else 5 for t in g["iteration"]],
                    symbol=[
                        "circle-open" if t == 1 else "diamond" if t == T else "circle" for t in g["iteration"]
                    ],
                    line=dict(color=color, width=1.5),
                ),
                customdata=g["iteration"],
                hovertemplate=f"{label}<br>t=%{{customdata}}<extra></extra>",
            )
        )
    _style(
        fig,
        height=height,
        title=title,
        legend=dict(font=dict(size=11)),
        showlegend=dims == 2 and len(groups) <= 12,
    )
    if dims == 3:
        # No axes (box, grid, text, spikes): in software WebGL they cost more than the lines, and a PC's
        # values mean little here (each trajectory has its own PCs); the title names the axes.
        hidden = dict(visible=False)
        fig.update_layout(
            scene=dict(xaxis=hidden, yaxis=hidden, zaxis=hidden),
            margin=dict(l=0, r=0, t=70, b=0),
        )
    else:
        fig.update_layout(
            xaxis=dict(title="PC1", zeroline=False, gridcolor="rgba(0,0,0,0.06)"),
            yaxis=dict(
                title="PC2", zeroline=False, gridcolor="rgba(0,0,0,0.06)", scaleanchor="x", scaleratio=1
            ),
        )
    return fig


def pca_projections(
    dyn: pd.DataFrame,
    *,
    color_by: str = "prompt_id",
    labels: Mapping | None = None,
    title: str | None = None,
    height: int = 400,
) -> go.Figure:
    """The first three principal components as three flat views (PC1–PC2, PC1–PC3, PC2–PC3): the third
    dimension of a trajectory without a WebGL scene (which a browser without a GPU draws slowly)."""
    cols = ["pc1", "pc2", "pc3"]
    data = dyn.dropna(subset=cols) if dyn is not None and len(dyn) else None
    if data is None or data.empty:
        return empty_figure("no PCA coordinates for this selection")
    pairs = [("pc1", "pc2"), ("pc1", "pc3"), ("pc2", "pc3")]
    fig = make_subplots(
        rows=1,
        cols=3,
        horizontal_spacing=0.06,
        subplot_titles=[f"{a.upper()} × {b.upper()}" for a, b in pairs],
    )
    groups = list(data.groupby(color_by, sort=True))
    T = int(data["iteration"].max())
    for (key, g), color in zip(groups, _palette(len(groups)), strict=True):
        g = g.sort_values("iteration")
        label = _trajectory_label(key, color_by, labels)
        symbols = ["circle-open" if t == 1 else "diamond" if t == T else "circle" for t in g["iteration"]]
        sizes = [9 if t in (1, T) else 4 for t in g["iteration"]]
        for col, (a, b) in enumerate(pairs, start=1):
            fig.add_trace(
                go.Scatter(
                    x=g[a],
                    y=g[b],
                    mode="lines+markers",
                    name=label,
                    legendgroup=label,
                    showlegend=col == 1,
                    line=dict(color=color, width=1.5),
                    marker=dict(color=color, size=sizes, symbol=symbols),
                    customdata=g["iteration"],
                    hovertemplate=f"{label}<br>t=%{{customdata}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    fig.update_xaxes(zeroline=False, gridcolor="rgba(0,0,0,0.06)")
    fig.update_yaxes(zeroline=False, gridcolor="rgba(0,0,0,0.06)")
    _style(
        fig,
        height=height,
        title=title,
        legend=dict(font=dict(size=11)),
        showlegend=len(groups) <= 12,
    )
    return fig


def steps_used_bar(
    tokens: Sequence[str],
    steps: Sequence[int],
    max_steps: int,
    *,
    title: str | None = None,
    height: int = 320,
) -> go.Figure:
    """Iterations each generated token used before the exit criterion fired (dashed: the cap)."""
    if not len(steps):
        return empty_figure("no tokens generated")
    labels = [f"{i}: {token_html(t)}" for i, t in enumerate(tokens)]
    colors = ["#ff7f0e" if s >= max_steps else "#1f77b4" for s in steps]
    fig = go.Figure(
        go.Bar(
            x=list(range(len(steps))),
            y=list(steps),
            marker_color=colors,
            text=list(steps),
            textposition="outside",
            customdata=labels,
            hovertemplate="%{customdata}<br>%{y} iterations<extra></extra>",
        )
    )
    fig.add_hline(
        y=max_steps,
        line=dict(color="#999", dash="dash"),
        annotation_text=f"cap {max_steps}",
        annotation_position="top right",
    )
    _style(
        fig,
        height=height,
        title=title,
        showlegend=False,
        xaxis=dict(
            tickmode="array",
            tickvals=list(range(len(steps))),
            ticktext=[short_token(t, cell_budget(len(tokens))) for t in tokens],
            title="generated token",
            tickangle=0 if len(steps) <= 16 else -60,
        ),
        yaxis=dict(title="iterations used", range=[0, max_steps * 1.18], gridcolor="rgba(0,0,0,0.08)"),
    )
    return fig


def accuracy_by_depth(frame: pd.DataFrame, *, title: str | None = None, height: int = 340) -> go.Figure:
    """Exact-match accuracy per task against the number of iterations (log₂ axis); tasks are named in
    words (``studies.tasks.arithmetic.task_label``) in a legend beside the plot, never over the lines."""
    from studies.tasks.arithmetic import task_label

    if frame is None or frame.empty or frame["num_steps"].nunique() < 2:
        return empty_figure("no depth-scaling answers in this run")
    fig = go.Figure()
    for (task, g), color in zip(frame.groupby("task"), _palette(frame["task"].nunique()), strict=True):
        g = g.sort_values("num_steps")
        label = task_label(str(task))
        fig.add_trace(
            go.Scatter(
                x=g["num_steps"],
                y=g["accuracy"],
                mode="lines+markers",
                name=label,
                line=dict(color=color, width=2.5),
                customdata=g["n"],
                hovertemplate=f"{label} ({task})<br>T=%{{x}}: %{{y:.0%}} of %{{customdata}} problems"
                "<extra></extra>",
            )
        )
    _style(
        fig,
        height=height,
        title=title,
        margin=dict(l=60, r=10, t=60, b=50),
        legend=dict(x=1.02, xanchor="left", y=1, yanchor="top", font=dict(size=11)),  # beside the plot
        xaxis=dict(
            title="iterations T",
            type="log",
            tickvals=sorted(frame["num_steps"].unique()),
            gridcolor="rgba(0,0,0,0.06)",
        ),
        yaxis=dict(title="accuracy", tickformat=".0%", range=[0, 1.05], gridcolor="rgba(0,0,0,0.08)"),
    )
    return fig


@functools.cache
def _verdict_tolerances() -> dict[str, float]:
    """The tolerances ``probes.dynamics.classify_trajectory`` decides with (its defaults)."""
    from probes.dynamics import classify_trajectory

    params = inspect.signature(classify_trajectory).parameters
    return {name: params[name].default for name in ("fixed_tol", "cycle_tol", "max_period")}


def verdict_help(verdict: str) -> str:
    """What a latent-trajectory verdict (``fixed-point``, ``cycle-k``, ``drift``) means, in one line."""
    tol = _verdict_tolerances()
    verdict = str(verdict or "")
    if verdict == "fixed-point":
        return f"the latent has stopped moving: its last relative step ‖hT − hT−1‖ / ‖hT‖ is below {tol['fixed_tol']:g}"
    if verdict.startswith("cycle-"):
        k = verdict.split("-", 1)[1]
        return (
            f"not a fixed point, but the latent comes back within {tol['cycle_tol']:.0%} of itself every "
            f"{k} iterations (periods up to {tol['max_period']} are looked for)"
        )
    if verdict == "drift":
        return "neither a fixed point nor a cycle: the latent is still moving at the last iteration"
    return ""


def verdict_bar(counts: pd.DataFrame, *, height: int = 260) -> go.Figure:
    """How latent trajectories end: fixed point, cycle-k or drift."""
    if counts is None or counts.empty:
        return empty_figure("no verdicts in this run")
    colors = {"fixed-point": "#2ca02c", "drift": "#d62728"}
    fig = go.Figure(
        go.Bar(
            x=counts["n"],
            y=counts["verdict"],
            orientation="h",
            text=counts["n"],
            textposition="auto",
            marker_color=[colors.get(v, "#9467bd") for v in counts["verdict"]],
            customdata=[verdict_help(v) for v in counts["verdict"]],
            hovertemplate="<b>%{y}</b>: %{x} trajectories<br>%{customdata}<extra></extra>",
        )
    )
    _style(
        fig,
        height=height,
        margin=dict(l=100, r=20, t=40, b=40),
        title="latent trajectories end as…",
        xaxis=dict(title="trajectories", gridcolor="rgba(0,0,0,0.08)"),
        yaxis=dict(autorange="reversed"),
    )
    return fig


def compare_trajectories(
    panels: Sequence[tuple[str, pd.DataFrame]],
    hovers: Sequence[pd.DataFrame | None] | None = None,
    *,
    relative_depth: bool = False,
    show_prompts: bool = True,
    height: int = 420,
    layouts: Sequence[Unrolled | None] | None = None,
) -> go.Figure:
    """Rank trajectories side by side on one shared log y axis (two runs, or two lenses).

    With ``relative_depth`` the x axis is the fraction of the unrolled depth, so runs of different
    depth (Huginn's 68 layers, a tiny model's 10) line up. ``layouts`` gives each panel's model layout.
    """
    panels = [(t, r) for t, r in panels]
    fig = make_subplots(
        rows=1,
        cols=len(panels),
        shared_yaxes=True,
        horizontal_spacing=0.04,
        subplot_titles=[t for t, _ in panels],
    )
    hovers = list(hovers) if hovers is not None else [None] * len(panels)
    layouts = list(layouts) if layouts is not None else [None] * len(panels)
    shapes: list[dict] = []
    notes: list[dict] = list(fig.layout.annotations)
    for col, ((_, rows), agg) in enumerate(zip(panels, hovers, strict=True), start=1):
        if rows is None or rows.empty:
            notes.append(
                dict(
                    text="no records",
                    showarrow=False,
                    xref=f"x{col} domain" if col > 1 else "x domain",
                    yref="y domain",
                    x=0.5,
                    y=0.5,
                )
            )
            continue
        layout = layouts[col - 1]
        width = layout.n_unrolled if layout is not None else int(rows["unrolled_index"].max()) + 1
        scale = 1.0 / max(width - 1, 1) if relative_depth else 1.0
        for trace in _trajectory_traces(
            rows, None, agg, show_prompts=show_prompts, x_scale=scale, legend=False
        ):  # the subplot titles name each side
            fig.add_trace(trace, row=1, col=col)
        panel_shapes, panel_notes = _stage_shapes(layout, x_scale=scale, col=col, inside=True)
        shapes += panel_shapes
        notes += panel_notes
        fig.update_xaxes(
            title_text="fraction of unrolled depth" if relative_depth else "unrolled layer",
            row=1,
            col=col,
            gridcolor="rgba(0,0,0,0.05)",
            zeroline=False,
        )
    rng = rank_range(*[r for _, r in panels])
    fig.update_yaxes(**_rank_axis(rng), row=1, col=1)
    for col in range(2, len(panels) + 1):
        fig.update_yaxes(type="log", dtick=1, row=1, col=col, gridcolor="rgba(0,0,0,0.08)")
    _style(
        fig,
        height=height,
        hovermode="closest",
        showlegend=False,
        shapes=shapes,
        annotations=notes,
    )
    return fig


def hover_by_layer(frame: pd.DataFrame | None, lens: str) -> pd.DataFrame | None:
    """The ``unrolled_index → top`` rows of one lens from an aggregate hover table."""
    if frame is None or frame.empty:
        return None
    return frame[frame["lens"] == lens][["unrolled_index", "top"]]


def overview_figure(
    medians: pd.DataFrame,
    target_kinds: Sequence[str],
    *,
    height: int = 420,
    title: str | None = None,
    layout: Unrolled | None = None,
) -> go.Figure:
    """Median rank (with its 95 % bootstrap interval as a band) of each target over all prompts, one
    colour per target, one dash per lens: the run at a glance."""
    data = medians[medians["target_kind"].isin(list(target_kinds))]
    if data.empty:
        return empty_figure("no rank records in this run yet")
    fig = go.Figure()
    lenses = sorted(dict.fromkeys(data["lens"]), key=lambda lens: _series_order(lens, "")[:2])
    dashes = {lens: d for lens, d in zip(lenses, ["solid", "dash", "dot", "dashdot"], strict=False)}
    groups = sorted(
        data.groupby(["lens", "target_kind"], sort=False), key=lambda item: _series_order(*item[0])
    )
    for (lens, kind), g in groups:
        g = g.sort_values("unrolled_index")
        color = target_color(kind)
        name = series_label(lens, kind)
        fig.add_trace(
            band_trace(g["unrolled_index"], g["ci_low"], g["ci_high"], color, 0.10, legendgroup=name)
        )
        labels = [layer_label(s, t) for s, t in zip(g["site"], g["iteration"], strict=True)]
        fig.add_trace(
            go.Scatter(
                x=g["unrolled_index"],
                y=g["median"],
                mode="lines",
                name=name,
                legendgroup=name,
                line=dict(color=color, width=2.5, dash=dashes.get(lens, "solid")),
                customdata=labels,
                hovertemplate=f"<b>{name}</b> · %{{customdata}}<br>median rank %{{y:,.0f}}<extra></extra>",
            )
        )
    shapes, notes = _stage_shapes(layout)
    _style(
        fig,
        height=height,
        title=title,
        legend_below=True,
        shapes=shapes,
        annotations=notes,
        hovermode="closest",
        xaxis=dict(title="unrolled layer", gridcolor="rgba(0,0,0,0.05)", zeroline=False),
        yaxis=_rank_axis((max(float(data["ci_low"].min()), 1), float(data["ci_high"].max()))),
    )
    return fig


_GATE_COLORS = {"lambda": "#0072B2", "cdf": "#D55E00", "p": "#009E73"}


def exit_gate_curves(rows: pd.DataFrame, *, threshold: float = 0.5, height: int = 380) -> go.Figure:
    """The exit gate over a run's prompts: λ_t per prompt (thin) and its median, the cumulative exit
    probability (median and quartiles) against the threshold, and the mean exit distribution p_t."""
    if rows is None or rows.empty:
        return empty_figure("no exit-gate readings (only families with an exit gate, Ouro, record them)")
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.1,
        subplot_titles=("gate λ_t and P(exited by t)", "mean exit distribution p_t"),
    )
    for pid, g in rows.groupby("prompt_id", sort=True):
        g = g.sort_values("iteration")
        fig.add_trace(
            go.Scatter(
                x=g["iteration"],
                y=g["gate_lambda"],
                mode="lines",
                line=dict(color=rgba(_GATE_COLORS["lambda"], 0.18), width=1),
                hovertemplate=f"prompt #{pid} · t=%{{x}} · λ %{{y:.3f}}<extra></extra>",
                showlegend=False,
            ),
            row=1,
            col=1,
        )
    per_t = rows.groupby("iteration").agg(
        lam=("gate_lambda", "median"),
        cdf=("exit_cdf", "median"),
        q25=("exit_cdf", lambda x: x.quantile(0.25)),
        q75=("exit_cdf", lambda x: x.quantile(0.75)),
        p=("exit_prob", "mean"),
    )
    t = per_t.index.tolist()
    fig.add_trace(
        band_trace(t, per_t["q25"], per_t["q75"], _GATE_COLORS["cdf"], 0.15),
        row=1,
        col=1,
    )
    for key, name in (("lam", "λ_t (median)"), ("cdf", "P(exited by t) (median, IQR)")):
        color = _GATE_COLORS["lambda" if key == "lam" else "cdf"]
        fig.add_trace(
            go.Scatter(
                x=t,
                y=per_t[key],
                mode="lines+markers",
                name=name,
                line=dict(color=color, width=2.5),
                hovertemplate=f"t=%{{x}} · {name} %{{y:.3f}}<extra></extra>",
            ),
            row=1,
            col=1,
        )
    fig.add_trace(
        go.Bar(x=t, y=per_t["p"], name="mean p_t", marker_color=_GATE_COLORS["p"]),
        row=1,
        col=2,
    )
    fig.add_hline(y=threshold, line=dict(color="#888", dash="dot", width=1), row=1, col=1)
    fig.update_xaxes(title_text="iteration t", dtick=1)
    fig.update_yaxes(range=[-0.02, 1.02])
    _style(
        fig,
        height=height,
        legend_below=True,
    )
    return fig


def exit_gate_heatmap(
    rows: pd.DataFrame, position_tokens: Sequence[str], *, threshold: float = 0.5
) -> go.Figure:
    """Iterations × positions: the cumulative exit probability of each token (text: λ_t), with the
    iteration where a threshold exit would stop outlined: where each token would leave the loop."""
    if rows is None or rows.empty:
        return empty_figure("no exit-gate readings for this prompt")
    grid = rows.pivot_table(index="iteration", columns="position", values="exit_cdf")
    lam = rows.pivot_table(index="iteration", columns="position", values="gate_lambda").reindex_like(grid)
    positions = list(grid.columns)
    labels = [
        short_token(position_tokens[p], cell_budget(len(positions)))
        if 0 <= p < len(position_tokens)
        else str(p)
        for p in positions
    ]
    exits = (grid >= threshold).idxmax().where((grid >= threshold).any(), grid.index.max())
    fig = go.Figure(
        go.Heatmap(
            z=grid.to_numpy(),
            x=list(range(len(positions))),
            y=[f"t={t}" for t in grid.index],
            text=np.vectorize(lambda v: f"{v:.2f}")(lam.to_numpy()),
            texttemplate="%{text}",
            customdata=np.array([[labels[j]] * len(grid.index) for j in range(len(positions))]).T,
            hovertemplate="%{customdata} · %{y}<br>P(exited by t) %{z:.3f} · λ_t %{text}<extra></extra>",
            zmin=0,
            zmax=1,
            colorscale="Oranges",
            colorbar=dict(title=dict(text="P(exited)")),
            xgap=1,
            ygap=1,
        )
    )
    rindex = {t: i for i, t in enumerate(grid.index)}
    _style(
        fig,
        height=max(240, 90 + 40 * len(grid.index)),
        margin=dict(l=60, r=20, t=30, b=80),
        shapes=[
            dict(
                type="rect",
                x0=j - 0.5,
                x1=j + 0.5,
                y0=rindex[int(t)] - 0.5,
                y1=rindex[int(t)] + 0.5,
                line=dict(color="#222", width=2),
            )
            for j, t in enumerate(exits.tolist())
        ],
        xaxis=dict(
            tickmode="array",
            tickvals=list(range(len(positions))),
            ticktext=labels,
            title=f"input token (outlined: where a threshold-{threshold} exit stops; text: λ_t)",
            tickangle=0 if len(positions) <= 24 else -60,
        ),
        yaxis=dict(autorange="reversed", title=None),
    )
    return fig


def probability_entropy(
    rows: pd.DataFrame, *, title: str | None = None, height: int = 520, layout: Unrolled | None = None
) -> go.Figure:
    """Two panels along the unrolled depth, one line per lens: the probability the lens gives the target
    (``prob``) and the entropy (nats) of its whole distribution (``entropy``)."""
    if rows is None or rows.empty:
        return empty_figure("no records for this selection")
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,  # no subplot titles: they would sit on the stage labels; the y axes say it
    )
    for lens in sorted(rows["lens"].unique(), key=lambda name: _series_order(name, "")[:2]):
        g = rows[rows["lens"] == lens].sort_values("unrolled_index")
        labels = [layer_label(s, t) for s, t in zip(g["site"], g["iteration"], strict=True)]
        for row, column, fmt in ((1, "prob", ".3f"), (2, "entropy", ".3f")):
            fig.add_trace(
                go.Scatter(
                    x=g["unrolled_index"],
                    y=g[column],
                    mode="lines+markers",
                    name=f"{lens} lens",
                    legendgroup=lens,
                    showlegend=row == 1,
                    line=dict(color=lens_color(lens), width=2.2),
                    marker=dict(size=4),
                    customdata=labels,
                    hovertemplate=f"<b>{lens} lens</b> · %{{customdata}}<br>{column} %{{y:{fmt}}}<extra></extra>",
                ),
                row=row,
                col=1,
            )
    shapes, notes = _stage_shapes(layout, col=1)
    shapes += _stage_shapes(layout, col=2, labels=False)[0] if layout is not None else []
    fig.update_yaxes(
        range=[-0.03, 1.03], title_text="p of the target", row=1, col=1, gridcolor="rgba(0,0,0,0.08)"
    )
    fig.update_yaxes(
        title_text="entropy (nats)", rangemode="tozero", row=2, col=1, gridcolor="rgba(0,0,0,0.08)"
    )
    fig.update_xaxes(title_text="unrolled layer", row=2, col=1, gridcolor="rgba(0,0,0,0.05)")
    _style(
        fig,
        height=height,
        title=title,
        legend_below=True,
        shapes=shapes,
        annotations=list(fig.layout.annotations) + notes,
    )
    return fig


#: Values of an exit criterion at or below this are drawn at it: float32 noise, numerically zero.
EXIT_FLOOR = 1e-9


def exit_trace_chart(
    trace: pd.DataFrame, criterion: str, *, title: str | None = None, height: int = 360
) -> go.Figure:
    """An exit criterion's value at every iteration (``probes.adaptive.exit_trace``) with its threshold
    dashed and the first iteration where it lets the token stop marked. Divergences and differences are
    drawn on a log axis (values at or below ``EXIT_FLOOR`` are drawn there: numerically zero)."""
    data = trace.dropna(subset=["value"]) if trace is not None and len(trace) else None
    if data is None or data.empty:
        return empty_figure("nothing to draw: the criterion needs at least two iterations")
    threshold = float(trace["threshold"].iloc[0])
    log = criterion in ("kl", "entropy-diff", "latent-diff")
    y = data["value"].clip(lower=EXIT_FLOOR) if log else data["value"]
    fig = go.Figure(
        go.Scatter(
            x=data["iteration"],
            y=y,
            mode="lines+markers",
            name=criterion,
            line=dict(color="#0072B2", width=2.5),
            customdata=data["value"],
            hovertemplate=f"t=%{{x}} · {criterion} %{{customdata:.3g}}<extra></extra>",
        )
    )
    shapes = [
        dict(
            type="line",
            xref="paper",
            x0=0,
            x1=1,
            yref="y",
            y0=threshold,  # shapes take data values on a log axis (annotations take their log)
            y1=threshold,
            line=dict(color="#D55E00", dash="dash", width=1.5),
        )
    ]
    notes = [
        dict(
            xref="paper",
            x=1,
            xanchor="right",
            yref="y",
            y=math.log10(threshold) if log else threshold,
            yanchor="bottom",
            text=f"threshold {threshold:g}",
            showarrow=False,
            font=dict(size=11, color="#D55E00"),
        )
    ]
    stops = data[data["exits"]]
    if len(stops):
        t = int(stops["iteration"].iloc[0])
        shapes.append(
            dict(
                type="line",
                xref="x",
                x0=t,
                x1=t,
                yref="paper",
                y0=0,
                y1=1,
                line=dict(color="#009E73", width=2),
            )
        )
        notes.append(
            dict(
                x=t, xref="x", y=1, yref="paper", yanchor="bottom", text=f"exits after t={t}", showarrow=False
            )
        )
    _style(
        fig,
        height=height,
        title=title,
        shapes=shapes,
        annotations=notes,
        showlegend=False,
        xaxis=dict(
            title="iteration t", gridcolor="rgba(0,0,0,0.06)", dtick=max(1, math.ceil(len(trace) / 16))
        ),
        yaxis=dict(
            title=f"{criterion} (log)" if log else criterion,
            type="log" if log else "linear",
            exponentformat="power",
            gridcolor="rgba(0,0,0,0.08)",
        ),
    )
    return fig


#: Colours of the runs overlaid in Compare (distinct from each other; lenses keep their dash).
RUN_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")


def overlay_trajectories(
    series: Sequence[tuple[str, pd.DataFrame, Unrolled | None]],
    *,
    relative_depth: bool = True,
    height: int = 480,
    title: str | None = None,
) -> go.Figure:
    """Median rank trajectories of several runs (or lenses) on one log axis: one colour per series,
    a legend naming each, and each series' stages marked along the top in its colour (prelude end,
    coda start) so runs of different depth can be read against each other."""
    if not series or all(rows is None or rows.empty for _, rows, _ in series):
        return empty_figure("no records for this selection")
    fig = go.Figure()
    notes: list[dict] = []
    shapes: list[dict] = []
    for i, (label, rows, layout) in enumerate(series):
        if rows is None or rows.empty:
            continue
        color = RUN_COLORS[i % len(RUN_COLORS)]
        width = layout.n_unrolled if layout is not None else int(rows["unrolled_index"].max()) + 1
        scale = 1.0 / max(width - 1, 1) if relative_depth else 1.0
        med = (
            rows.groupby("unrolled_index")
            .agg(rank=("rank", "median"), site=("site", "first"), iteration=("iteration", "first"))
            .reset_index()
        )
        n = rows["prompt_id"].nunique()
        text = [layer_label(s, t) for s, t in zip(med["site"], med["iteration"], strict=True)]
        fig.add_trace(
            go.Scatter(
                x=med["unrolled_index"] * scale,
                y=med["rank"],
                mode="lines+markers",
                name=f"{label} ({n} prompt{'s' if n != 1 else ''})",
                line=dict(color=color, width=2.6),
                marker=dict(size=4, color=color),
                customdata=np.stack([med["unrolled_index"], text], axis=1),
                hovertemplate=f"<b>{label}</b><br>layer %{{customdata[0]}} · %{{customdata[1]}}<br>"
                "median rank %{y:,.0f}<extra></extra>",
            )
        )
        if layout is not None:
            marks = []
            if layout.prelude:
                marks.append((layout.prelude - 0.5, "▏prelude | core"))
            if layout.coda:
                marks.append((layout.n_unrolled - layout.coda - 0.5, "▏core | coda"))
            for x, name in marks:
                shapes.append(
                    dict(
                        type="line",
                        xref="x",
                        x0=x * scale,
                        x1=x * scale,
                        yref="paper",
                        y0=0,
                        y1=1,
                        line=dict(color=rgba(color, 0.6), dash="dot", width=1.2),
                    )
                )
                notes.append(
                    dict(
                        x=x * scale,
                        y=1.0 + 0.045 * i,
                        xref="x",
                        yref="paper",
                        xanchor="left",
                        yanchor="bottom",
                        text=name,
                        showarrow=False,
                        font=dict(size=10, color=color),
                    )
                )
    all_rows = [rows for _, rows, _ in series if rows is not None and len(rows)]
    _style(
        fig,
        height=height,
        legend_below=True,
        margin=dict(l=60, r=20, t=60 + 18 * len(series), b=110),
        shapes=shapes,
        annotations=notes,
        title=title,
        title_y=0.98,  # above the stage notes of every run
        hovermode="closest",
        xaxis=dict(
            title="fraction of unrolled depth" if relative_depth else "unrolled layer",
            gridcolor="rgba(0,0,0,0.05)",
            zeroline=False,
            tickformat=".0%" if relative_depth else None,
        ),
        yaxis=_rank_axis(rank_range(*all_rows)),
    )
    return fig


def intermediate_vs_final(
    table: pd.DataFrame,
    lens: str,
    block: int,
    *,
    targets: Sequence[str] | None = None,
    height: int = 440,
    title: str | None = None,
) -> go.Figure:
    """The paper's question, interactively: across iterations at one core block of one lens, the median
    rank (band: 95 % bootstrap interval) of the intermediate result, the final answer, the control token
    and the other digits (``studies.figures.intermediate_vs_final.table``)."""
    from probes.palette import TARGET_ORDER, target_label

    d = table[(table["lens"] == lens) & (table["block"] == block)]
    if targets is not None:
        d = d[d["target"].isin(list(targets))]
    if d.empty:
        return empty_figure("no intermediate-vs-final records for this lens and block")
    fig = go.Figure()
    dashes = {"final": "solid", "intermediate": "dash", "control": "dot", "digit_baseline": "dashdot"}
    for target in [t for t in TARGET_ORDER if t in set(d["target"])]:
        s = d[d["target"] == target].sort_values("iteration")
        color = target_color(target)
        x = s["iteration"].tolist()
        fig.add_trace(band_trace(x, s["ci_low"], s["ci_high"], color, 0.13, legendgroup=target))
        fig.add_trace(
            go.Scatter(
                x=x,
                y=s["median"],
                mode="lines+markers",
                name=target_label(target),
                legendgroup=target,
                line=dict(color=color, width=2.4, dash=dashes.get(target, "solid")),
                marker=dict(size=5),
                customdata=np.stack([s["ci_low"], s["ci_high"], s["n"]], axis=1),
                hovertemplate=f"<b>{target_label(target)}</b><br>t=%{{x}} · median rank %{{y:,.4g}} "
                "[%{customdata[0]:,.4g}, %{customdata[1]:,.4g}] · %{customdata[2]} problems<extra></extra>",
            )
        )
    steps = int(d["iteration"].max())
    _style(
        fig,
        height=height,
        title=title,
        legend_below=True,
        hovermode="closest",
        xaxis=dict(
            title="recurrent iteration t",
            range=[0.5, steps + 0.5],
            dtick=max(1, math.ceil(steps / 16)),
            gridcolor="rgba(0,0,0,0.05)",
        ),
        yaxis=_rank_axis((1.0, float(d["ci_high"].max()))),
    )
    return fig


def numeric_share(
    table: pd.DataFrame, *, height: int = 400, title: str | None = None, layout: Unrolled | None = None
) -> go.Figure:
    """Share of each lens's top-5 decodings that are digits or a minus sign, along the unrolled depth
    (``studies.figures.numeric_prefix.table``)."""
    if table is None or table.empty:
        return empty_figure("no top-k decodings in this run")
    fig = go.Figure()
    for lens in sorted(table["lens"].unique(), key=lambda name: _series_order(name, "")[:2]):
        d = table[table["lens"] == lens].sort_values("unrolled_index")
        custom = np.stack(
            [
                [
                    layer_label(s, t)
                    for s, t in zip(d["stage"] + "." + d["block"].astype(str), d["iteration"], strict=True)
                ],
                d["n_tokens"],
            ],
            axis=1,
        )
        fig.add_trace(
            go.Scatter(
                x=d["unrolled_index"],
                y=d["share"],
                mode="lines+markers",
                name=f"{lens} lens",
                line=dict(color=lens_color(lens), width=2.2),
                marker=dict(size=4),
                customdata=custom,
                hovertemplate=f"<b>{lens} lens</b> · layer %{{x}} · %{{customdata[0]}}<br>"
                "numeric share %{y:.0%} of %{customdata[1]} decoded tokens<extra></extra>",
            )
        )
    shapes, notes = _stage_shapes(layout)
    _style(
        fig,
        height=height,
        title=title,
        legend_below=True,
        shapes=shapes,
        annotations=notes,
        xaxis=dict(title="unrolled layer", gridcolor="rgba(0,0,0,0.05)", zeroline=False),
        yaxis=dict(
            title="numeric share of top-5",
            tickformat=".0%",
            range=[-0.03, 1.03],
            gridcolor="rgba(0,0,0,0.08)",
        ),
    )
    return fig
