"""The latent chain-of-thought analyses, interactive: does the intermediate result surface before the
final answer across iterations (against a control token and the other digits), and how numeric are the
lenses' decodings along the depth. The numbers are the study's (``studies.figures``), for any run."""

from __future__ import annotations

import streamlit as st

from app import charts, data, ui
from probes.palette import lens_order, target_label


def _intermediate_vs_final(handle: ui.RunHandle) -> None:
    st.subheader("Intermediate result vs final answer", divider="gray")
    table = data.intermediate_table(handle.path, handle.mtime)
    if table.empty:
        st.info(
            "This run tracked no intermediate results (the arithmetic study does: "
            "`looplens study arithmetic`), so there is nothing to compare here."
        )
        return
    lenses = lens_order(table["lens"].unique())
    c1, c2, c3 = st.columns([1, 1, 2])
    lens = c1.segmented_control("Lens", lenses, default=lenses[0], key="ivf_lens") or lenses[0]
    blocks = sorted(int(b) for b in table.loc[table["lens"] == lens, "block"].unique())
    shown = table[(table["lens"] == lens) & table["shown"]]
    default_block = int(shown["block"].iloc[0]) if len(shown) else blocks[-1]
    block = c2.selectbox(
        "Core block",
        blocks,
        index=blocks.index(default_block),
        key=f"ivf_block_{lens}",
        format_func=lambda b: (
            f"block {b + 1} of {len(blocks)}" + ("  (the study's)" if b == default_block else "")
        ),
        help="Ranks saw-tooth across the blocks of one iteration; the study shows one block per lens (for "
        "Huginn the reference study's choice: the 3rd for the Logit Lens, the 4th for the Coda Lens)",
    )
    targets = [t for t in ("intermediate", "final", "control", "digit_baseline") if t in set(table["target"])]
    chosen = (
        c3.pills(
            "Targets",
            targets,
            default=targets,
            selection_mode="multi",
            key="ivf_targets",
            format_func=target_label,
        )
        or targets
    )
    n = int(table["n"].max())
    ui.chart(
        charts.intermediate_vs_final(
            table,
            lens,
            block,
            targets=chosen,
            title=f"{lens} lens · core block {block + 1} · median rank on {n} correctly answered problems",
        ),
        key="ivf_fig",
        data=table[(table["lens"] == lens) & (table["block"] == block) & table["target"].isin(chosen)],
        file_name=f"{handle.name}-intermediate-vs-final-{lens}-block{block + 1}",
    )
    st.caption(
        "A latent chain of thought would show the intermediate result (the parenthesised step) ranked above "
        "the final answer in early iterations, then overtaken. Bands: 95 % bootstrap interval of the median. "
        "Control: a token unrelated to the problem; other digits: per problem, the median rank of the digits "
        "that are neither the answer's nor the intermediate's, how high *some* digit ranks by chance."
    )


def _numeric_share(handle: ui.RunHandle) -> None:
    st.subheader("How numeric the decodings are", divider="gray")
    table = data.numeric_table(handle.path, handle.mtime)
    if table.empty:
        st.info("This run recorded no top-k decodings.")
        return
    ui.chart(
        charts.numeric_share(
            table,
            title="Share of the top-5 decoded tokens that are digits or a minus sign",
            layout=data.layout(handle.path, handle.mtime),
        ),
        key="numeric_fig",
        data=table,
        file_name=f"{handle.name}-numeric-share",
    )
    st.caption(
        "A lens whose decodings are numeric where the answer is not yet on top shows the model is already "
        "'in number space'. Hover a point for the layer and how many tokens were counted."
    )


def render() -> None:
    ui.page_header(
        "Latent CoT analyses",
        "The latent chain-of-thought analyses of the selected run, interactive: the rank of the intermediate "
        "result against the final answer across iterations, and the numeric share of the decodings.",
    )
    handle = ui.current_run()
    if handle is None:
        return
    _intermediate_vs_final(handle)
    _numeric_share(handle)


ui.guarded(render)
