"""Figure 5 — how the latent state moves across iterations: convergence, trajectories, verdicts.

(a) relative step norm ``‖h_t − h_{t−1}‖ / ‖h_t‖`` per iteration (median and interquartile band
over prompts, log axis), (b) cosine to the last iteration's state, (c) the count of trajectory
verdicts (fixed point / cycle-k / drift), (d) the first two principal components of up to 12
trajectories, coloured by iteration, start ○ and end × marked. Each trajectory has its own PCA
basis (the ``dynamics`` table's pc1/pc2), so the small multiples are shown side by side rather
than overlaid.

The table is long, with a ``part`` column: ``iteration`` rows (the summaries of (a) and (b)),
``verdict`` rows (verdict, count) and ``trajectory`` rows (prompt_id, iteration, pc1, pc2).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import MaxNLocator
from plotly.subplots import make_subplots

from probes.palette import band_trace
from studies.figures.base import FigureSpec, Headline, Tables, require_columns, to_builtin
from studies.figures.layout import Layout
from studies.figures.stats import last_position
from studies.figures.style import mpl_style, new_figure, plotly_layout

__all__ = ["FIGURE", "MAX_TRAJECTORIES", "draw", "headline", "pick_site", "table"]

NAME = "latent_dynamics"
MAX_TRAJECTORIES = 12
COLUMNS = [
    "part",
    "site",
    "iteration",
    "step_norm_median",
    "step_norm_q25",
    "step_norm_q75",
    "cos_to_last_median",
    "cos_to_last_q25",
    "cos_to_last_q75",
    "n",
    "prompt_id",
    "pc1",
    "pc2",
    "verdict",
    "count",
]
STEP_COLOR = "#0072B2"
COS_COLOR = "#D55E00"
VERDICT_COLORS = {"fixed-point": "#009E73", "drift": "#D55E00"}
CYCLE_COLOR = "#E69F00"
CONVERGED = 1e-2


def pick_site(sites: list[str]) -> str:
    """The recurrent state the figure follows: the last core block if recorded, else the first site."""
    core = sorted((s for s in sites if s.startswith("core.")), key=lambda s: int(s.split(".")[1]))
    return core[-1] if core else sorted(sites)[0]


def _verdict_key(v: str) -> tuple[int, int, str]:
    if v == "fixed-point":
        return (0, 0, v)
    if v.startswith("cycle-"):
        tail = v.split("-", 1)[1]
        return (1, int(tail) if tail.isdigit() else 0, v)
    return (2, 0, v)


def table(tables: Tables, layout: Layout, max_trajectories: int = MAX_TRAJECTORIES) -> pd.DataFrame:
    """Per-iteration summaries, verdict counts and a few PCA trajectories (see the module doc)."""
    dyn = tables["dynamics"]
    require_columns(dyn, ["prompt_id", "site", "iteration", "step_norm", "cos_to_last"], "dynamics")
    site = pick_site(dyn["site"].astype(str).unique().tolist())
    d = last_position(dyn[dyn["site"] == site])
    q = d.groupby("iteration")
    summary = (
        pd.DataFrame(
            {
                "step_norm_median": q["step_norm"].median(),
                "step_norm_q25": q["step_norm"].quantile(0.25),
                "step_norm_q75": q["step_norm"].quantile(0.75),
                "cos_to_last_median": q["cos_to_last"].median(),
                "cos_to_last_q25": q["cos_to_last"].quantile(0.25),
                "cos_to_last_q75": q["cos_to_last"].quantile(0.75),
                "n": q["prompt_id"].nunique(),
            }
        )
        .reset_index()
        .assign(part="iteration", site=site)
    )
    parts = [summary]
    if {"pc1", "pc2"} <= set(d.columns):
        with_pcs = d.dropna(subset=["pc1", "pc2"])
        ids = np.sort(with_pcs["prompt_id"].unique())
        if len(ids):
            chosen = ids[
                np.unique(np.linspace(0, len(ids) - 1, min(max_trajectories, len(ids))).round().astype(int))
            ]
            traj = with_pcs[with_pcs["prompt_id"].isin(chosen)].sort_values(["prompt_id", "iteration"])
            parts.append(traj[["prompt_id", "iteration", "pc1", "pc2"]].assign(part="trajectory", site=site))
    verdicts = tables.get("verdicts")
    if verdicts is not None and len(verdicts) and "verdict" in verdicts.columns:
        v = verdicts[verdicts["site"] == site] if "site" in verdicts.columns else verdicts
        v = last_position(v)
        counts = v["verdict"].value_counts()
        order = sorted(counts.index, key=_verdict_key)
        parts.append(
            pd.DataFrame({"verdict": order, "count": [int(counts[o]) for o in order]}).assign(
                part="verdict", site=site
            )
        )
    out = pd.concat(parts, ignore_index=True)
    for col in COLUMNS:
        if col not in out.columns:
            out[col] = np.nan
    for col in ("iteration", "n", "prompt_id", "count"):
        out[col] = out[col].astype("Int64")
    return out[COLUMNS]


def headline(tab: pd.DataFrame, layout: Layout) -> Headline:
    """Median step norm at the last iteration, first iteration it drops below 1 %, cosine of the
    first iteration to the last, and verdict counts."""
    out: Headline = {}
    it = tab[tab["part"] == "iteration"].sort_values("iteration")
    if len(it):
        out["step_norm_median_last"] = to_builtin(it["step_norm_median"].iloc[-1])
        below = it.loc[it["step_norm_median"] < CONVERGED, "iteration"]
        out["first_iteration_step_norm_below_1pct"] = to_builtin(below.min()) if len(below) else None
        out["cos_to_last_median_first"] = to_builtin(it["cos_to_last_median"].iloc[0])
        out["n_trajectories"] = to_builtin(it["n"].max())
    for _, row in tab[tab["part"] == "verdict"].iterrows():
        out[f"verdict_{row['verdict']}"] = to_builtin(row["count"])
    return out


def _verdict_color(v: str) -> str:
    return VERDICT_COLORS.get(v, CYCLE_COLOR if v.startswith("cycle") else "#8C8C8C")


# ---------------------------------------------------------------- drawing
def _mpl(tab: pd.DataFrame, layout: Layout, title: str) -> MplFigure:
    it = tab[tab["part"] == "iteration"].sort_values("iteration")
    traj = tab[tab["part"] == "trajectory"]
    ver = tab[tab["part"] == "verdict"]
    ids = list(dict.fromkeys(traj["prompt_id"].tolist()))
    site = str(tab["site"].dropna().iloc[0]) if len(tab) else "?"
    n = int(it["n"].max()) if len(it) else 0
    cmap = colormaps["viridis"]
    norm = Normalize(1, max(2, int(tab["iteration"].max())))
    n_rows_traj = 0 if not ids else (1 if len(ids) <= 6 else 2)
    with mpl_style():
        fig = new_figure(13, 4.0 + 2.3 * n_rows_traj)
        if n_rows_traj:
            top_fig, pca_fig = fig.subfigures(2, 1, height_ratios=[4.0, 2.3 * n_rows_traj])
        else:
            top_fig, pca_fig = fig, None
        ax_step, ax_cos, ax_ver = top_fig.subplots(1, 3)
        s = it.dropna(subset=["step_norm_median"])
        s = s[s["step_norm_median"] > 0]
        if len(s):
            ax_step.fill_between(
                s["iteration"],
                s["step_norm_q25"],
                s["step_norm_q75"],
                color=STEP_COLOR,
                alpha=0.18,
                lw=0,
                label="interquartile range",
            )
            ax_step.plot(
                s["iteration"], s["step_norm_median"], color=STEP_COLOR, marker="o", ms=3, label="median"
            )
            ax_step.set_yscale("log")
            ax_step.legend(loc="best")
        ax_step.set_title("(a) relative step norm ‖hₜ − hₜ₋₁‖ / ‖hₜ‖", loc="left")
        ax_step.set_xlabel("recurrent iteration t")
        ax_step.set_ylabel("relative step norm (log)")
        ax_cos.fill_between(
            it["iteration"], it["cos_to_last_q25"], it["cos_to_last_q75"], color=COS_COLOR, alpha=0.18, lw=0
        )
        ax_cos.plot(it["iteration"], it["cos_to_last_median"], color=COS_COLOR, marker="o", ms=3)
        ax_cos.set_title(f"(b) cosine to the last iteration (t = {layout.steps})", loc="left")
        ax_cos.set_xlabel("recurrent iteration t")
        ax_cos.set_ylabel("cosine similarity")
        lo = float(np.nanmin(it["cos_to_last_q25"])) if len(it) else 0.0
        ax_cos.set_ylim(min(lo - 0.05, 0.9), 1.02)
        if len(ver):
            total = int(ver["count"].sum())
            y = np.arange(len(ver))
            ax_ver.barh(y, ver["count"], color=[_verdict_color(v) for v in ver["verdict"]], height=0.6)
            ax_ver.set_yticks(y, ver["verdict"])
            ax_ver.invert_yaxis()
            for yi, c in zip(y, ver["count"], strict=True):
                ax_ver.annotate(
                    f"{int(c)} ({int(c) / total:.0%})",
                    (int(c), yi),
                    xytext=(3, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=8,
                )
            ax_ver.set_xlim(0, ver["count"].max() * 1.3)
            ax_ver.set_xlabel("trajectories")
            ax_ver.grid(False, axis="y")
        else:
            ax_ver.text(
                0.5, 0.5, "no verdicts recorded", ha="center", va="center", transform=ax_ver.transAxes
            )
            ax_ver.set_axis_off()
        ax_ver.set_title("(c) trajectory verdicts", loc="left")
        for ax in (ax_step, ax_cos):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        pca_axes = list(pca_fig.subplots(n_rows_traj, 6, squeeze=False).flat) if pca_fig is not None else []
        for ax in pca_axes[len(ids) :]:
            ax.set_axis_off()
        for i, (ax, pid) in enumerate(zip(pca_axes, ids, strict=False)):
            p = traj[traj["prompt_id"] == pid].sort_values("iteration")
            ax.plot(p["pc1"], p["pc2"], color="#b0b0b0", lw=0.8, zorder=1)
            ax.scatter(
                p["pc1"], p["pc2"], c=p["iteration"].astype(float), cmap=cmap, norm=norm, s=14, zorder=2
            )
            ax.scatter(
                p["pc1"].iloc[:1],
                p["pc2"].iloc[:1],
                s=60,
                facecolors="none",
                edgecolors="black",
                lw=1.0,
                zorder=3,
            )
            ax.scatter(
                p["pc1"].iloc[-1:], p["pc2"].iloc[-1:], s=40, marker="x", color="black", lw=1.2, zorder=3
            )
            ax.margins(0.12)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            ax.set_title(f"prompt {pid}", fontsize=8)
            if i % 6 == 0:
                ax.set_ylabel("PC 2", fontsize=8)
            if i // 6 == n_rows_traj - 1 or i + 6 >= len(ids):
                ax.set_xlabel("PC 1", fontsize=8)
        if pca_fig is not None:
            cbar = pca_fig.colorbar(
                ScalarMappable(norm=norm, cmap=cmap), ax=pca_axes, shrink=0.9, pad=0.01, aspect=25
            )
            cbar.set_label("iteration t")
            cbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            pca_fig.suptitle(
                f"(d) PCA trajectories of {len(ids)} of {n} prompts, each in its own basis "
                "(○ start, × end, colour: iteration)",
                x=0.01,
                ha="left",
                fontsize=10,
            )
        fig.suptitle(f"{title}\nlatent dynamics at {site}, last prompt position ({n} prompts)", fontsize=10)
    return fig


def _plotly(tab: pd.DataFrame, layout: Layout, title: str) -> go.Figure:
    it = tab[tab["part"] == "iteration"].sort_values("iteration")
    traj = tab[tab["part"] == "trajectory"]
    ver = tab[tab["part"] == "verdict"]
    ids = list(dict.fromkeys(traj["prompt_id"].tolist()))
    n_rows_traj = 0 if not ids else (1 if len(ids) <= 6 else 2)
    specs = [[{"colspan": 2}, None, {"colspan": 2}, None, {"colspan": 2}, None]] + [[{}] * 6] * n_rows_traj
    titles = ["(a) relative step norm", "(b) cosine to the last iteration", "(c) trajectory verdicts"]
    titles += [f"prompt {pid}" for pid in ids] + [""] * (6 * n_rows_traj - len(ids))
    fig = make_subplots(
        rows=1 + n_rows_traj,
        cols=6,
        specs=specs,
        subplot_titles=titles,
        row_heights=[1.5] + [1] * n_rows_traj,
        vertical_spacing=0.1,
        horizontal_spacing=0.04,
    )
    s = it.dropna(subset=["step_norm_median"])
    x = s["iteration"].astype(float).tolist()
    fig.add_trace(
        band_trace(x, s["step_norm_q25"], s["step_norm_q75"], STEP_COLOR, 0.18, name="step norm IQR"),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=s["step_norm_median"],
            mode="lines+markers",
            line=dict(color=STEP_COLOR),
            name="median step norm",
            hovertemplate="t=%{x} · median step norm %{y:.3g}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.update_yaxes(type="log", title_text="relative step norm", row=1, col=1)
    fig.update_xaxes(title_text="iteration t", dtick=1, row=1, col=1)
    x = it["iteration"].astype(float).tolist()
    fig.add_trace(
        band_trace(x, it["cos_to_last_q25"], it["cos_to_last_q75"], COS_COLOR, 0.18),
        row=1,
        col=3,
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=it["cos_to_last_median"],
            mode="lines+markers",
            line=dict(color=COS_COLOR),
            name="median cosine to last",
            hovertemplate="t=%{x} · median cosine %{y:.4f}<extra></extra>",
        ),
        row=1,
        col=3,
    )
    fig.update_xaxes(title_text="iteration t", dtick=1, row=1, col=3)
    if len(ver):
        fig.add_trace(
            go.Bar(
                x=ver["count"].astype(int),
                y=ver["verdict"],
                orientation="h",
                showlegend=False,
                marker_color=[_verdict_color(v) for v in ver["verdict"]],
                text=ver["count"].astype(int),
                textposition="outside",
                hovertemplate="%{y}: %{x}<extra></extra>",
            ),
            row=1,
            col=5,
        )
        fig.update_yaxes(autorange="reversed", row=1, col=5)
    t_max = max(2, int(tab["iteration"].max()))
    for i, pid in enumerate(ids):
        p = traj[traj["prompt_id"] == pid].sort_values("iteration")
        r, c = 2 + i // 6, 1 + i % 6
        fig.add_trace(
            go.Scatter(
                x=p["pc1"],
                y=p["pc2"],
                mode="lines+markers",
                line=dict(color="#b0b0b0", width=1),
                showlegend=False,
                marker=dict(
                    color=p["iteration"].astype(float),
                    colorscale="Viridis",
                    cmin=1,
                    cmax=t_max,
                    size=6,
                    showscale=i == 0,
                    colorbar=dict(title="t", len=0.5, y=0.25) if i == 0 else None,
                ),
                customdata=p["iteration"].astype(float),
                hovertemplate=f"t=%{{customdata}} · (%{{x:.3g}}, %{{y:.3g}})<extra>prompt {pid}</extra>",
            ),
            row=r,
            col=c,
        )
        fig.add_trace(
            go.Scatter(
                x=p["pc1"].iloc[[0, -1]],
                y=p["pc2"].iloc[[0, -1]],
                mode="markers",
                marker=dict(symbol=["circle-open", "x"], size=11, color="black"),
                showlegend=False,
                hoverinfo="skip",
            ),
            row=r,
            col=c,
        )
        fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, row=r, col=c)
        fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, row=r, col=c)
    site = str(tab["site"].dropna().iloc[0]) if len(tab) else "?"
    plotly_layout(
        fig,
        f"{title} — latent dynamics at {site} (PCA: own basis per prompt; ○ start, × end)",
        height=420 + 260 * n_rows_traj,
    )
    return fig


def draw(tab: pd.DataFrame, layout: Layout, title: str) -> tuple[MplFigure, go.Figure]:
    return _mpl(tab, layout, title), _plotly(tab, layout, title)


FIGURE = FigureSpec(
    NAME,
    ("dynamics",),
    table,
    draw,
    headline,
    description="step norms, cosine to the last state, verdicts and PCA trajectories of the latent",
)
