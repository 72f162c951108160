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

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lens.layout import Unrolled
from probes.palette import LENS_ORDER, TARGET_ORDER, lens_color, rgba, target_color

__all__ = [
    "DASHES",
    "accuracy_by_depth",
    "compare_trajectories",
    "empty_figure",
    "exit_gate_curves",
    "exit_gate_heatmap",
    "heatmap_grid",
    "layer_label",
    "lens_grid",
    "pca_trajectories",
    "rank_heatmap",
    "rank_trajectory",
    "series_label",
    "step_curves",
    "steps_used_bar",
    "token_text",
    "verdict_bar",
]

#: With several targets on one figure each gets the next dash (lenses and targets keep the colours and
#: the order of ``probes.palette``, the same as in the study figures).
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
_FONT = dict(family="Inter, -apple-system, Segoe UI, Helvetica, Arial, sans-serif", size=13)
_MARGIN = dict(l=60, r=20, t=60, b=50)
_HOVER = dict(
    bgcolor="rgba(255,255,255,0.95)", bordercolor="#999", font=dict(size=12, color="#222"), align="left"
)
_LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.2, x=0, xanchor="left")
_MARGIN_LEGEND = dict(l=60, r=20, t=60, b=110)


def token_text(token: str | None) -> str:
    """A token made visible in a cell or hover: spaces ``␣``, newlines ``↵``, tabs ``⇥``, HTML escaped."""
    if token is None or (isinstance(token, float) and math.isnan(token)):
        return ""
    text = str(token).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")


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
    layout: Unrolled | None, *, x_scale: float = 1.0, col: int | None = None, labels: bool = True
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
                y=1.0,
                xref=xref,
                yref="paper",
                yanchor="bottom",
                text=text,
                showarrow=False,
                font=dict(size=11, color="#666"),
            )
            for x, text in marks
        ]
    return shapes, notes


def _log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Tick positions (log10 values) and labels 1, 10, 100, 1k, … covering ``[lo, hi]`` ranks."""
    vals, text = [], []
    for e in range(0, max(1, math.ceil(math.log10(max(hi, 1)))) + 1):
        vals.append(float(e))
        text.append(f"{10**e:,}" if e < 3 else f"{10 ** (e - 3):g}k" if e < 6 else f"1e{e}")
    return vals, text


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
            x, y, text = _prompt_lines(group, hover, lens, x_scale)
            traces.append(
                go.Scatter(
                    x=x,
                    y=y,
                    mode="lines",
                    line=dict(color=rgba(color, 0.28), width=1),
                    name=f"{name} (prompts)",
                    legendgroup=name,
                    showlegend=False,
                    text=text,
                    connectgaps=False,
                    hovertemplate="%{text}<br>rank %{y}<extra></extra>",
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
                hovertemplate=[t + "<extra></extra>" for t in text],
            )
        )
    return traces


def _layer_labels(frame: pd.DataFrame) -> pd.Series:
    """``layer_label`` for every row, vectorised."""
    site = frame["site"].astype(str)
    recurrent = site.str.startswith(("core", "adapter", "latent"))
    return site.where(~recurrent, site + " · t=" + frame["iteration"].astype(str))


def _prompt_lines(
    group: pd.DataFrame, hover: pd.DataFrame | None, lens: str, x_scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All prompts of one series as one line with a gap (NaN) between prompts, and its hover text.

    Built with array operations: a 100-prompt × 68-layer series has 6,800 points, and plotly
    validates numpy arrays far faster than Python lists.
    """
    g = group[["prompt_id", "unrolled_index", "site", "iteration", "rank"]]
    if hover is not None and not hover.empty:
        tops = hover[hover["lens"] == lens][["prompt_id", "unrolled_index", "top"]]
        g = g.merge(tops, on=["prompt_id", "unrolled_index"], how="left")
    else:
        g = g.assign(top="")
    g = g.sort_values(["prompt_id", "unrolled_index"])
    text = (
        "prompt #"
        + g["prompt_id"].astype(str)
        + " · "
        + _layer_labels(g)
        + "<br>"
        + g["top"].fillna("").astype(str)
    ).to_numpy(dtype=object)
    starts = np.flatnonzero(np.diff(g["prompt_id"].to_numpy())) + 1  # where each next prompt begins
    x = np.insert(g["unrolled_index"].to_numpy(dtype=float) * x_scale, starts, np.nan)
    y = np.insert(g["rank"].to_numpy(dtype=float), starts, np.nan)
    return x, y, np.insert(text, starts, "")


def _rank_axis(y_range: tuple[float, float] | None) -> dict:
    axis = dict(
        type="log", title="rank (log, 1 = top)", gridcolor="rgba(0,0,0,0.08)", zeroline=False, dtick=1
    )
    if y_range is not None:
        axis["range"] = [math.log10(max(y_range[0], 0.8)), math.log10(max(y_range[1], 1.0) * 1.3)]
    return axis


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
    fig.update_layout(
        shapes=shapes,
        annotations=notes,
        title=dict(text=title, x=0, xanchor="left", font=dict(size=16)) if title else None,
        height=height,
        font=_FONT,
        hoverlabel=_HOVER,
        margin=_MARGIN_LEGEND,
        hovermode="closest",
        plot_bgcolor="white",
        legend=_LEGEND_BELOW,
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
    rows: pd.DataFrame, layout: Unrolled | None = None
) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Median rank per unrolled layer laid out as stage/iteration rows × block columns.

    Returns ``(cells, row_labels, col_labels)`` where ``cells`` has ``row, col, unrolled_index,
    site, iteration, rank`` (rows: ``prelude``, ``t=1`` … ``t=T``, ``coda``; top to bottom). With the
    model's ``layout`` every stage row and block column is shown, recorded or not.
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
    kind = med["site"].astype(str).str.split(".").str[0]
    med["row"] = np.where(kind == "core", "t=" + med["iteration"].astype(str), kind)
    steps = sorted(med.loc[kind == "core", "iteration"].unique())
    row_labels = (
        (["prelude"] if (kind == "prelude").any() else [])
        + [f"t={t}" for t in steps]
        + (["coda"] if (kind == "coda").any() else [])
    )
    width = int(med["block"].max()) + 1 if len(med) else 0
    if layout is not None:
        row_labels = (
            (["prelude"] if layout.prelude else [])
            + [f"t={t}" for t in range(1, layout.steps + 1)]
            + (["coda"] if layout.coda else [])
        )
        width = max(layout.prelude, layout.core, layout.coda)
    med["col"] = med["block"].astype(int)
    return med, row_labels, [f"b{j}" for j in range(width)]


def rank_heatmap(
    rows: pd.DataFrame,
    hover: pd.DataFrame | None = None,
    *,
    title: str | None = None,
    z_range: tuple[float, float] | None = None,
    height: int | None = None,
    show_scale: bool = True,
    layout: Unrolled | None = None,
) -> go.Figure:
    """Iteration × block heat map of the (median) rank of one lens and target, log colour scale.

    ``hover`` maps ``unrolled_index`` to top-token text (column ``top``).
    """
    if rows is None or rows.empty:
        return empty_figure("no rank records for this selection")
    cells, row_labels, col_labels = heatmap_grid(rows, layout)
    R, C = len(row_labels), len(col_labels)
    z = np.full((R, C), np.nan)
    text = np.full((R, C), "", dtype=object)
    hover_text = np.full((R, C), "", dtype=object)
    tops = (
        {} if hover is None or hover.empty else dict(zip(hover["unrolled_index"], hover["top"], strict=False))
    )
    rindex = {label: i for i, label in enumerate(row_labels)}
    for c in cells.itertuples():
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
    show_text = R * C <= 160
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
            colorscale="Viridis_r",
            zmin=math.log10(max(lo, 1)),
            zmax=max(math.log10(max(hi, 1)), 0.5),
            showscale=show_scale,
            colorbar=dict(title=dict(text="rank"), tickvals=tickvals, ticktext=ticktext, len=0.9),
            xgap=2,
            ygap=2,
        )
    )
    fig.update_layout(
        title=dict(text=title, x=0, xanchor="left", font=dict(size=16)) if title else None,
        height=height or min(900, max(260, 70 + 26 * R)),
        font=_FONT,
        hoverlabel=_HOVER,
        margin=_MARGIN,
        plot_bgcolor="white",
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
    for c in cells.itertuples():
        i, j = rindex[c.row], pindex[c.position]
        z[i, j] = c.prob
        tok = token_text(c.token)
        text[i, j] = tok if len(tok) <= 10 else tok[:9] + "…"
        hov[i, j] = getattr(c, "hover", None) or f"{tok} {c.prob:.3f}"
    labels = [f"{token_text(position_tokens[p]) if 0 <= p < len(position_tokens) else p}" for p in positions]
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
    fig.update_layout(
        title=dict(text=title, x=0, xanchor="left", font=dict(size=16)) if title else None,
        height=height or min(1400, max(300, 130 + 30 * len(rows))),
        font=_FONT,
        hoverlabel=_HOVER,
        margin=dict(l=120, r=20, t=50, b=80),
        plot_bgcolor="white",
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
    for (key, g), color in zip(groups, palette, strict=True):
        g = g.sort_values("iteration")
        verdict = g["verdict"].iloc[0] if "verdict" in g and isinstance(g["verdict"].iloc[0], str) else ""
        label = _trajectory_label(key, color_by, labels) + (f" · {verdict}" if verdict else "")
        fig.add_trace(
            go.Scatter(
                x=g["iteration"],
                y=g[metric],
                mode="lines+markers",
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
    fig.update_layout(
        title=dict(text=title, x=0, xanchor="left", font=dict(size=16)) if title else None,
        height=height,
        font=_FONT,
        hoverlabel=_HOVER,
        margin=_MARGIN,
        plot_bgcolor="white",
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
            dtick=1 if metric == "step_norm" else None,
            gridcolor="rgba(0,0,0,0.08)",
        ),
    )
    return fig


def _palette(n: int) -> list[str]:
    import plotly.colors as pc

    base = pc.qualitative.Plotly + pc.qualitative.D3
    if n <= len(base):
        return base[:n]
    return pc.sample_colorscale("Turbo", [i / max(n - 1, 1) for i in range(n)])


def pca_trajectories(
    dyn: pd.DataFrame,
    dims: int = 2,
    *,
    color_by: str = "prompt_id",
    labels: Mapping | None = None,
    title: str | None = None,
    height: int = 480,
) -> go.Figure:
    """Latent trajectories across iterations in their first principal components (2-D or 3-D); each
    trajectory a line from ○ (t=1) to ◆ (t=T), markers shaded by iteration."""
    cols = ["pc1", "pc2", "pc3"][:dims]
    data = dyn.dropna(subset=cols) if dyn is not None and len(dyn) else None
    if data is None or data.empty:
        return empty_figure("no PCA coordinates for this selection")
    fig = go.Figure()
    groups = list(data.groupby(color_by, sort=True))
    palette = _palette(len(groups))
    T = int(data["iteration"].max())
    for (key, g), color in zip(groups, palette, strict=True):
        g = g.sort_values("iteration")
        label = _trajectory_label(key, color_by, labels)
        hover = f"{label}<br>t=%{{customdata}}<extra></extra>"
        sizes = [9 if t in (1, T) else 5 for t in g["iteration"]]
        symbols = ["circle-open" if t == 1 else "diamond" if t == T else "circle" for t in g["iteration"]]
        marker = dict(
            color=g["iteration"],
            colorscale="Greys",
            cmin=0,
            cmax=T,
            size=sizes,
            line=dict(color=color, width=1.5),
        )
        if dims == 3:
            fig.add_trace(
                go.Scatter3d(
                    x=g["pc1"],
                    y=g["pc2"],
                    z=g["pc3"],
                    mode="lines+markers",
                    name=label,
                    line=dict(color=color, width=4),
                    marker={**marker, "size": [s - 2 for s in sizes]},
                    customdata=g["iteration"],
                    hovertemplate=hover,
                )
            )
        else:
            marker["symbol"] = symbols
            fig.add_trace(
                go.Scatter(
                    x=g["pc1"],
                    y=g["pc2"],
                    mode="lines+markers",
                    name=label,
                    line=dict(color=color, width=1.5),
                    marker=marker,
                    customdata=g["iteration"],
                    hovertemplate=hover,
                )
            )
    fig.update_layout(
        title=dict(text=title, x=0, xanchor="left", font=dict(size=16)) if title else None,
        height=height,
        font=_FONT,
        hoverlabel=_HOVER,
        margin=_MARGIN,
        plot_bgcolor="white",
        showlegend=len(groups) <= 12,
        legend=dict(font=dict(size=11)),
    )
    if dims == 3:
        fig.update_layout(
            scene=dict(xaxis_title="PC1", yaxis_title="PC2", zaxis_title="PC3"),
            margin=dict(l=0, r=0, t=50, b=0),
        )
    else:
        fig.update_layout(
            xaxis=dict(title="PC1", zeroline=False, gridcolor="rgba(0,0,0,0.06)"),
            yaxis=dict(
                title="PC2", zeroline=False, gridcolor="rgba(0,0,0,0.06)", scaleanchor="x", scaleratio=1
            ),
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
    labels = [f"{i}: {token_text(t)}" for i, t in enumerate(tokens)]
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
    fig.update_layout(
        title=dict(text=title, x=0, xanchor="left", font=dict(size=16)) if title else None,
        height=height,
        font=_FONT,
        hoverlabel=_HOVER,
        margin=_MARGIN,
        plot_bgcolor="white",
        showlegend=False,
        xaxis=dict(
            tickmode="array",
            tickvals=list(range(len(steps))),
            ticktext=[token_text(t) for t in tokens],
            title="generated token",
            tickangle=0 if len(steps) <= 16 else -60,
        ),
        yaxis=dict(title="iterations used", range=[0, max_steps * 1.18], gridcolor="rgba(0,0,0,0.08)"),
    )
    return fig


def accuracy_by_depth(frame: pd.DataFrame, *, title: str | None = None, height: int = 340) -> go.Figure:
    """Exact-match accuracy per task against the number of iterations (log₂ axis)."""
    if frame is None or frame.empty or frame["num_steps"].nunique() < 2:
        return empty_figure("no depth-scaling answers in this run")
    fig = go.Figure()
    for (task, g), color in zip(frame.groupby("task"), _palette(frame["task"].nunique()), strict=True):
        g = g.sort_values("num_steps")
        fig.add_trace(
            go.Scatter(
                x=g["num_steps"],
                y=g["accuracy"],
                mode="lines+markers",
                name=str(task),
                line=dict(color=color, width=2.5),
                customdata=g["n"],
                hovertemplate=f"{task}<br>T=%{{x}}: %{{y:.0%}} of %{{customdata}}<extra></extra>",
            )
        )
    fig.update_layout(
        title=dict(text=title, x=0, xanchor="left", font=dict(size=16)) if title else None,
        height=height,
        font=_FONT,
        hoverlabel=_HOVER,
        margin=_MARGIN,
        plot_bgcolor="white",
        xaxis=dict(
            title="iterations T",
            type="log",
            tickvals=sorted(frame["num_steps"].unique()),
            gridcolor="rgba(0,0,0,0.06)",
        ),
        yaxis=dict(title="accuracy", tickformat=".0%", range=[0, 1.05], gridcolor="rgba(0,0,0,0.08)"),
        legend=dict(
            x=0.99,
            xanchor="right",
            y=0.02,
            yanchor="bottom",
            bgcolor="rgba(255,255,255,0.75)",
            font=dict(size=11),
        ),
    )
    return fig


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
            hovertemplate="%{y}: %{x}<extra></extra>",
        )
    )
    fig.update_layout(
        height=height,
        font=_FONT,
        hoverlabel=_HOVER,
        margin=dict(l=100, r=20, t=40, b=40),
        plot_bgcolor="white",
        title=dict(text="latent trajectories end as…", x=0, font=dict(size=15)),
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
        shapes += _stage_shapes(layout, x_scale=scale, col=col, labels=False)[0]
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
    fig.update_layout(
        height=height,
        font=_FONT,
        hoverlabel=_HOVER,
        margin=_MARGIN,
        plot_bgcolor="white",
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
            go.Scatter(
                x=list(g["unrolled_index"]) + list(g["unrolled_index"][::-1]),
                y=list(g["ci_high"]) + list(g["ci_low"][::-1]),
                fill="toself",
                fillcolor=rgba(color, 0.10),
                line=dict(width=0),
                hoverinfo="skip",
                showlegend=False,
                legendgroup=name,
            )
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
    fig.update_layout(
        shapes=shapes,
        annotations=notes,
        title=dict(text=title, x=0, xanchor="left", font=dict(size=16)) if title else None,
        height=height,
        font=_FONT,
        hoverlabel=_HOVER,
        margin=_MARGIN_LEGEND,
        plot_bgcolor="white",
        hovermode="closest",
        legend=_LEGEND_BELOW,
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
        go.Scatter(
            x=t + t[::-1],
            y=per_t["q75"].tolist() + per_t["q25"].tolist()[::-1],
            fill="toself",
            fillcolor=rgba(_GATE_COLORS["cdf"], 0.15),
            line=dict(width=0),
            hoverinfo="skip",
            showlegend=False,
        ),
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
    fig.update_layout(
        height=height,
        font=_FONT,
        hoverlabel=_HOVER,
        margin=_MARGIN_LEGEND,
        plot_bgcolor="white",
        legend=_LEGEND_BELOW,
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
    labels = [token_text(position_tokens[p]) if 0 <= p < len(position_tokens) else str(p) for p in positions]
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
    fig.update_layout(
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
        height=max(240, 90 + 40 * len(grid.index)),
        font=_FONT,
        hoverlabel=_HOVER,
        margin=dict(l=60, r=20, t=30, b=80),
        plot_bgcolor="white",
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
