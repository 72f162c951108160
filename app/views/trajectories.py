"""Rank trajectories: the rank of a target token along the unrolled depth, and the iteration × block map."""

from __future__ import annotations

import streamlit as st

from app import charts, data, sections, ui
from probes.palette import lens_order, target_label


def render() -> None:
    ui.page_header(
        "Rank trajectories",
        "Rank of the target token (1 = the lens's top token) at every block output, in unrolled "
        "order: prelude, core blocks iteration by iteration, coda. Bold: median over the selected "
        "prompts (hover for the most frequent top-1 tokens); thin: each prompt (click one to open it).",
    )
    handle = ui.current_run()
    if handle is None:
        return
    path, mtime = handle.path, handle.mtime
    opts = data.choices(path, mtime)
    if not opts["target_kinds"]:
        st.info(
            "This run has no rank records "
            + (
                "yet: it is still being written; reload in a moment."
                if handle.info.status == "running"
                else "(an evaluation run keeps only answers; see the overview)."
            )
        )
        return
    prompts = data.prompt_table(path, mtime)
    kinds = opts["target_kinds"]
    c1, c2 = st.columns([1, 1])
    with c1:
        lenses = lens_order(
            st.pills(
                "Lenses", opts["lenses"], default=opts["lenses"], selection_mode="multi", key="traj_lenses"
            )
            or opts["lenses"][:1]
        )
    with c2:
        main_kinds = [k for k in kinds if not k.startswith("digit_")] + [
            k for k in kinds if k.startswith("digit_")
        ]
        default = ["final"] if "final" in kinds else kinds[:1]
        targets = (
            st.multiselect(
                "Target tokens",
                main_kinds,
                default=default,
                key="traj_targets",
                format_func=lambda k: f"{k} ({target_label(k)})" if target_label(k) != k else k,
                help="predicted: the model's own answer token; final: the correct answer; intermediate: the "
                "parenthesised result; control: an unrelated word; digit_d: the digit d, a baseline",
            )
            or default
        )
    c3, c4 = st.columns([4, 1], vertical_alignment="bottom")
    with c3:
        chosen = ui.prompt_picker(prompts, key="traj_prompts", help_text="Leave empty for every prompt")
    with c4:
        show_prompts = st.toggle("individual prompts", value=True, key="traj_thin")

    picked = tuple(chosen) if chosen else None
    rows = data.rank_rows(path, mtime, tuple(lenses), tuple(targets), picked)
    single = chosen is not None and len(chosen) == 1
    hover = data.hover_per_prompt(path, mtime, tuple(lenses), picked) if single else None
    agg = None if single else data.hover_aggregate(path, mtime, tuple(lenses), picked)
    n = rows["prompt_id"].nunique()
    title = f"{handle.name}: rank of the {', '.join(targets)} token · {n} prompt{'s' if n != 1 else ''}"
    layout = data.layout(path, mtime)
    event = ui.chart(
        charts.rank_trajectory(
            rows, hover, agg, title=title, show_prompts=show_prompts, height=480, layout=layout
        ),
        key="traj_fig",
        data=rows,
        file_name=f"{handle.name}-ranks",
        on_select="rerun",
    )
    clicked = sections.chosen_prompt(event)
    if clicked is not None:
        sections.open_prompt(clicked)

    st.subheader("Iteration × block", divider="gray")
    heat_kind = targets[0]
    if len(targets) > 1:
        heat_kind = (
            st.segmented_control("Heat map target", targets, default=targets[0], key="traj_heat_kind")
            or targets[0]
        )
    st.caption(
        "Median rank over the selected prompts at each core block of each iteration (prelude on top, "
        "coda at the bottom), log colour scale; grey: a layer the lens does not decode. Hover: "
        + ("the prompt's top-5 tokens." if single else "the most frequent top-1 tokens across prompts.")
    )

    def hover_for(lens: str):
        if single and hover is not None:
            h = hover[hover["lens"] == lens]
            return h[["unrolled_index", "top"]]
        return charts.hover_by_layer(agg, lens)

    ui.heatmaps(rows, list(lenses), heat_kind, hover_for, key="traj", layout=layout)

    with st.expander("Selected prompts"):
        view = prompts if not chosen else prompts[prompts["prompt_id"].isin(chosen)]
        st.dataframe(view.drop(columns=["label"]), hide_index=True, width="stretch")


ui.guarded(render)
