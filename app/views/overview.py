"""Run overview: the runs found, the chosen run's manifest and headline numbers, its figures."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import charts, data, sections, ui
from app.reference import is_reference
from lens.errors import LooplensError
from lens.layout import UnrolledLayout
from probes.palette import target_label


def _runs_table(runs) -> pd.DataFrame:
    rows = []
    for r in ui.own_runs(runs):
        model = ""
        if r.status != "corrupt":
            try:
                model = data.manifest(*data.run_ref(r.path)).get("model", {}).get("name", "")
            except Exception:  # noqa: BLE001 - a listing never fails on one run
                model = "?"
        rows.append(
            {
                "run": r.name,
                "status": f"{ui.STATUS_ICONS.get(r.status, '')} {r.status}",
                "model": model,
                "created": (r.created or "")[:19].replace("T", " "),
                "rank rows": r.rows.get("ranks", 0),
                "answers": r.rows.get("answers", 0),
            }
        )
    return pd.DataFrame(rows)


def _manifest_panel(manifest: dict) -> None:
    model = manifest.get("model", {}) or {}
    settings = manifest.get("settings", {}) or {}
    facts = {  # the model, layout, iterations and study are in the line above the metrics
        "parameters": f"{model['parameters']:,}" if isinstance(model.get("parameters"), int) else "—",
        "dtype / device": f"{model.get('dtype', '—')} / {model.get('device', '—')}",
        "lenses": ", ".join(map(str, settings["lenses"]))
        if isinstance(settings.get("lenses"), list)
        else str(settings.get("lenses") or "—"),
        "prompts (n)": settings.get("n", "—"),
        "seed": settings.get("seed", "—"),
        "created": str(manifest.get("created", ""))[:19].replace("T", " "),
        "finished": str(manifest.get("finished", "—"))[:19].replace("T", " "),
        "status": manifest.get("status", "—"),
        "looplens": (manifest.get("versions") or {}).get("looplens", "—"),
    }
    st.dataframe(
        pd.DataFrame({"": list(facts), "value": [str(v) for v in facts.values()]}),
        hide_index=True,
        width="stretch",
    )
    template = manifest.get("prompt_template")
    with st.expander("Prompt template"):
        if isinstance(template, dict):
            st.caption(f"{template.get('name', '')} ({template.get('kind', '')})")
            st.code(template.get("text") or template.get("template") or "", language=None)
            if template.get("system"):
                st.caption(f"system: {template['system']}")
            if template.get("shots"):
                st.caption(f"{len(template['shots'])} worked example(s)")
        else:
            st.write(template if template else "—")
    with st.expander("Full manifest (JSON)"):
        st.json({k: v for k, v in manifest.items() if k != "shards"}, expanded=1)


def _headline_metrics(head: dict, manifest: dict) -> None:
    model = manifest.get("model", {}) or {}
    settings = manifest.get("settings", {}) or {}
    facts = [f"model **{model.get('name', '—')}**"]
    if settings.get("steps") is not None:
        facts.append(f"{settings['steps']} iterations")
    try:
        layout = UnrolledLayout.from_manifest(manifest)
        facts.append(f"{layout.family}: {layout.describe()}")
    except LooplensError:
        pass
    if settings.get("study"):
        facts.append(f"study `{settings['study']}`")
    if settings.get("task"):
        from studies.tasks.arithmetic import task_label

        facts.append(f"task: {task_label(str(settings['task']))} (`{settings['task']}`)")
    st.markdown(" · ".join(facts))
    if manifest.get("source"):
        st.caption(manifest["source"])
    cols = st.columns(max(4, 2 + len(head["settle"])))
    cols[0].metric("prompts probed", f"{head['prompts']:,}")
    acc = head["accuracy"]
    selected = bool(settings.get("answers_selected"))
    cols[1].metric(
        "accuracy",
        "—" if acc is None or selected else f"{acc:.0%}",
        help=(
            "not measured: the released problems were selected as those the model answered correctly"
            if selected
            else f"exact match on the {head['answered']} answers of the probed prompts"
        ),
    )
    for col, (lens, s) in zip(cols[2:], head["settle"].items(), strict=False):
        layer = s["first_top1_layer"]
        col.metric(
            f"{lens} lens: top-1 from",
            "never" if layer is None else f"layer {layer}",
            delta=None if layer is None else s["first_top1_site"],
            delta_color="off",
            delta_arrow="off",
            help=f"first unrolled layer (of {s['layers']}) where the median rank of the "
            f"{target_label(s['target_kind'])} token ({s['target_kind']}) over prompts reaches 1; at the "
            f"last layer it is {s['final_median_rank']:g}",
        )


@st.fragment
def _median_chart(handle: ui.RunHandle) -> None:
    """The targets picker and the median-rank chart (a fragment: picking a target reruns only this)."""
    path, mtime = handle.path, handle.mtime
    medians = data.median_trajectories(path, mtime)
    kinds = [k for k in data.choices(path, mtime)["target_kinds"] if not k.startswith("digit_")]
    default = [k for k in ("final", "intermediate", "control") if k in kinds] or kinds[:3]
    chosen = st.pills(
        "Targets",
        kinds,
        default=default,
        selection_mode="multi",
        key="overview_targets",
        help=" · ".join(f"**{k}**: {target_label(k)}" for k in kinds),
    )
    shown = medians[medians["target_kind"].isin(chosen or default)]
    ui.chart(
        charts.overview_figure(
            medians,
            chosen or default,
            height=460,
            title="Median rank over all prompts (band: 95 % bootstrap interval; line style: lens)",
            layout=data.layout(path, mtime),
        ),
        key="overview_fig",
        data=shown,
        file_name=f"{handle.name}-median-rank",
    )


def render() -> None:
    ui.page_header(
        "Run overview",
        "Runs read through DuckDB from the runs folder; figures rebuilt from the "
        "run's tables (hover for values, drag to zoom, double-click to reset).",
    )
    runs = ui.runs_found()
    own = ui.own_runs(runs)
    if own:
        with st.expander(f"All runs in `{ui.settings().runs}` ({len(own)})", expanded=len(own) > 1):
            st.dataframe(_runs_table(runs), hide_index=True, width="stretch")
    handle = ui.current_run(runs)
    if handle is None:
        return
    path, mtime = handle.path, handle.mtime
    manifest = data.manifest(path, mtime)
    st.subheader(handle.name)
    head = data.headline(path, mtime)
    _headline_metrics(head, manifest)

    _median_chart(handle)
    gate = data.exit_gate_rows(path, mtime)
    if len(gate):
        st.subheader("Exit gate", divider="gray")
        st.caption(
            "The model's learned exit gate at each prompt's last position: λ_t, the chance to stop after "
            "iteration t if not stopped before; the cumulative exit probability (dotted: the 0.5 threshold "
            "of the threshold exit mode); the exit distribution p_t averaged over prompts."
        )
        ui.chart(
            charts.exit_gate_curves(gate),
            key="overview_gate",
            data=gate,
            file_name=f"{handle.name}-exit-gate",
        )

    depth = data.depth_accuracy(path, mtime)
    verdicts = data.verdict_counts(path, mtime)
    a, b = st.columns([3, 2], gap="large")
    with a:
        ui.chart(
            charts.accuracy_by_depth(depth, title="Accuracy vs iterations"),
            key="overview_depth",
            data=depth,
            file_name=f"{handle.name}-accuracy-by-depth",
        )
    with b:
        ui.chart(
            charts.verdict_bar(verdicts, height=340),
            key="overview_verdicts",
            data=verdicts,
            file_name=f"{handle.name}-verdicts",
        )
        if len(verdicts):
            st.caption(
                "How the latent (last core block, last position) behaves at the last iteration. "
                + " ".join(
                    f"**{v}**: {charts.verdict_help(v)}."
                    for v in sorted(set(verdicts["verdict"]), key=lambda v: (not v.startswith("fixed"), v))
                )
            )
    facts = st.expander("Manifest", key="overview_manifest", on_change="rerun")  # drawn only when open
    if facts.open:
        with facts:
            _manifest_panel(manifest)

    prompts = data.prompt_table(path, mtime)
    st.subheader("Prompts", divider="gray")
    if prompts.empty:
        st.caption("No prompts recorded yet.")
    else:
        st.caption("Click a row to open that prompt: its top-5 tokens at every layer, per lens.")
        columns = ["prompt_id", "prompt_text", "expected", "intermediate", "generated", "correct", "verdict"]
        if prompts["error"].notna().any():  # prompts `looplens probe` could not probe, with the reason
            columns.append("error")
        event = st.dataframe(
            prompts[columns],
            hide_index=True,
            width="stretch",
            height=min(400, 38 + 35 * len(prompts)),
            column_config={
                "prompt_id": st.column_config.NumberColumn("id", width="small"),
                "prompt_text": st.column_config.TextColumn("prompt", width="large"),
                "correct": st.column_config.CheckboxColumn("correct"),
                "verdict": st.column_config.TextColumn(
                    "verdict", help="how the latent ends: fixed-point, cycle-k or drift"
                ),
            },
            key="overview_prompts",
            on_select="rerun",
            selection_mode="single-row",
        )
        picked = list(getattr(getattr(event, "selection", None), "rows", []) or [])
        if picked:
            sections.open_prompt(int(prompts["prompt_id"].iloc[picked[0]]))
        ui.download(
            prompts[columns], f"{handle.name}-prompts", key="overview_prompts_csv", label="Prompts (CSV)"
        )

    files = data.figure_files(path) if not is_reference(path) else {}
    if any(files.values()):
        saved = st.expander(
            f"Figures saved by the study ({len(files['png'])} PNG, {len(files['html'])} HTML)",
            key="overview_figures",
            on_change="rerun",  # lazy: the PNGs are read and sent only while it is open
        )
        if saved.open:
            _saved_figures(saved, files)


def _saved_figures(where, files: dict) -> None:
    with where:
        pngs = files["png"]
        for start in range(0, len(pngs), 2):
            for col, png in zip(st.columns(2), pngs[start : start + 2], strict=False):
                col.image(str(png), caption=png.name, width="stretch")
        if files["damaged"]:
            st.caption(
                "Not readable as PNG images (damaged or not images), left out: "
                + ", ".join(f"`figures/{p.name}`" for p in files["damaged"])
            )
        if files["html"]:
            st.caption("Interactive HTML: " + ", ".join(f"`figures/{p.name}`" for p in files["html"]))


ui.guarded(render)
