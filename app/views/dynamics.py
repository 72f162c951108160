"""Latent dynamics: how far the latent moves each iteration, and its path in PCA space (run or live)."""

from __future__ import annotations

import streamlit as st

from app import charts, data, sections, ui

RUN, LIVE = "Selected run", "Live prompt"


def _from_run() -> None:
    handle = ui.current_run()
    if handle is None:
        return
    path, mtime = handle.path, handle.mtime
    prompts = data.prompt_table(path, mtime)
    chosen = ui.prompt_picker(
        prompts,
        key="dyn_prompts",
        default=8,
        help_text="Trajectories of the recurrent state at the last prompt position",
    )
    dyn = data.dynamics_rows(path, mtime, tuple(chosen) if chosen else None)
    if dyn.empty:
        st.info("This run has no dynamics records" + (" yet." if handle.info.status == "running" else "."))
        return
    sites = sorted(dyn["site"].unique())
    if len(sites) > 1:
        site = st.segmented_control("Site", sites, default=sites[-1], key="dyn_site") or sites[-1]
        dyn = dyn[dyn["site"] == site]
    sections.trajectory_views(dyn, key="dyn_run", color_by="prompt_id")  # its PCA switch: a fragment
    a, b = st.columns([1, 2], gap="large")
    with a:
        counts = data.verdict_counts(path, mtime)
        ui.chart(
            charts.verdict_bar(counts), key="dyn_verdicts", data=counts, file_name=f"{handle.name}-verdicts"
        )
    with b:
        last = dyn.sort_values("iteration").groupby("prompt_id").tail(1).sort_values("prompt_id")
        st.dataframe(
            last[["prompt_id", "verdict", "step_norm", "cos_to_last", "norm"]].rename(
                columns={"step_norm": "last step", "cos_to_last": "cos to last"}
            ),
            hide_index=True,
            width="stretch",
            height=260,
        )


def _live() -> None:
    session = sections.live_session("dynlive", choose_lenses=False)
    if session is not None:
        sections.live_dynamics_view(session.probe, key="dyn_live")


def render() -> None:
    ui.page_header(
        "Latent dynamics",
        "The recurrent state after each iteration: its relative step, its cosine to the final state, "
        "and its trajectory in principal-component space (fixed point, cycle or drift).",
    )
    source = st.segmented_control("Source", [RUN, LIVE], default=RUN, key="dyn_page_source") or RUN
    if source == RUN:
        _from_run()
    else:
        _live()


ui.guarded(render)
