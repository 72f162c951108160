"""Wavefront: step through the diffusion sampler's window, one diffusion step at a time.

Reads a ``looplens study sampler`` run's ``wavefront`` table (the traced prompts of its traced setting):
per step, the window's positions, their token guesses, which are frozen, how many core iterations each
has had and the lens rank of the finally generated next token; below, the whole wavefront as heat maps
(the study's ``wavefront`` figure, interactive) and the run's speed–accuracy summary.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import data, ui
from studies.figures import Layout
from studies.figures import sampler_frontier as frontier_figure
from studies.figures import wavefront as wavefront_figure


@st.cache_data(show_spinner=False, max_entries=64)
def _wavefront(path: str, mtime: int) -> pd.DataFrame:
    return data.open_run(path, mtime).query(
        "SELECT prompt_id, setting, diffusion_step, position, site, iteration, lens, token_id, token, rank, "
        "frozen, recurrence, guess_id, guess, stability FROM wavefront WHERE site = 'latent' ORDER BY "
        "prompt_id, diffusion_step, position, lens"
    )


@st.cache_data(show_spinner=False, max_entries=64)
def _sampler_rows(path: str, mtime: int) -> pd.DataFrame:
    return data.open_run(path, mtime).table("sampler")


def render() -> None:
    ui.page_header(
        "Wavefront",
        "The diffusion sampler refines a window of positions at once and freezes what converged: step "
        "through one traced prompt's window (run with `looplens study sampler`).",
    )
    handle = ui.current_run()
    if handle is None:
        return
    tables = data.open_run(handle.path, handle.mtime).tables()
    if "wavefront" not in tables:
        st.info(
            "This run has no wavefront records: pick a run made by `looplens study sampler` in the sidebar."
        )
        return
    rows = _wavefront(handle.path, handle.mtime)
    if rows.empty:
        st.info(
            "This run's wavefront table is empty" + (" so far." if handle.info.status == "running" else ".")
        )
        return
    manifest = data.q_manifest(handle.path, handle.mtime)
    prompts = sorted(rows["prompt_id"].unique())
    c1, c2 = st.columns([1, 3])
    prompt = c1.selectbox("Prompt", prompts, key="wave_prompt", format_func=lambda i: f"#{i}")
    mine = rows[(rows["prompt_id"] == prompt) & (rows["diffusion_step"] >= 0)]
    steps = sorted(mine["diffusion_step"].unique())
    if not steps:
        st.info("No diffusion step was recorded for this prompt.")
        return
    step = c2.slider("Diffusion step", int(steps[0]), int(steps[-1]), int(steps[0]), key="wave_step")
    window = mine[mine["diffusion_step"] == step]
    wide = window.pivot_table(index="position", columns="lens", values="rank", aggfunc="first")
    wide.columns = [f"{c} rank" for c in wide.columns]
    first = window.drop_duplicates("position").set_index("position")
    view = pd.DataFrame(
        {
            "guess": first["guess"].fillna(first["guess_id"].astype(str)).map(repr),
            "final next token": first["token"].fillna(first["token_id"].astype(str)).map(repr),
            "frozen": first["frozen"],
            "iterations so far": first["recurrence"],
            "stability": first["stability"],
        }
    ).join(wide)
    st.caption(
        f"Setting `{window['setting'].iloc[0]}` · step {step}: window of {len(view)} position(s) starting at "
        f"{int(view.index.min())}; ranks are of the finally generated next token at the step's last state."
    )
    st.dataframe(view, width="stretch")
    layout = Layout.from_manifest(manifest, int(manifest["settings"]["steps"]))
    all_rows = data.open_run(handle.path, handle.mtime).query(
        "SELECT * FROM wavefront WHERE prompt_id = ?", [int(prompt)]
    )
    tab = wavefront_figure.table({"wavefront": all_rows}, layout)
    if len(tab):
        _, fig = wavefront_figure.draw(tab, layout, f"prompt {prompt}")
        ui.chart(fig, key="wave_heat")
    if "sampler" in tables:
        summary = frontier_figure.table({"sampler": _sampler_rows(handle.path, handle.mtime)}, layout)
        _, fig = frontier_figure.draw(summary, layout, manifest["model"]["name"])
        ui.chart(fig, key="wave_frontier")
        st.dataframe(
            summary[
                [
                    "setting",
                    "family",
                    "accuracy",
                    "answer_accuracy",
                    "calls_per_token",
                    "iterations_per_token",
                    "ms_per_token",
                ]
            ],  # fmt: skip
            hide_index=True,
            width="stretch",
        )


ui.guarded(render)
