"""Entry script of the looplens explorer (``looplens explore`` runs it with ``streamlit run``).

    streamlit run app/main.py --server.address 127.0.0.1 -- --runs runs --model tiny-arith

Sets the page config, puts the run picker and the live model in the sidebar, and routes to one
page module under ``app/views/`` per view.

The page modules live in ``app/views/``, not ``app/pages/``: Streamlit treats a ``pages/`` folder
beside the entry script as a legacy multipage app and, when a page URL is opened first, runs that
file without this script (no page config, no sidebar, its own navigation).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app import ui

_APP_DIR = Path(__file__).resolve().parent

PAGES = [
    ("overview.py", "Run overview", ":material/dashboard:", "overview"),
    ("trajectories.py", "Rank trajectories", ":material/trending_down:", "trajectories"),
    ("lens_grid.py", "Lens grid", ":material/grid_on:", "lens-grid"),
    ("dynamics.py", "Latent dynamics", ":material/scatter_plot:", "dynamics"),
    ("wavefront.py", "Wavefront", ":material/waves:", "wavefront"),
    ("live_probe.py", "Live probe", ":material/bolt:", "live"),
    ("compare.py", "Compare", ":material/compare_arrows:", "compare"),
    ("patching.py", "Patching", ":material/swap_horiz:", "patching"),
]


def main() -> None:
    st.set_page_config(
        page_title="looplens explorer",
        page_icon=":material/all_inclusive:",
        layout="wide",
        initial_sidebar_state="expanded",
        menu_items={"About": "looplens: interpretability for recurrent-depth (looped) LMs."},
    )
    pages = [
        st.Page(_APP_DIR / "views" / file, title=title, icon=icon, url_path=url, default=i == 0)
        for i, (file, title, icon, url) in enumerate(PAGES)
    ]
    page = st.navigation(pages, position="sidebar", expanded=True)
    settings = ui.settings()
    with st.sidebar:
        runs = []
        try:
            runs = ui.runs_found()
        except OSError as exc:
            st.error(f"Cannot read the runs folder `{settings.runs}`: {exc}")
        ui.sidebar_run_picker(runs)
        st.caption(f"Runs folder: `{settings.runs}`  \nLive model: `{settings.model}`")
    page.run()


main()
