"""Live probe: type a prompt (or pick a problem), probe the model given on the command line, generate."""

from __future__ import annotations

import streamlit as st

from app import live, sections, ui


def render() -> None:
    ui.page_header(
        "Live probe",
        "Probe the model given on the command line: rank trajectories, the iteration × block map, the "
        "lens grid and latent dynamics for one prompt, and adaptive-depth generation.",
    )
    name = ui.settings().model
    model = ui.load_model_or_explain(name)
    if model is None:
        return
    sections.model_caption(model, name)
    args = sections.live_prompt_form("live", model)
    if args is None:
        st.info(
            "Type a prompt (or pick a problem) and press **Probe**: a small model answers in about a second "
            "on a CPU."
        )
        return
    with st.spinner("Probing…"):
        probe = live.cached_probe(name, args.prompt, args.num_steps, args.lenses, args.targets)
    sections.probe_summary(probe)
    names = ["Rank trajectory", "Lens grid", "Latent dynamics", "Adaptive generation"]
    gated = model.layout.exit_gate
    tabs = st.tabs(names + (["Exit gate"] if gated else []))
    with tabs[0]:
        sections.live_rank_view(probe, key="live_rank")
    with tabs[1]:
        sections.lens_grid_view(probe, key="live_grid")
    with tabs[2]:
        sections.live_dynamics_view(probe, key="live_dyn")
    with tabs[3]:
        sections.generation_view(
            name, args.prompt, args.num_steps, key="live", criteria=live.exit_criteria(model)
        )
    if gated:
        with tabs[4]:
            sections.exit_gate_view(probe, key="live")


ui.guarded(render)
