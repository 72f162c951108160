"""Entry script of the looplens explorer (``looplens explore`` runs it with ``streamlit run``).

    streamlit run app/main.py --server.address 127.0.0.1 -- --runs runs --model tiny-arith

Sets the page config (before anything heavy is imported, so the browser tab is titled at once),
puts the run picker and the live model in the sidebar, and routes to one page module under
``app/views/`` per view. Each page has its own tab title (``PAGES``: one line per page, in reading
order; a new page is one new line). The icon is a file shipped with the app: nothing the explorer
shows needs the network.

The page modules live in ``app/views/``, not ``app/pages/``: Streamlit treats a ``pages/`` folder
beside the entry script as a legacy multipage app and, when a page URL is opened first, runs that
file without this script (no page config, no sidebar, its own navigation).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

_APP_DIR = Path(__file__).resolve().parent
APP_TITLE = "looplens explorer"
ICON = _APP_DIR / "icon.png"
SIDEBAR_WIDTH = 340  # px: run names such as "arithmetic-tiny-arith-T16-n100-s0" fit on one line

# (file under views/, title, icon, url path): one line per page, in reading order.
PAGES = [
    ("overview.py", "Run overview", ":material/dashboard:", "overview"),
    ("trajectories.py", "Rank trajectories", ":material/trending_down:", "trajectories"),
    ("prompt.py", "Prompt", ":material/manage_search:", "prompt"),
    ("analyses.py", "Latent CoT analyses", ":material/stacked_line_chart:", "analyses"),
    ("lens_grid.py", "Lens grid", ":material/grid_on:", "lens-grid"),
    ("dynamics.py", "Latent dynamics", ":material/scatter_plot:", "dynamics"),
    ("wavefront.py", "Wavefront", ":material/waves:", "wavefront"),
    ("live_probe.py", "Live probe", ":material/bolt:", "live"),
    ("compare.py", "Compare", ":material/compare_arrows:", "compare"),
    ("patching.py", "Patching", ":material/swap_horiz:", "patching"),
]


def page_title(title: str) -> str:
    """The browser tab's title of a page: ``Rank trajectories · looplens explorer``."""
    return f"{title} · {APP_TITLE}"


def main() -> None:
    st.set_page_config(
        page_title=APP_TITLE,
        page_icon=str(ICON),
        layout="wide",
        initial_sidebar_state=SIDEBAR_WIDTH,
        menu_items={"About": "looplens: interpretability for recurrent-depth (looped) LMs."},
    )
    from app import ui  # after the page config: the tab is titled while pandas, DuckDB and torch load

    pages = [
        st.Page(_APP_DIR / "views" / file, title=title, icon=icon, url_path=url, default=i == 0)
        for i, (file, title, icon, url) in enumerate(PAGES)
    ]
    page = st.navigation(pages, position="sidebar", expanded=True)
    st.set_page_config(page_title=page_title(page.title))
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
