"""Lens grid: the logit-lens picture (layers × positions, top-1 token by probability) for one prompt, live."""

from __future__ import annotations

import streamlit as st

from app import data, sections, ui


def _run_prompts():
    """The selected run's prompts to pick from, or ``None`` (quietly) when there is no usable run."""
    runs = ui.runs_found()
    name = st.session_state.get(ui.RUN_KEY)
    info = next((r for r in runs if r.name == name), None)
    if info is None or info.status == "corrupt":
        return None
    try:
        return data.prompt_table(*data.run_ref(info.path))
    except Exception:  # noqa: BLE001 - the grid works without run prompts
        return None


def render() -> None:
    ui.page_header(
        "Lens grid",
        "Runs keep only the last position, so the grid probes the live model at every position of "
        "one prompt: each row a layer, each column a position, each cell the decoded top-1 token.",
    )
    session = sections.live_session("grid", run_prompts=_run_prompts(), choose_lenses=False)
    if session is not None:
        st.fragment(sections.lens_grid_view)(session, key="grid")  # the grid's widgets rerun only the grid


ui.guarded(render)
