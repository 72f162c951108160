"""Compare: two runs (say Huginn-3.5B against tiny-arith) or two lenses, overlaid on one axis or side
by side on shared axes."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import charts, data, ui


def _panel(side: str, runs: list, default_run: str, default_lens: str) -> dict | None:
    """Pickers of one side; returns its rows and labels, or ``None`` when the run cannot be read."""
    names = [r.name for r in runs]
    by_name = {r.name: r for r in runs}
    key = f"cmp_{side}"
    if st.session_state.get(f"{key}_run") not in names:
        st.session_state[f"{key}_run"] = default_run
    name = st.selectbox("Run", names, key=f"{key}_run", format_func=lambda n: ui.run_label(by_name[n]))
    if not ui.run_state_notice(by_name[name]):  # a damaged manifest: the notice names it
        return None
    handle = ui.run_handle(by_name[name])
    opts = data.choices(handle.path, handle.mtime)
    if not opts["lenses"] or not opts["target_kinds"]:
        st.info(f"`{name}` has no rank records" + (" yet." if by_name[name].status == "running" else "."))
        return None
    c1, c2 = st.columns(2)
    lens_default = default_lens if default_lens in opts["lenses"] else opts["lenses"][0]
    lens = c1.selectbox("Lens", opts["lenses"], index=opts["lenses"].index(lens_default), key=f"{key}_lens")
    kinds = opts["target_kinds"]
    kind = c2.selectbox(
        "Target", kinds, index=kinds.index("final") if "final" in kinds else 0, key=f"{key}_kind"
    )
    rows = data.rank_rows(handle.path, handle.mtime, (lens,), (kind,))
    agg = data.hover_aggregate(handle.path, handle.mtime, (lens,))
    manifest = data.manifest(handle.path, handle.mtime)
    model = (manifest.get("model") or {}).get("name", "?")
    return {
        "name": name,
        "lens": lens,
        "kind": kind,
        "rows": rows,
        "agg": agg,
        "model": model,
        "handle": handle,
        "layout": data.layout(handle.path, handle.mtime),
        "title": f"{name} · {lens} lens · {kind}",
    }


def _summary(panels: list[dict]) -> pd.DataFrame:
    out = []
    for p in panels:
        rows = p["rows"]
        med = rows.groupby("unrolled_index")["rank"].median().sort_index()
        layers = int(med.index.max()) + 1 if len(med) else 0
        top = med[med <= 1]
        first = int(top.index[0]) if len(top) else None
        head = data.headline(p["handle"].path, p["handle"].mtime)
        out.append(
            {
                "panel": p["title"],
                "model": p["model"],
                "prompts": rows["prompt_id"].nunique(),
                "unrolled layers": layers,
                "accuracy": None
                if head["accuracy"] is None
                else "— (selected problems)"
                if (data.manifest(p["handle"].path, p["handle"].mtime).get("settings") or {}).get(
                    "answers_selected"
                )
                else f"{head['accuracy']:.0%}",
                "median rank at the end": float(med.iloc[-1]) if len(med) else None,
                "first top-1 layer": "never"
                if first is None
                else f"{first} ({first / max(layers - 1, 1):.0%} of depth)",
            }
        )
    return pd.DataFrame(out)


def render() -> None:
    ui.page_header(
        "Compare",
        "Two runs — for instance a Huginn-3.5B reference run and tiny-arith — or two lenses "
        "of one run, drawn the same way on a shared log rank axis.",
    )
    runs = ui.runs_found()
    if not ui.own_runs(runs):
        ui.no_runs_message(ui.settings().runs)
    current = st.session_state.get(ui.RUN_KEY) or runs[0].name
    others = [r.name for r in runs if r.name != current and r.status != "corrupt"]
    left_col, right_col = st.columns(2, gap="large")
    with left_col:
        st.markdown("**Left**")
        left = _panel("left", runs, current, "logit")
    with right_col:
        st.markdown("**Right**")
        # two runs: the same lens on both sides; one run: its two lenses
        right = _panel("right", runs, others[0] if others else current, "logit" if others else "coda")
    if left is None or right is None:
        return
    c0, c1, c2 = st.columns([2, 2, 2], vertical_alignment="bottom")
    mode = (
        c0.segmented_control("Layout", ["overlay", "side by side"], default="overlay", key="cmp_mode")
        or "overlay"
    )
    relative = c1.toggle(
        "relative depth",
        value=left["rows"]["unrolled_index"].max() != right["rows"]["unrolled_index"].max(),
        key="cmp_relative",
        help="x axis as a fraction of the unrolled depth, so models of different depth line up",
    )
    thin = c2.toggle("individual prompts", value=False, key="cmp_thin", disabled=mode == "overlay")
    if mode == "overlay":
        same_run = left["name"] == right["name"]
        fig = charts.overlay_trajectories(
            [
                (
                    p["title"] if same_run else f"{p['name']} · {p['lens']} · {p['kind']}",
                    p["rows"],
                    p["layout"],
                )
                for p in (left, right)
            ],
            relative_depth=relative,
            title="Median rank over each run's prompts, on one axis (dotted: where each run's stages change)",
        )
    else:
        fig = charts.compare_trajectories(
            [(left["title"], left["rows"]), (right["title"], right["rows"])],
            [left["agg"], right["agg"]],
            relative_depth=relative,
            show_prompts=thin,
            layouts=[left["layout"], right["layout"]],
        )
    both_rows = pd.concat([p["rows"].assign(run=p["name"]) for p in (left, right)], ignore_index=True)
    ui.chart(fig, key="cmp_fig", data=both_rows, file_name="compare-ranks")
    st.dataframe(_summary([left, right]), hide_index=True, width="stretch")

    st.subheader("Iteration × block", divider="gray")
    both = pd.concat([left["rows"], right["rows"]])
    med = (
        both.groupby(["lens", "target_kind", "unrolled_index"])["rank"].median()
        if len(both)
        else pd.Series([10])
    )
    z_range = (1.0, float(max(med.max(), 10)))
    heights = [len(charts.heatmap_grid(p["rows"], p["layout"])[1]) for p in (left, right) if len(p["rows"])]
    height = min(900, max(260, 70 + 26 * max(heights, default=1)))  # the same height on both sides
    a, b = st.columns(2, gap="large")
    for col, p, side in ((a, left, "left"), (b, right, "right")):
        with col:
            ui.chart(
                charts.rank_heatmap(
                    p["rows"],
                    charts.hover_by_layer(p["agg"], p["lens"]),
                    title=p["title"],
                    z_range=z_range,
                    height=height,
                    layout=p["layout"],
                    missing=ui.MISSING.get(p["lens"], f"not decoded by the {p['lens']} lens"),
                ),
                key=f"cmp_heat_{side}",
                data=lambda p=p: charts.heatmap_grid(p["rows"], p["layout"])[0],
                file_name=f"compare-{side}-iteration-block",
            )


ui.guarded(render)
