"""Live probe: type a prompt (or pick a problem), probe the model given on the command line, generate."""

from __future__ import annotations

import streamlit as st

from app import live, sections, ui

TABS = ["Rank trajectory", "Probability & entropy", "Lens grid", "Latent dynamics", "Adaptive exit"]


def render() -> None:
    ui.page_header(
        "Live probe",
        "Probe the model given on the command line: rank trajectories, probability and entropy per layer, "
        "the iteration × block map, the lens grid, latent dynamics, and why adaptive depth exits where it "
        "does. Only the open tab is drawn.",
    )
    session = sections.live_session("live")
    if session is None:
        return
    probe = session.probe
    sections.probe_summary(probe)
    _views(session)


@st.fragment
def _views(session: sections.LiveSession) -> None:
    """The probe's views in lazy tabs (a fragment: a tab or a widget in it reruns only this part)."""
    probe = session.probe
    gated = session.model.layout.exit_gate
    tabs = sections.lazy_tabs(TABS + (["Exit gate"] if gated else []), key="live_tab")
    views = [
        lambda: sections.live_rank_view(probe, key="live_rank"),
        lambda: sections.probability_view(probe, key="live_prob"),
        lambda: sections.lens_grid_view(session, key="live_grid"),
        lambda: sections.live_dynamics_view(probe, key="live_dyn"),
        lambda: sections.adaptive_view(session, key="live", criteria=live.exit_criteria(session.model)),
        lambda: sections.exit_gate_view(probe, key="live"),
    ]
    for tab, view in zip(tabs, views, strict=False):
        if tab.open:
            with tab:
                view()


ui.guarded(render)
