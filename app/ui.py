"""Widgets and states every page shares: the run in use, friendly notices, the error guard, chart output.

``guarded(render)`` runs a page body and turns any error into one ``st.error`` line (a corrupt run
names its file; a mistake in what was typed is said as it is), so a traceback never reaches the page;
the full traceback goes to the server log. ``chart`` draws a plotly figure with a download of the data
behind it; ``int_slider`` is a slider that still works when its range is one value (T = 1).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from app import data
from app.reference import REFERENCE_NAME, is_reference, reference_info
from app.settings import Settings, parse_settings
from lens.errors import LooplensError
from probes.store import CorruptRunError, RunInfo

log = logging.getLogger("looplens.app")

RUN_KEY = "run"  # session key of the sidebar run picker
STATUS_ICONS = {"complete": "✓", "running": "…", "failed": "⚠", "corrupt": "✗", "reference": "◆"}
MAKE_A_RUN = "looplens study arithmetic"
PLOTLY_CONFIG = {
    "displaylogo": False,
    "modeBarButtonsToRemove": ["lasso2d", "select2d"],
    "toImageButtonOptions": {"format": "png", "scale": 2},
    # WebGL (the 3-D scene) at the screen's own resolution, not plotly's default 2x: a browser without a
    # graphics card renders it in software, and 4x the pixels cost ~0.4 s of CPU per drawing (measured)
    "plotGlPixelRatio": 1,
}


def settings() -> Settings:
    return parse_settings()


# ---------------------------------------------------------------------------------------------- errors


def corrupt_message(exc: CorruptRunError, run_path: str | Path | None = None) -> str:
    """``Run X is damaged: ranks/shard-00000.parquet — checksum mismatch …`` (the file named first)."""
    text = str(exc)
    match = re.search(r"(/[^\s:]+\.(?:parquet|json))", text)
    where = ""
    if match:
        file = Path(match.group(1))
        where = file.name
        if run_path is not None:
            try:
                where = str(file.relative_to(Path(run_path).resolve()))
            except ValueError:
                where = str(file)
        elif len(file.parts) >= 2:
            where = str(Path(*file.parts[-2:]))
    detail = text.split(": ", 1)[1] if match and ": " in text else text
    head = f"**The run is damaged**: `{where}`" if where else "**The run is damaged**"
    return (
        f"{head} — {detail.strip()}\n\nRe-run the study to rewrite it (`{MAKE_A_RUN} --overwrite`, or "
        "the command that made it), or delete the run folder."
    )


def guarded(render: Callable[[], Any]) -> None:
    """Run a page body; show errors as one friendly ``st.error`` instead of a traceback."""
    try:
        render()
    except CorruptRunError as exc:
        log.warning("corrupt run: %s", exc)
        st.error(corrupt_message(exc, st.session_state.get("_run_path")))
    except LooplensError as exc:  # a mistake in what was asked: say it as it is
        log.info("user error: %s", exc)
        st.error(str(exc))
    except Exception as exc:  # noqa: BLE001 - the page must never show a traceback
        log.exception("page failed")
        st.error(f"**Something went wrong on this page**: {type(exc).__name__}: {exc}")


def model_error(name: str, exc: BaseException) -> None:
    st.error(
        f"**Could not load the model `{name}`**: {exc}\n\nStart the explorer with another model: "
        "`looplens explore RUNS --model PATH_OR_NAME` (a checkpoint directory with config.json, "
        "model.safetensors and tokenizer.json)."
    )


def load_model_or_explain(name: str) -> Any | None:
    """The cached live model, or ``None`` after an ``st.error`` carrying the loader's message."""
    from app import live

    try:
        return live.cached_model(name)
    except Exception as exc:  # noqa: BLE001 - any loader failure is shown, not raised
        log.warning("model %s failed to load: %s", name, exc)
        model_error(name, exc)
        return None


# ---------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunHandle:
    """The run in use: what ``list_runs`` knows plus the cache key of its current contents."""

    info: RunInfo
    path: str
    mtime: int

    @property
    def name(self) -> str:
        return self.info.name


def runs_found() -> list[RunInfo]:
    """The runs in the runs folder, then the reference study's released Huginn-3.5B results."""
    return [*_listed_runs(str(settings().runs)), reference_info()]


@st.cache_data(ttl=2, show_spinner=False)
def _listed_runs(root: str) -> list[RunInfo]:
    """The folder's runs, read at most every 2 s (the sidebar and the page both ask on every rerun)."""
    return data.find_runs(root)


def own_runs(runs: list[RunInfo]) -> list[RunInfo]:
    """The runs of the runs folder (without the reference study)."""
    return [r for r in runs if not is_reference(r.path)]


def no_runs_message(where: Path) -> None:
    st.info(
        f"**No runs in `{where}` yet.** Make one with\n\n```bash\n{MAKE_A_RUN}\n```\n\n"
        f"(it writes `runs/arithmetic-tiny-arith-…/`; start the explorer on another folder with "
        f"`looplens explore FOLDER`). Meanwhile the reference study's released Huginn-3.5B results are "
        f"shown (**{REFERENCE_NAME}** in the sidebar); the **Live probe** and **Lens grid** pages work "
        "without runs."
    )


def run_label(info: RunInfo) -> str:
    icon = STATUS_ICONS["reference"] if is_reference(info.path) else STATUS_ICONS.get(info.status, "•")
    return f"{icon} {info.name}"


def sidebar_run_picker(runs: list[RunInfo]) -> RunInfo | None:
    """The run selector shared by every page (kept in ``st.session_state['run']``); the full name is
    repeated under it, wrapped, so a long run name is never cut."""
    names = [r.name for r in runs]
    if not names:
        st.sidebar.caption(f"No runs in `{settings().runs}` yet.")
        return None
    if st.session_state.get(RUN_KEY) not in names:
        complete = [r.name for r in own_runs(runs) if r.status == "complete"]
        st.session_state[RUN_KEY] = (complete or [r.name for r in own_runs(runs)] or names)[0]
    by_name = {r.name: r for r in runs}
    choice = st.sidebar.selectbox(
        "Run",
        names,
        key=RUN_KEY,
        format_func=lambda n: run_label(by_name[n]),
        help="Runs found in the runs folder (✓ complete, … still being written, ⚠ failed, ✗ damaged) and "
        "◆ the reference study's released Huginn-3.5B results",
    )
    st.sidebar.caption(f"**{choice}**")
    return by_name.get(choice)


def run_state_notice(info: RunInfo) -> bool:
    """Tell the researcher what state the run is in; ``False`` when nothing can be read from it."""
    if info.status == "corrupt":
        st.error(corrupt_message(CorruptRunError(info.error or "manifest.json is unreadable"), info.path))
        return False
    if info.status == "running":
        rows = ", ".join(f"{t} {n:,}" for t, n in sorted(info.rows.items()) if n) or "nothing yet"
        st.info(
            f"**This run is still being written** (status `running`): showing what is recorded so far "
            f"({rows}). Reload the page to pick up new shards."
        )
    elif info.status == "failed":
        st.warning(
            f"**This run stopped with an error**: {info.error or 'unknown error'}. Showing what was "
            "recorded before it stopped; re-run the study to resume it."
        )
    return True


def current_run(runs: list[RunInfo] | None = None) -> RunHandle | None:
    """The run picked in the sidebar, after its notices; ``None`` (with a message shown) if unusable.

    With no run in the folder yet, the page says how to make one and shows the reference study."""
    runs = runs_found() if runs is None else runs
    if not own_runs(runs):
        no_runs_message(settings().runs)
    by_name = {r.name: r for r in runs}
    info = by_name.get(st.session_state.get(RUN_KEY)) or runs[-1]
    if not run_state_notice(info):
        return None
    path, mtime = data.run_ref(info.path)
    st.session_state["_run_path"] = path
    return RunHandle(info, path, mtime)


def run_handle(info: RunInfo) -> RunHandle | None:
    """A handle for any listed run (for Compare), or ``None`` when it is corrupt."""
    if info.status == "corrupt":
        return None
    path, mtime = data.run_ref(info.path)
    return RunHandle(info, path, mtime)


# ---------------------------------------------------------------------------------------------- output


def chart(
    fig: Any,
    key: str | None = None,
    data: Any = None,
    file_name: str | None = None,
    on_select: str = "ignore",
) -> Any:
    """A plotly figure at full width with the explorer's toolbar settings, and under it a download of
    ``data`` (the DataFrame behind the figure, or a function returning it) as CSV. ``on_select="rerun"``
    makes a click on a point a selection the page can read (the returned event)."""
    event = st.plotly_chart(
        fig,
        width="stretch",
        config=PLOTLY_CONFIG,
        key=key,
        theme=None,
        on_select=on_select,
        selection_mode="points",
    )
    if data is not None:
        download(data, file_name or key or "chart", key=f"{key}_csv" if key else None)
    return event


def download(data: Any, name: str, key: str | None = None, label: str = "Data (CSV)") -> None:
    """A small download button for a table (CSV, made only when clicked; the page does not rerun)."""

    def csv() -> bytes:
        frame = data() if callable(data) else data
        return frame.to_csv(index=False).encode()

    st.download_button(
        label,
        data=csv,
        file_name=f"{_file_stem(name)}.csv",
        mime="text/csv",
        key=key,
        on_click="ignore",
        type="tertiary",
        icon=":material/download:",
        help="The numbers behind this view, as a CSV table",
    )


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-") or "data"


def int_slider(
    label: str, low: int, high: int, value: int, *, key: str, help: str | None = None, container: Any = None
) -> int:
    """``st.slider`` over integers that still works when ``low == high`` (one iteration: T = 1), where
    Streamlit's slider refuses to draw; then the one value is stated instead."""
    where = container if container is not None else st
    if high <= low:
        where.markdown(f"**{label}**: {low} (the only one)", help=help)
        return int(low)
    return int(where.slider(label, low, high, min(max(value, low), high), key=key, help=help))


def page_header(title: str, caption: str | None = None) -> None:
    st.header(title, divider="gray")
    if caption:
        st.caption(caption)


def prompt_picker(
    frame: Any, key: str, label: str = "Prompts", default: int | None = None, help_text: str | None = None
) -> list[int] | None:
    """A multiselect over a run's prompts; ``None`` means all of them."""
    labels = dict(zip(frame["prompt_id"], frame["label"], strict=False))
    options = list(labels)
    chosen = st.multiselect(
        label,
        options,
        default=options[:default] if default else None,
        key=key,
        format_func=lambda i: labels.get(i, f"#{i}"),
        placeholder=f"all {len(options)} prompts",
        help=help_text,
    )
    return list(chosen) if chosen else None


#: Why a lens has no value at some layers of the iteration × block map.
MISSING = {
    "coda": "the Coda Lens decodes a state by running it through the coda, so it has no coda rows "
    "(at the last core block it already equals the model's own output)",
}


def heatmaps(
    rows: Any,
    lenses: list[str],
    target_kind: str,
    hover_for: Callable[[str], Any],
    key: str,
    z_range: tuple[float, float] | None = None,
    layout: Any = None,
) -> None:
    """One iteration × block heat map per lens, side by side in the lenses' reading order (logit, coda,
    tuned: never the order they were clicked), on a shared colour scale with the same rows and columns
    (stages from the model's ``layout``), and one download of the cells of every panel."""
    from app import charts
    from probes.palette import lens_order

    subset = rows[rows["target_kind"] == target_kind]
    if subset.empty:
        st.caption(f"No `{target_kind}` records.")
        return
    lenses = lens_order(lenses)
    if z_range is None:
        med = subset.groupby(["lens", "unrolled_index"])["rank"].median()
        z_range = (1.0, float(max(med.max(), 10)))
    per_lens = {lens: subset[subset["lens"] == lens] for lens in lenses}
    grid_rows = len(charts.heatmap_grid(subset, layout)[1])
    height = min(900, max(260, 70 + 26 * grid_rows))  # side by side: one height, the same rows
    cols = st.columns(len(lenses)) if lenses else []
    for col, lens in zip(cols, lenses, strict=True):
        with col:
            chart(
                charts.rank_heatmap(
                    per_lens[lens],
                    hover_for(lens),
                    title=f"{lens} lens · {target_kind}",
                    z_range=z_range,
                    show_scale=lens == lenses[-1],
                    height=height,
                    layout=layout,
                    like=subset,
                    missing=MISSING.get(lens, f"not decoded by the {lens} lens"),
                ),
                key=f"{key}_heat_{lens}",
            )

    def cells() -> Any:
        frames = [
            charts.heatmap_grid(r, layout)[0].assign(lens=lens) for lens, r in per_lens.items() if len(r)
        ]
        out = pd.concat(frames, ignore_index=True) if frames else subset.iloc[:0]
        return out.rename(columns={"rank": "median_rank", "row": "stage_row", "col": "block_col"})

    download(cells, f"{key}-iteration-block-{target_kind}", key=f"{key}_heat_csv")
