"""Patching: the heat maps of a patching run (``looplens study patching``), hover for the patched runs' top tokens."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app import data, ui
from studies.figures.patching import OUTCOME_LABELS, panel_label

#: The sweeps drawn as iteration × position heat maps (the chain-of-thought ones have one position).
_HEAT = ("operand", "operand_reinject")


@st.cache_data(show_spinner=False, max_entries=64)
def _choices(path: str, mtime: int) -> pd.DataFrame:
    """Experiment × direction × site × group combinations the run recorded (exact rows)."""
    return data.open_run(path, mtime).query(
        """
        SELECT DISTINCT p.experiment, p.direction, p.site, p.block, q."group" AS grp
        FROM patching p JOIN patch_pairs q USING (pair_id, experiment)
        WHERE p.method = 'exact' ORDER BY 1, 2, 4, 5
        """
    )


@st.cache_data(show_spinner=False, max_entries=64)
def _pairs(path: str, mtime: int, experiment: str, group: str | None) -> pd.DataFrame:
    params: list[Any] = [experiment]
    extra = ""
    if group is not None:
        extra = ' AND "group" = ?'
        params.append(group)
    return data.open_run(path, mtime).query(
        "SELECT pair_id, clean_prompt, corrupt_prompt, clean_tokens, corrupt_tokens, clean_logit_diff, "
        f"corrupt_logit_diff FROM patch_pairs WHERE experiment = ?{extra} ORDER BY pair_id",
        params,
    )


@st.cache_data(show_spinner=False, max_entries=64)
def _cells(
    path: str, mtime: int, experiment: str, direction: str, site: str, pair_ids: tuple[int, ...]
) -> pd.DataFrame:
    """The exact rows of one heat map (every pair of the group, or one)."""
    marks = ", ".join("?" * len(pair_ids))
    return data.open_run(path, mtime).query(
        f"""
        SELECT pair_id, iteration, position, effect, logit_diff, outcome, top_tokens, exit_step
        FROM patching
        WHERE method = 'exact' AND experiment = ? AND direction = ? AND site = ? AND pair_id IN ({marks})
        """,
        [experiment, direction, site, *pair_ids],
    )


def _token_list(cell: object) -> list[str]:
    try:
        value = json.loads(str(cell))
    except (TypeError, ValueError):
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _first_top(top_tokens: object) -> str:
    """The top-1 token of a ``top_tokens`` string (``'␣7' 0.912 | …``)."""
    first = str(top_tokens or "").split(" | ")[0]
    return first.rsplit(" ", 1)[0] if " " in first else first


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def heatmap(cells: pd.DataFrame, labels: list[str], steps: int, title: str, single: bool) -> go.Figure:
    """Iteration × position heat map of the mean effect; hover: the patched runs' top tokens."""
    width = max(len(labels), int(cells["position"].max()) + 1 if len(cells) else 1)
    z = np.full((steps, width), np.nan)
    hover = np.full((steps, width), "", dtype=object)
    for (t, p), g in cells.groupby(["iteration", "position"]):
        if not 1 <= int(t) <= steps:
            continue
        z[int(t) - 1, int(p)] = g["effect"].mean()
        if single:
            row = g.iloc[0]
            text = (
                f"effect {row['effect']:.3f} · logit diff {row['logit_diff']:.2f}<br>"
                f"outcome: {OUTCOME_LABELS.get(str(row['outcome']), row['outcome'])}<br>"
                f"top tokens: {_escape(str(row['top_tokens']))}"
            )
            if pd.notna(row.get("exit_step")):
                text += f"<br>expected exit iteration {row['exit_step']:.2f}"
        else:
            tops = Counter(_first_top(s) for s in g["top_tokens"])
            listed = ", ".join(f"{_escape(tok)} ×{n}" for tok, n in tops.most_common(4))
            flips = (g["outcome"] == "source").mean()
            text = (
                f"mean effect {g['effect'].mean():.3f} over {len(g)} pairs · flip share {flips:.2f}<br>"
                f"patched runs' top-1 tokens: {listed}"
            )
        hover[int(t) - 1, int(p)] = text
    names = [labels[p] if p < len(labels) else str(p) for p in range(width)]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=names,
            y=list(range(1, steps + 1)),
            zmid=0,
            zmin=-1,
            zmax=1,
            colorscale="RdBu_r",
            customdata=hover,
            hovertemplate="%{x} · t=%{y}<br>%{customdata}<extra></extra>",
            colorbar=dict(title="effect"),
        )
    )
    fig.update_xaxes(title_text="patched position (token)", type="category")
    fig.update_yaxes(title_text="iteration t", dtick=max(1, steps // 16))
    fig.update_layout(
        title=dict(text=title, font=dict(size=14)),
        height=max(360, 26 * steps + 160),
        margin=dict(l=60, r=20, t=60, b=90),
        plot_bgcolor="#e6e6e6",
    )
    return fig


def render() -> None:
    ui.page_header(
        "Patching",
        "Activation patching across iterations (`looplens study patching`): each cell is one patched run, "
        "one state (or the re-injected input from t on) taken from the source prompt; colour: the effect on "
        "the logit difference (0 = none, 1 = the source's). Grey: positions before the prompts' first "
        "difference (identical states). Hover a cell for the patched runs' top tokens.",
    )
    handle = ui.current_run()
    if handle is None:
        return
    path, mtime = handle.path, handle.mtime
    combos = _choices(path, mtime)
    combos = combos[combos["experiment"].isin(_HEAT)]
    if combos.empty:
        st.info(
            "This run has no patching heat maps. Make one with\n\n```bash\nlooplens study patching\n```\n\n"
            "(its figures also hold the chain-of-thought check and attribution patching's agreement)."
        )
        return
    steps = int((data.manifest(path, mtime).get("settings") or {}).get("steps") or 0)
    c1, c2, c3, c4 = st.columns(4)
    with c1:
        experiments = list(dict.fromkeys(combos["experiment"]))
        experiment = st.selectbox(
            "Experiment",
            experiments,
            key="patch_experiment",
            format_func=lambda e: {"operand": "state patches", "operand_reinject": "re-injected input"}.get(
                e, e
            ),
        )
    sub = combos[combos["experiment"] == experiment]
    with c2:
        direction = st.selectbox(
            "Direction",
            list(dict.fromkeys(sub["direction"])),
            key="patch_direction",
            format_func=lambda d: panel_label(experiment, d),
        )
    sub = sub[sub["direction"] == direction]
    with c3:
        site = st.selectbox("Site", list(dict.fromkeys(sub["site"])), key="patch_site")
    groups = [g for g in dict.fromkeys(sub[sub["site"] == site]["grp"]) if g is not None]
    with c4:
        group = st.selectbox("Changed operand", groups, key="patch_group") if groups else None
    pairs = _pairs(path, mtime, experiment, group)
    if pairs.empty:
        st.info("No pairs recorded for this choice yet.")
        return
    options = [-1, *pairs["pair_id"].tolist()]
    prompts = dict(zip(pairs["pair_id"], pairs["clean_prompt"], strict=True))
    corrupted = dict(zip(pairs["pair_id"], pairs["corrupt_prompt"], strict=True))
    choice = st.selectbox(
        "Pair",
        options,
        key="patch_pair",
        format_func=lambda i: (
            f"mean over all {len(pairs)} pairs" if i == -1 else f"#{i}: {prompts[i]!r} vs {corrupted[i]!r}"
        ),
    )
    ids = tuple(pairs["pair_id"].tolist()) if choice == -1 else (int(choice),)
    cells = _cells(path, mtime, experiment, direction, site, ids)
    steps = max(steps, int(cells["iteration"].max()) if len(cells) else 1)
    first = pairs.iloc[0] if choice == -1 else pairs[pairs["pair_id"] == choice].iloc[0]
    clean, corrupt = _token_list(first["clean_tokens"]), _token_list(first["corrupt_tokens"])
    labels = []
    for i, tok in enumerate(clean):
        text = tok.replace("\n", "↵").strip() or "␣"
        differs = i < len(corrupt) and corrupt[i] != tok
        labels.append(f"{i} {'[' + (group if choice == -1 and group else text) + ']' if differs else text}")
    what = "mean over pairs" if choice == -1 else f"pair #{choice}"
    ui.chart(
        heatmap(
            cells,
            labels,
            steps,
            f"{handle.name}: {panel_label(experiment, direction)} · {site} · {what}",
            choice != -1,
        ),
        key="patch_heat",
    )
    if choice != -1:
        row = pairs[pairs["pair_id"] == choice].iloc[0]
        st.caption(
            f"Unpatched logit difference: clean {row['clean_logit_diff']:.2f}, corrupted "
            f"{row['corrupt_logit_diff']:.2f} (logit of the clean answer − logit of the corrupted one)."
        )


ui.guarded(render)
