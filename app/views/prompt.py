"""One prompt of a run: what it asked and answered, its rank trajectories, and the paper's qualitative
table, the top-5 tokens with their probabilities at every unrolled layer for one lens (exportable)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import charts, data, sections, ui
from probes.palette import lens_order, target_label


def _facts(row: pd.Series) -> None:
    text = row.get("prompt_text")
    st.code(
        text if isinstance(text, str) and text else "(the run recorded no text for this prompt)",
        language=None,
    )
    facts = []
    for column, name in (
        ("expected", "expected"),
        ("intermediate", "intermediate"),
        ("generated", "generated"),
    ):
        value = row.get(column)
        if isinstance(value, str) and value:
            facts.append(f"{name} `{charts.token_label(value)}`")
    correct = row.get("correct")
    if correct is not None and not pd.isna(correct):
        facts.append("✓ correct" if bool(correct) else "✗ wrong")
    if isinstance(row.get("verdict"), str):
        facts.append(f"latent: **{row['verdict']}** ({charts.verdict_help(row['verdict'])})")
    if isinstance(row.get("error"), str):
        facts.append(f"not probed: {row['error']}")
    if facts:
        st.markdown(" · ".join(facts))


def render() -> None:
    ui.page_header(
        "Prompt",
        "One prompt of the selected run: its rank trajectories with every lens, and the top-5 tokens each "
        "lens decodes at every unrolled layer (the paper's qualitative tables). Open a prompt by clicking "
        "it in the overview's table or on the rank trajectories page, or pick it here.",
    )
    handle = ui.current_run()
    if handle is None:
        return
    path, mtime = handle.path, handle.mtime
    prompts = data.prompt_table(path, mtime)
    if prompts.empty:
        st.info("This run has no prompts yet.")
        return
    ids = prompts["prompt_id"].tolist()
    if st.session_state.get("prompt_id") not in ids:
        st.session_state["prompt_id"] = ids[0]
    labels = dict(zip(prompts["prompt_id"], prompts["label"], strict=False))
    pid = st.selectbox("Prompt", ids, key="prompt_id", format_func=lambda i: labels.get(i, f"#{i}"))
    row = prompts[prompts["prompt_id"] == pid].iloc[0]
    _facts(row)

    ranks = data.prompt_ranks(path, mtime, int(pid))
    layout = data.layout(path, mtime)
    if ranks.empty:
        st.caption("No rank records for this prompt.")
    else:
        kinds = [k for k in data.choices(path, mtime)["target_kinds"] if k in set(ranks["target_kind"])]
        default = [k for k in ("final", "predicted") if k in kinds][:1] or kinds[:1]
        chosen = (
            st.pills(
                "Targets",
                kinds,
                default=default,
                selection_mode="multi",
                key="prompt_targets",
                help=" · ".join(f"**{k}**: {target_label(k)}" for k in kinds if not k.startswith("digit_")),
            )
            or default
        )
        rows = ranks[ranks["target_kind"].isin(chosen)]
        hover = data.hover_per_prompt(path, mtime, tuple(sorted(set(rows["lens"]))), (int(pid),))
        tokens = {
            k: charts.token_html(t)
            for k, t in rows.groupby("target_kind")["token"].first().items()
            if isinstance(t, str)
        }
        label = ", ".join(f"{k} = {tokens[k]}" if k in tokens else k for k in chosen)
        ui.chart(
            charts.rank_trajectory(
                rows, hover, title=f"Prompt #{pid} · rank of {label}", height=420, layout=layout
            ),
            key="prompt_traj",
            data=rows,
            file_name=f"{handle.name}-prompt-{pid}-ranks",
        )

    st.subheader("Top-5 tokens at every layer", divider="gray")
    _topk_section(handle, int(pid), has_ranks=not ranks.empty)


@st.fragment
def _topk_section(handle: ui.RunHandle, pid: int, has_ranks: bool) -> None:
    """The paper's qualitative table for one lens (a fragment: switching the lens reruns only this)."""
    path, mtime = handle.path, handle.mtime
    topk = data.prompt_topk(path, mtime, pid)
    if topk.empty:
        st.info(
            "No top-k decodings were recorded for this prompt"
            + (
                " (the reference study released them for its 100 unfiltered problems, ids 0–99)."
                if has_ranks
                else "."
            )
        )
        return
    lenses = lens_order(topk["lens"].unique())
    lens = st.segmented_control("Lens", lenses, default=lenses[0], key="prompt_lens") or lenses[0]
    table = sections.topk_table(topk[topk["lens"] == lens], data.layout(path, mtime))
    st.caption(
        f"{lens} lens, prompt #{pid}: each row one layer in the order of the forward pass (prelude, core "
        "blocks iteration by iteration, the latent handed to the coda, coda, output); each cell a decoded "
        "token (␣ a space, ↵ a newline) and its probability under the lens, where the run recorded it."
    )
    sections.show_topk_table(
        table, key="prompt_topk", file_name=f"{handle.name}-prompt-{pid}-{lens}-top5", height=460
    )


ui.guarded(render)
