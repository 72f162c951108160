"""The patching study's figures: where across iterations and positions patching moves the answer.

=========================  ==========================================================================
``patching_heatmap``       mean effect of one patch (0 = none, 1 = the source's logit difference) as an
                           iteration × position heat map per core block: rows experiment × direction
                           (× block), columns the changed operand; positions before the prompts' first
                           difference hold identical states in both runs (grey: a patch there is a no-op)
``patching_flip``          the iteration at which patching flips the answer: the share of pairs whose
                           top-1 token becomes the source's answer when one state (any position, or the
                           last one) is patched at iteration t, and for re-injections the changed
                           operand's clean input from iteration t to T
``patching_exit_gate``     (exit-gated families) the shift of the expected exit iteration Σ t·p_t per patch
``cot_patching``           the latent chain-of-thought check: outcome shares per patched iteration
``attribution_agreement``  attribution patching's estimate against exact patching, per cell, with Spearman ρ
=========================  ==========================================================================

Every table is computed from the run's ``patching`` and ``patch_pairs`` tables (exact rows; the last
figure also the attribution rows).

Example:
    >>> sorted(PATCHING_FIGURES)
    ['attribution_agreement', 'cot_patching', 'patching_exit_gate', 'patching_flip', 'patching_heatmap']
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure as MplFigure
from plotly.subplots import make_subplots

from probes.patching import attribution_agreement
from studies.figures.base import FigureSpec, Headline, Tables, require_columns, to_builtin
from studies.figures.layout import Layout
from studies.figures.style import mpl_style, new_figure, plotly_layout

__all__ = ["ATTRIBUTION", "COT", "EXIT_GATE", "FLIP", "HEATMAP", "PATCHING_FIGURES", "panel_label"]

_ROWS = [
    "pair_id",
    "experiment",
    "direction",
    "method",
    "site",
    "block",
    "iteration",
    "position",
    "effect",
    "outcome",
]
_HEAT_EXPERIMENTS = ("operand", "operand_reinject")
_COT_EXPERIMENTS = ("cot_other", "cot_same", "cot_reinject")
_NOTE = {
    ("operand", "denoise"): "clean state → corrupted run",
    ("operand", "noise"): "corrupted state → clean run",
    ("operand_reinject", "denoise"): "clean input re-injected from t to T → corrupted run",
}
OUTCOME_COLORS = {"base": "#7f7f7f", "source": "#D55E00", "follow": "#0072B2", "other": "#CC79A7"}
OUTCOME_LABELS = {
    "base": "recipient's own answer",
    "source": "donor's answer (copied)",
    "follow": "follows the donor's intermediate",
    "other": "another token",
}


def panel_label(experiment: str, direction: str) -> str:
    """What one row of heat maps shows, in words."""
    return _NOTE.get((experiment, direction), f"{experiment} · {direction}")


def _tokens(cell: object) -> list[str]:
    try:
        value = json.loads(str(cell))
    except (TypeError, ValueError):
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _first_difference(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per pair: the first position where the two prompts' tokens differ, and the clean tokens."""
    out = []
    for row in pairs.itertuples(index=False):
        clean, corrupt = _tokens(row.clean_tokens), _tokens(row.corrupt_tokens)
        diff = next((i for i, (a, b) in enumerate(zip(clean, corrupt, strict=False)) if a != b), len(clean))
        out.append({"pair_id": row.pair_id, "experiment": row.experiment, "first_difference": diff})
    return pd.DataFrame(out, columns=["pair_id", "experiment", "first_difference"])


def _exact(tables: Tables, experiments: tuple[str, ...]) -> pd.DataFrame:
    rows = tables["patching"]
    require_columns(rows, _ROWS, "patching")
    rows = rows[(rows["method"] == "exact") & rows["experiment"].isin(experiments)]
    pairs = tables["patch_pairs"][["pair_id", "experiment", "group"]]
    return rows.merge(pairs, on=["pair_id", "experiment"], how="left")


def _axis_labels(tables: Tables, experiment: str, group: str) -> dict[int, str]:
    """Position → the clean prompt's token there (the first pair of the group), the changed one marked."""
    pairs = tables["patch_pairs"]
    sel = pairs[(pairs["experiment"] == experiment) & (pairs["group"] == group)]
    if sel.empty:
        return {}
    row = sel.iloc[0]
    clean, corrupt = _tokens(row["clean_tokens"]), _tokens(row["corrupt_tokens"])
    labels = {}
    for i, tok in enumerate(clean):
        text = tok.replace("\n", "↵").strip() or "␣"
        if i < len(corrupt) and corrupt[i] != tok:
            text = f"[{group}]" if group in ("a", "b", "c") else f"[{text}]"
        labels[i] = f"{i} {text}"
    return labels


# ---------------------------------------------------------------------------------------- heat maps
HEAT_COLUMNS = [
    "experiment", "direction", "group", "site", "block", "iteration", "position", "label",
    "effect_mean", "effect_median", "flip_share", "n",
]  # fmt: skip


def heatmap_table(tables: Tables, layout: Layout) -> pd.DataFrame:
    """Mean / median effect and flip share per experiment, direction, group, block, iteration, position."""
    rows = _exact(tables, _HEAT_EXPERIMENTS)
    if rows.empty:
        return pd.DataFrame(columns=HEAT_COLUMNS)
    rows = rows.assign(flip=(rows["outcome"] == "source").astype(float))
    keys = ["experiment", "direction", "group", "site", "block", "iteration", "position"]
    out = (
        rows.groupby(keys, dropna=False)
        .agg(
            effect_mean=("effect", "mean"),
            effect_median=("effect", "median"),
            flip_share=("flip", "mean"),
            n=("effect", "size"),
        )
        .reset_index()
    )
    labels = {
        (e, g): _axis_labels(tables, e, g)
        for e, g in out[["experiment", "group"]].drop_duplicates().itertuples(index=False)
    }
    out["label"] = [
        labels[(e, g)].get(int(p), str(p))
        for e, g, p in zip(out["experiment"], out["group"], out["position"], strict=True)
    ]
    return out[HEAT_COLUMNS]


def _panels(tab: pd.DataFrame) -> tuple[list[tuple[str, str, int]], list[str]]:
    """Heat-map rows (experiment, direction, block: state patches block by block, then re-injections)
    and columns (the changed operand)."""
    combos = tab[["experiment", "direction", "block"]].drop_duplicates()
    order = {e: i for i, e in enumerate(_HEAT_EXPERIMENTS)}
    rows = sorted(
        (tuple(r) for r in combos.itertuples(index=False)),
        key=lambda r: (order.get(r[0], 9), r[2], r[1] != "denoise"),
    )
    groups = sorted(tab["group"].dropna().unique().tolist())
    return [(str(e), str(d), int(b)) for e, d, b in rows], groups


def _grid(
    tab: pd.DataFrame, experiment: str, direction: str, block: int, group: str, steps: int, value: str
) -> tuple[np.ndarray, list[str]]:
    d = tab[
        (tab["experiment"] == experiment)
        & (tab["direction"] == direction)
        & (tab["block"] == block)
        & (tab["group"] == group)
    ]
    labels_all = tab[(tab["experiment"] == experiment) & (tab["group"] == group)].drop_duplicates("position")
    width = int(max(labels_all["position"].max() + 1, 1)) if len(labels_all) else 1
    grid = np.full((steps, width), np.nan)
    for t, p, v in zip(d["iteration"], d["position"], d[value], strict=True):
        if 1 <= t <= steps:
            grid[int(t) - 1, int(p)] = v
    names = dict(zip(labels_all["position"], labels_all["label"], strict=True))
    return grid, [names.get(p, str(p)) for p in range(width)]


def _heat_draw(tab: pd.DataFrame, layout: Layout, title: str, value: str = "effect_mean", cmap: str = "RdBu_r",
               what: str = "mean effect (0 none · 1 = source)", center: float = 0.0, span: float = 1.0) -> tuple[MplFigure, go.Figure]:  # fmt: skip
    panels, groups = _panels(tab)
    steps = layout.steps
    with mpl_style():
        fig = new_figure(3.4 * len(groups) + 1.2, 2.9 * len(panels) + 0.6)
        axes = np.atleast_2d(fig.subplots(len(panels), len(groups), squeeze=False))
        norm = TwoSlopeNorm(vcenter=center, vmin=center - span, vmax=center + span)
        image = None
        for r, (experiment, direction, block) in enumerate(panels):
            for c, group in enumerate(groups):
                ax = axes[r, c]
                grid, labels = _grid(tab, experiment, direction, block, group, steps, value)
                masked = np.ma.masked_invalid(grid)
                ax.set_facecolor("#e6e6e6")
                image = ax.imshow(masked, aspect="auto", origin="lower", cmap=cmap, norm=norm, interpolation="nearest",
                                  extent=(-0.5, grid.shape[1] - 0.5, 0.5, steps + 0.5))  # fmt: skip
                ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
                ax.grid(False)
                if c == 0:
                    ax.set_ylabel(("injection" if block < 0 else f"core.{block}") + " · iteration t")
                ax.set_title(
                    f"{panel_label(experiment, direction)}\nchanged operand {group}", fontsize=8, loc="left"
                )
        if image is not None:
            fig.colorbar(image, ax=axes, shrink=0.6, label=what)
        fig.suptitle(
            f"{title}\n{what}; grey: positions before the first difference (identical states)", fontsize=10
        )
    pfig = make_subplots(
        rows=len(panels), cols=len(groups), vertical_spacing=0.12 / max(1, len(panels) - 1) if len(panels) > 1 else 0.1,
        subplot_titles=[f"{panel_label(e, d)} · {'injection' if b < 0 else f'core.{b}'} · operand {g}" for e, d, b in panels for g in groups],
    )  # fmt: skip
    for r, (experiment, direction, block) in enumerate(panels):
        for c, group in enumerate(groups):
            grid, labels = _grid(tab, experiment, direction, block, group, steps, value)
            flips, _ = _grid(tab, experiment, direction, block, group, steps, "flip_share")
            pfig.add_trace(
                go.Heatmap(
                    z=grid, x=labels, y=list(range(1, steps + 1)), zmid=center, zmin=center - span, zmax=center + span,
                    colorscale="RdBu_r" if cmap == "RdBu_r" else cmap, showscale=(r == 0 and c == len(groups) - 1),
                    customdata=flips, hovertemplate="%{x} · t=%{y}<br>" + what + " %{z:.3f}<br>flip share %{customdata:.2f}<extra></extra>",
                ),
                row=r + 1, col=c + 1,
            )  # fmt: skip
    plotly_layout(pfig, f"{title} — {what}", height=320 * len(panels) + 80)
    return fig, pfig


def heatmap_headline(tab: pd.DataFrame, layout: Layout) -> Headline:
    """Per experiment and direction: the cell with the largest mean effect, and the largest mean effect
    of any cell before the last two iterations (how long a single patch is remembered)."""
    out: Headline = {}
    early = layout.steps - 2
    for (experiment, direction), d in tab.groupby(["experiment", "direction"]):
        key = f"{experiment}_{direction}"
        best = d.loc[d["effect_mean"].idxmax()] if d["effect_mean"].notna().any() else None
        if best is not None:
            out[f"{key}_max_effect"] = to_builtin(round(float(best["effect_mean"]), 3))
            out[f"{key}_max_at"] = f"t={int(best['iteration'])} {best['label']}"
        before = d[d["iteration"] <= early]["effect_mean"]
        if len(before) and experiment == "operand":
            out[f"{key}_max_effect_t<={early}"] = to_builtin(round(float(before.max()), 3))
    return out


def _heat_figure(tab: pd.DataFrame, layout: Layout, title: str) -> tuple[MplFigure, go.Figure]:
    return _heat_draw(tab, layout, title)


HEATMAP = FigureSpec(
    "patching_heatmap", ("patching", "patch_pairs"), heatmap_table, _heat_figure, heatmap_headline,
    "mean effect of one patch per iteration × position, per core block, direction and changed operand",
)  # fmt: skip


# ---------------------------------------------------------------------------------------- flips
FLIP_COLUMNS = ["experiment", "direction", "where", "iteration", "flip_share", "n_pairs"]


def flip_table(tables: Tables, layout: Layout) -> pd.DataFrame:
    """Share of pairs whose answer becomes the source's when patched at iteration t: at any position, at the
    last position, at the changed operand's position."""
    rows = _exact(tables, _HEAT_EXPERIMENTS)
    if rows.empty:
        return pd.DataFrame(columns=FLIP_COLUMNS)
    first = _first_difference(tables["patch_pairs"])
    rows = rows.merge(first, on=["pair_id", "experiment"], how="left")
    last = rows.groupby(["pair_id", "experiment"])["position"].transform("max")
    rows = rows.assign(flip=rows["outcome"] == "source", is_last=rows["position"] == last,
                       is_operand=rows["position"] == rows["first_difference"])  # fmt: skip
    parts = []
    for where, mask in (
        ("any position", None),
        ("last position", "is_last"),
        ("changed operand", "is_operand"),
    ):
        sel = rows if mask is None else rows[rows[mask]]
        per_pair = (
            sel.groupby(["experiment", "direction", "iteration", "pair_id"])["flip"].any().reset_index()
        )
        agg = per_pair.groupby(["experiment", "direction", "iteration"]).agg(
            flip_share=("flip", "mean"), n_pairs=("pair_id", "nunique")
        )
        parts.append(agg.reset_index().assign(where=where))
    return pd.concat(parts, ignore_index=True)[FLIP_COLUMNS]


def flip_headline(tab: pd.DataFrame, layout: Layout) -> Headline:
    """Per experiment and direction: the largest share of pairs whose answer one patch flips (any position)
    and at which iteration, and the first iteration at which any pair flips; for re-injections also the
    share flipped when the clean input is re-injected for the last iteration only (t = T)."""
    out: Headline = {}
    for (experiment, direction), d in tab.groupby(["experiment", "direction"]):
        key = f"{experiment}_{direction}"
        anyp = d[d["where"] == "any position"].set_index("iteration")["flip_share"].sort_index()
        if anyp.empty:
            continue
        out[f"{key}_flip_share_max"] = to_builtin(round(float(anyp.max()), 3))
        out[f"{key}_flip_share_max_t"] = to_builtin(int(anyp.idxmax()))
        flipped = anyp[anyp > 0]
        out[f"{key}_first_flip_t"] = to_builtin(int(flipped.index.min())) if len(flipped) else None
        if experiment == "operand_reinject" and layout.steps in anyp.index:
            out[f"{key}_flip_share_last_iteration_only"] = to_builtin(round(float(anyp.loc[layout.steps]), 3))
    return out


def _flip_draw(tab: pd.DataFrame, layout: Layout, title: str) -> tuple[MplFigure, go.Figure]:
    combos = tab[["experiment", "direction"]].drop_duplicates().values.tolist()
    styles = {
        "any position": ("-", "#0072B2"),
        "last position": ("--", "#D55E00"),
        "changed operand": (":", "#009E73"),
    }
    with mpl_style():
        fig = new_figure(3.6 * len(combos) + 0.5, 3.4)
        axes = np.atleast_1d(fig.subplots(1, len(combos), squeeze=False)[0])
        for ax, (experiment, direction) in zip(axes, combos, strict=True):
            d = tab[(tab["experiment"] == experiment) & (tab["direction"] == direction)]
            for where, (ls, color) in styles.items():
                s = d[d["where"] == where].sort_values("iteration")
                if len(s):
                    ax.plot(
                        s["iteration"], s["flip_share"], ls=ls, color=color, marker="o", ms=3, label=where
                    )
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel(
                "patched iteration t" if experiment == "operand" else "re-injected from iteration t"
            )
            ax.set_title(panel_label(experiment, direction), fontsize=8, loc="left")
        axes[0].set_ylabel("share of pairs whose answer flips to the source's")
        axes[0].legend(loc="upper left")
        fig.suptitle(f"{title}\nthe iteration at which patching flips the answer", fontsize=10)
    pfig = make_subplots(rows=1, cols=len(combos), subplot_titles=[panel_label(e, d) for e, d in combos])
    for c, (experiment, direction) in enumerate(combos):
        d = tab[(tab["experiment"] == experiment) & (tab["direction"] == direction)]
        for where, (ls, color) in styles.items():
            s = d[d["where"] == where].sort_values("iteration")
            pfig.add_trace(
                go.Scatter(x=s["iteration"], y=s["flip_share"], name=where, legendgroup=where, showlegend=c == 0,
                           mode="lines+markers", line=dict(color=color, dash={"-": "solid", "--": "dash", ":": "dot"}[ls]),
                           hovertemplate=f"{where}<br>t=%{{x}} · flip share %{{y:.2f}}<extra></extra>"),
                row=1, col=c + 1,
            )  # fmt: skip
    pfig.update_yaxes(range=[-0.02, 1.02])
    plotly_layout(pfig, f"{title} — the iteration at which patching flips the answer", height=420)
    return fig, pfig


FLIP = FigureSpec(
    "patching_flip", ("patching", "patch_pairs"), flip_table, _flip_draw, flip_headline,
    "share of pairs whose answer flips to the source's per patched iteration",
)  # fmt: skip


# ---------------------------------------------------------------------------------------- exit gate
def exit_table(tables: Tables, layout: Layout) -> pd.DataFrame:
    """Mean shift of the expected exit iteration (patched − recipient's) per cell (exit-gated runs only)."""
    rows = _exact(tables, ("operand",))
    if rows.empty or "exit_step" not in rows or rows["exit_step"].isna().all():
        return pd.DataFrame(columns=HEAT_COLUMNS)
    pairs = tables["patch_pairs"][["pair_id", "experiment", "clean_exit_step", "corrupt_exit_step"]]
    rows = rows.merge(pairs, on=["pair_id", "experiment"])
    base = np.where(rows["direction"] == "denoise", rows["corrupt_exit_step"], rows["clean_exit_step"])
    rows = rows.assign(effect=rows["exit_step"] - base, flip=(rows["outcome"] == "source").astype(float))
    keys = ["experiment", "direction", "group", "site", "block", "iteration", "position"]
    out = rows.groupby(keys).agg(effect_mean=("effect", "mean"), effect_median=("effect", "median"),
                                 flip_share=("flip", "mean"), n=("effect", "size")).reset_index()  # fmt: skip
    labels = {
        (e, g): _axis_labels(tables, e, g)
        for e, g in out[["experiment", "group"]].drop_duplicates().itertuples(index=False)
    }
    out["label"] = [
        labels[(e, g)].get(int(p), str(p))
        for e, g, p in zip(out["experiment"], out["group"], out["position"], strict=True)
    ]
    return out[HEAT_COLUMNS]


def exit_headline(tab: pd.DataFrame, layout: Layout) -> Headline:
    out: Headline = {}
    for direction, d in tab.groupby("direction"):
        i = d["effect_mean"].abs().idxmax()
        out[f"{direction}_largest_exit_shift"] = to_builtin(round(float(d.loc[i, "effect_mean"]), 3))
        out[f"{direction}_largest_exit_shift_at"] = f"t={int(d.loc[i, 'iteration'])} {d.loc[i, 'label']}"
    return out


def _exit_draw(tab: pd.DataFrame, layout: Layout, title: str) -> tuple[MplFigure, go.Figure]:
    span = float(max(tab["effect_mean"].abs().max(), 1e-3))
    return _heat_draw(
        tab, layout, title, cmap="PuOr_r", what="mean shift of the expected exit iteration", span=span
    )


EXIT_GATE = FigureSpec(
    "patching_exit_gate", ("patching", "patch_pairs"), exit_table, _exit_draw, exit_headline,
    "shift of the exit gate's expected exit iteration per patched iteration × position",
)  # fmt: skip


# ---------------------------------------------------------------------------------------- chain of thought
COT_COLUMNS = ["experiment", "iteration", "outcome", "share", "n_pairs"]


def cot_table(tables: Tables, layout: Layout) -> pd.DataFrame:
    """Share of each outcome (the patched run's top-1 token) per chain-of-thought experiment and iteration."""
    rows = _exact(tables, _COT_EXPERIMENTS)
    if rows.empty:
        return pd.DataFrame(columns=COT_COLUMNS)
    counts = rows.groupby(["experiment", "iteration", "outcome"]).size().rename("count").reset_index()
    totals = rows.groupby(["experiment", "iteration"])["pair_id"].nunique().rename("n_pairs").reset_index()
    full = totals.merge(pd.DataFrame({"outcome": list(OUTCOME_LABELS)}), how="cross")
    out = full.merge(counts, on=["experiment", "iteration", "outcome"], how="left").fillna({"count": 0})
    out["share"] = out["count"] / out["n_pairs"]
    return out[COT_COLUMNS]


def cot_headline(tab: pd.DataFrame, layout: Layout) -> Headline:
    """The largest share of answers that follow the donor's intermediate, and where the donor's answer is
    copied instead, per experiment; plus one sentence."""
    out: Headline = {}
    words = []
    for experiment, d in tab.groupby("experiment"):
        wide = d.pivot_table(index="iteration", columns="outcome", values="share").fillna(0.0)
        for outcome in ("follow", "source", "base"):
            if outcome in wide:
                t = int(wide[outcome].idxmax())
                out[f"{experiment}_{outcome}_max"] = to_builtin(round(float(wide[outcome].max()), 3))
                out[f"{experiment}_{outcome}_max_t"] = t
        base = wide.get("base", pd.Series(0.0, index=wide.index))
        kept_until = base[base >= 0.5].index
        if experiment == "cot_other":
            words.append(
                f"a donor's last-position state (different intermediate) makes the answer follow its "
                f"intermediate in at most {out.get('cot_other_follow_max', 0):.0%} of problems "
                f"(t={out.get('cot_other_follow_max_t')}); the recipient keeps its own answer in ≥ half "
                f"of them for {len(kept_until)} of {len(wide)} patched iterations"
            )
        elif experiment == "cot_same":
            words.append(
                f"a donor with the same intermediate changes the answer to its own in at most "
                f"{out.get('cot_same_source_max', 0):.0%} (t={out.get('cot_same_source_max_t')})"
            )
        elif experiment == "cot_reinject":
            words.append(
                f"re-injecting the donor's sub-expression makes the answer follow its intermediate in up to "
                f"{out.get('cot_reinject_follow_max', 0):.0%} (from t={out.get('cot_reinject_follow_max_t')})"
            )
    out["finding"] = "; ".join(words)
    return out


def _cot_draw(tab: pd.DataFrame, layout: Layout, title: str) -> tuple[MplFigure, go.Figure]:
    experiments = [e for e in _COT_EXPERIMENTS if e in set(tab["experiment"])]
    about = {
        "cot_other": "donor state at the last position, iteration t\n(different intermediate and final operation)",
        "cot_same": "donor state at the last position, iteration t\n(same intermediate, different final operation)",
        "cot_reinject": "donor's sub-expression re-injected from t to T\n(different intermediate)",
    }
    with mpl_style():
        fig = new_figure(3.8 * len(experiments) + 0.5, 3.5)
        axes = np.atleast_1d(fig.subplots(1, len(experiments), squeeze=False)[0])
        for ax, experiment in zip(axes, experiments, strict=True):
            d = tab[tab["experiment"] == experiment]
            for outcome, color in OUTCOME_COLORS.items():
                s = d[d["outcome"] == outcome].sort_values("iteration")
                if len(s) and (s["share"] > 0).any():
                    ax.plot(
                        s["iteration"],
                        s["share"],
                        color=color,
                        marker="o",
                        ms=3,
                        label=OUTCOME_LABELS[outcome],
                    )
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("iteration t")
            ax.set_title(about[experiment], fontsize=8, loc="left")
            ax.legend(loc="center left", fontsize=7)
        axes[0].set_ylabel("share of problems")
        fig.suptitle(
            f"{title}\nlatent chain of thought: does the final answer follow a patched intermediate?",
            fontsize=10,
        )
    pfig = make_subplots(
        rows=1, cols=len(experiments), subplot_titles=[about[e].replace("\n", " ") for e in experiments]
    )
    for c, experiment in enumerate(experiments):
        d = tab[tab["experiment"] == experiment]
        for outcome, color in OUTCOME_COLORS.items():
            s = d[d["outcome"] == outcome].sort_values("iteration")
            pfig.add_trace(
                go.Scatter(x=s["iteration"], y=s["share"], name=OUTCOME_LABELS[outcome], legendgroup=outcome,
                           showlegend=c == 0, mode="lines+markers", line=dict(color=color),
                           hovertemplate=f"{OUTCOME_LABELS[outcome]}<br>t=%{{x}} · %{{y:.0%}}<extra></extra>"),
                row=1, col=c + 1,
            )  # fmt: skip
    pfig.update_yaxes(range=[-0.02, 1.02])
    plotly_layout(pfig, f"{title} — latent chain of thought, causal check", height=440)
    return fig, pfig


COT = FigureSpec(
    "cot_patching", ("patching", "patch_pairs"), cot_table, _cot_draw, cot_headline,
    "outcomes of patching a donor's intermediate-result information, per iteration",
)  # fmt: skip


# ---------------------------------------------------------------------------------------- attribution
ATTR_COLUMNS = ["direction", "site", "iteration", "position", "pair_id", "effect_exact", "effect_attribution"]


def attribution_table(tables: Tables, layout: Layout) -> pd.DataFrame:
    """Per cell of the operand sweep: the effect of the patch, exact and as attribution patching estimates it."""
    rows = tables["patching"]
    require_columns(rows, _ROWS, "patching")
    rows = rows[rows["experiment"] == "operand"]
    key = ["pair_id", "direction", "site", "iteration", "position"]
    exact = rows[rows["method"] == "exact"][key + ["effect"]]
    approx = rows[rows["method"] == "attribution"][key + ["effect"]]
    if exact.empty or approx.empty:
        return pd.DataFrame(columns=ATTR_COLUMNS)
    both = exact.merge(approx, on=key, suffixes=("_exact", "_attribution"))
    return both[ATTR_COLUMNS].reset_index(drop=True)


def attribution_headline(tab: pd.DataFrame, layout: Layout) -> Headline:
    """Spearman's ρ over every cell and over the mean heat maps (``probes.patching.attribution_agreement``)."""
    agreement = attribution_agreement(
        pd.concat(
            [
                tab.rename(columns={"effect_exact": "effect"}).drop(columns="effect_attribution").assign(method="exact"),
                tab.rename(columns={"effect_attribution": "effect"}).drop(columns="effect_exact").assign(method="attribution"),
            ]
        ).assign(experiment="operand")
    )  # fmt: skip
    rho, heat = agreement.get("rho_cells"), agreement.get("rho_heatmap")
    return {
        "cells": agreement.get("cells", 0),
        "no_op_cells": agreement.get("no_op_cells", 0),
        "spearman_rho": to_builtin(round(rho, 4)) if rho is not None else None,
        "spearman_rho_heatmap": to_builtin(round(heat, 4)) if heat is not None else None,
    }


def _attribution_draw(tab: pd.DataFrame, layout: Layout, title: str) -> tuple[MplFigure, go.Figure]:
    rho = attribution_headline(tab, layout).get("spearman_rho")
    x, y = tab["effect_exact"], tab["effect_attribution"]
    with mpl_style():
        fig = new_figure(5.2, 4.4)
        ax = fig.subplots()
        image = ax.scatter(x, y, c=tab["iteration"], s=6, cmap="viridis", alpha=0.7)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], color="#808080", lw=0.8, ls=":")
        ax.set_xlabel("exact patching: effect (0 none · 1 = source)")
        ax.set_ylabel("attribution patching: estimated effect")
        fig.colorbar(image, ax=ax, label="patched iteration t")
        ax.set_title(f"{title}\nattribution vs exact patching, Spearman ρ = {rho}", fontsize=9)
    pfig = go.Figure(
        go.Scattergl(x=x, y=y, mode="markers",
                     marker=dict(color=tab["iteration"], colorscale="Viridis", size=4, showscale=True, colorbar=dict(title="t")),
                     customdata=np.stack([tab["iteration"], tab["position"], tab["pair_id"]], -1),
                     hovertemplate="pair %{customdata[2]} · t=%{customdata[0]} · position %{customdata[1]}<br>exact %{x:.3f} · estimate %{y:.3f}<extra></extra>")
    )  # fmt: skip
    pfig.update_xaxes(title_text="exact patching: effect")
    pfig.update_yaxes(title_text="attribution patching: estimated effect")
    plotly_layout(pfig, f"{title} — attribution vs exact patching (ρ = {rho})", height=520)
    return fig, pfig


ATTRIBUTION = FigureSpec(
    "attribution_agreement", ("patching", "patch_pairs"), attribution_table, _attribution_draw,
    attribution_headline, "attribution patching's estimate of every cell against exact patching",
)  # fmt: skip

#: The patching study's figures by name, in the order they are drawn.
PATCHING_FIGURES: dict[str, FigureSpec] = {f.name: f for f in (HEATMAP, FLIP, EXIT_GATE, COT, ATTRIBUTION)}
