"""The explorer in a real browser: ``looplens explore`` on localhost driven by Playwright's Chromium.

What a researcher sees, checked where it is drawn (issue #17): T = 1 probes and grids (1), rank 1 above
the log axis's floor (2), bands without stray markers (3), the lens grid in forward-pass order following
its iteration slider, special tokens unescaped in widgets (4), heat-map panels in lens order with the same
rows (5), input mistakes said plainly with a token counter, an out-of-vocabulary warning and a
first-token note (6), jargon explained, the accuracy legend beside its lines, run names uncut, no "μ" on a
log axis (7), no request leaving the machine, no 404 of ours, a title per page (8, #11.8), the prompt
drill-down (10), the latent-CoT analyses (11), the reference study as a run (12), Compare's overlay (13),
the Tuned Lens, probability and entropy and the exit criterion's curve in the live probe (14), a CSV under
every chart (15). The browser-side timings of point 9 are recorded (``timings.json`` under the test's tmp
folder, printed); their targets live in ``benchmarks/bench_explorer_browser.py``.

Set ``LOOPLENS_BROWSER_CHECKOUT`` to another checkout (e.g. an old commit) to run these checks against it.
Screenshots of every page are saved under the test's tmp folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api")

from benchmarks import browser  # noqa: E402

pytestmark = pytest.mark.browser

TIMEOUT_MS = 120_000  # generous: the shared 2-core machine runs at load 10-17 at times
COLD_TIMEOUT_MS = 240_000  # the first page also pays the server's imports and first queries
TITLE = "looplens explorer"
# (url path, page title, what its first paint waits for)
PAGES = [
    ("", "Run overview", browser.DRAWN),
    ("trajectories", "Rank trajectories", browser.DRAWN),
    ("prompt", "Prompt", browser.DRAWN),
    ("analyses", "Latent CoT analyses", browser.DRAWN),
    ("lens-grid", "Lens grid", browser.FRESH_FORM),
    ("dynamics", "Latent dynamics", browser.DRAWN),
    ("live", "Live probe", browser.FRESH_FORM),
    ("compare", "Compare", browser.DRAWN),
]
FIGURES_JS = """() => [...document.querySelectorAll('.js-plotly-plot')].map(p => {
  const ax = p.layout.yaxis || {};
  const title = p.layout.title;
  return {
    title: typeof title === 'string' ? title : (title && title.text) || '',
    yaxis: {type: ax.type, range: ax.range, ticktext: ax.ticktext, exponentformat: ax.exponentformat,
            tickformat: ax.tickformat},
    legend: p.layout.legend || {},
    showlegend: p._fullLayout.showlegend,
    annotations: (p.layout.annotations || []).map(a => a.text),
    traces: p.data.map(t => ({type: t.type, mode: t.mode, fill: t.fill, name: t.name,
                              showlegend: t.showlegend, color: t.line && t.line.color,
                              y: t.type === 'heatmap' ? [...t.y] : null})),
    ticks: [...p.querySelectorAll('.xtick text, .ytick text')].map(t => t.textContent),
  };
})"""


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def timings(shots):
    """Point 9: what each view took, from the browser's side (seconds, with the load average)."""
    out: list[dict] = []
    yield out
    path = shots / "timings.json"
    path.write_text(json.dumps(out, indent=1))
    for t in out:
        print(f"{t['kind']:>12}  {t['what']:<40} {t['seconds']:6.2f} s  (load {t['load']:.1f})")
    print(f"timings: {path}")


@pytest.fixture(scope="module")
def session(tmp_path_factory, runs_dir, model_dir):
    """A warm explorer and one browser tab, with every request the tab makes watched."""
    if not Path(browser.CHROMIUM).is_file():
        pytest.skip(f"{browser.CHROMIUM} not found")
    from playwright.sync_api import sync_playwright

    checkout = os.environ.get("LOOPLENS_BROWSER_CHECKOUT")
    log = tmp_path_factory.mktemp("server") / "explorer.log"
    with (
        browser.explorer(runs_dir, str(model_dir), log, Path(checkout) if checkout else None) as url,
        sync_playwright() as pw,
        browser.chromium(pw) as chromium,
    ):
        context = chromium.new_context(viewport=browser.VIEWPORT)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        network = browser.Network(url)
        network.watch(page)
        page.goto(url, wait_until="commit")  # the cold start: imports, the model, the first queries
        page.wait_for_selector(browser.DRAWN, timeout=COLD_TIMEOUT_MS)
        browser.idle(page, COLD_TIMEOUT_MS)
        yield url, page, network
        context.close()
        print(f"explorer log: {log}")


def visit(page, url: str, path: str, first: str = browser.DRAWN) -> tuple[float, float]:
    paint, done = browser.timed_visit(page, f"{url}/{path}", first, TIMEOUT_MS)
    assert_clean(page)
    return paint, done


def assert_clean(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, page.inner_text("body")[-2000:]
    body = page.inner_text("body")
    assert "Traceback" not in body and "Something went wrong" not in body


def wait_for_chart(page, text: str) -> None:
    """Until the open tab draws a chart naming ``text`` in a trace or a note (on a loaded machine a tab's
    rerun can start after ``rerun`` stopped watching for it)."""
    page.wait_for_function(
        """t => [...document.querySelectorAll('.js-plotly-plot')].some(p => p.querySelector('.main-svg') &&
             JSON.stringify([p.data.map(d => d.name), (p.layout.annotations || []).map(a => a.text)])
               .includes(t))""",
        arg=text,
        timeout=TIMEOUT_MS,
    )


def figures(page) -> list[dict]:
    return page.evaluate(FIGURES_JS)


def shot(page, folder: Path, name: str, chart: int | None = None) -> None:
    """The window, or one chart (``chart``: its index on the page) scrolled into view."""
    path = str(folder / f"{name}.png")
    if chart is not None:
        for _ in range(2):  # on a loaded machine a late rerun can replace the chart under the camera
            browser.idle(page, TIMEOUT_MS)
            try:
                page.locator(".js-plotly-plot").nth(chart).screenshot(path=path, timeout=TIMEOUT_MS)
                return
            except Exception:  # noqa: BLE001 - a picture for the reader, not a check: fall back to the window
                page.wait_for_timeout(1000)
    page.screenshot(path=path)


def record(timings: list, kind: str, what: str, seconds: float) -> None:
    timings.append({"kind": kind, "what": what, "seconds": round(seconds, 3), "load": browser.load_average()})


def rerun(page, action, **kw) -> float:
    seconds = browser.timed_rerun(page, action, TIMEOUT_MS, **kw)
    assert_clean(page)
    return seconds


def choice(page, text: str):
    """A pill or segmented-control option (Streamlit draws them as buttons of a button group)."""
    return page.locator('[data-testid="stButtonGroup"] button').filter(has_text=text).first


def downloads(page) -> int:
    return page.locator('[data-testid="stDownloadButton"]').count()


def slider_key(page, index: int, key: str):
    def act() -> None:
        page.get_by_role("slider").nth(index).focus()
        page.keyboard.press(key)

    return act


#: True once the sidebar's rerun has caught up with the run selector: the picked label (icon and name)
#: contains ``label_part`` and the caption under the selector, written by the rerun, repeats its name.
PICKED_JS = """label => {
  const bar = document.querySelector('[data-testid="stSidebar"]');
  const box = bar && bar.querySelector('[data-testid="stSelectbox"] input[role="combobox"]');
  const shown = box ? box.value.trim() : '';
  return shown.includes(label) && [...bar.querySelectorAll('[data-testid="stCaptionContainer"]')]
    .some(c => c.innerText.trim() && shown.endsWith(' ' + c.innerText.trim()));
}"""


def pick_run(page, label_part: str) -> None:
    """Pick a run in the sidebar's run selector by (part of) its label, and wait for the rerun it starts
    (the selector sends its new value a moment after the click, so the script can still look idle)."""
    page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').first.click()
    page.get_by_role("option").filter(has_text=label_part).first.click()
    page.wait_for_function(PICKED_JS, arg=label_part, timeout=TIMEOUT_MS)
    browser.idle(page, TIMEOUT_MS)


# ------------------------------------------------------------------------------------------------ tests


def test_every_page_titled_offline_and_timed(session, shots, timings):
    """Points 8 and #11.8 (nothing from the network, no 404 of ours, a title per page) and point 9's first
    paint of every page on a warm server."""
    url, page, network = session
    for path, title, first in PAGES:
        paint, done = visit(page, url, path, first)
        record(timings, "first paint", path or "overview", paint)
        record(timings, "done", path or "overview", done)
        assert page.title() == f"{title} · {TITLE}", path
        shot(page, shots, path or "overview")
    assert network.external == [], network.external  # the page icon and fonts are served by the explorer
    assert network.our_errors() == [], network.our_errors()


def test_overview(session, shots, timings):
    """Points 2, 3, 7, 15 on the overview (a run of T = 4), then a click on a prompt opens it (10)."""
    url, page, _ = session
    visit(page, url, "")
    figs = figures(page)
    median = figs[0]
    assert median["yaxis"]["type"] == "log" and min(median["yaxis"]["range"]) <= -0.3  # rank 1 has room
    bands = [t for t in median["traces"] if t["fill"] == "toself"]
    assert bands and all(t["mode"] == "lines" for t in bands)  # no stray markers at T <= 8
    body = page.inner_text("body")
    specs = json.dumps(figs)
    assert "one-digit composite" in specs  # task codes in words
    assert "fixed-point" in body and "stopped moving" in body  # verdicts explained
    accuracy = next(f for f in figs if f["yaxis"]["tickformat"] == ".0%")
    assert accuracy["legend"].get("x", 0) > 1  # the legend beside the lines, not over them
    assert not any("μ" in tick or tick.endswith("m") for f in figs for tick in f["ticks"])
    name = page.locator('[data-testid="stSidebar"] [data-testid="stCaptionContainer"]').first
    assert "arith-small" in name.inner_text()
    assert name.evaluate("e => e.scrollWidth <= e.clientWidth + 1")  # the run name is not cut
    assert downloads(page) >= len(figs) - 2  # heat maps side by side share one download
    shot(page, shots, "overview_median", chart=0)
    shot(page, shots, "overview_accuracy", chart=figs.index(accuracy))
    record(
        timings,
        "interaction",
        "overview: + predicted target",
        rerun(page, lambda: choice(page, "predicted").click()),
    )

    # point 10: a click on a prompt's row opens its drill-down
    grid = page.locator('[data-testid="stDataFrame"]').last
    grid.scroll_into_view_if_needed()
    box = grid.bounding_box()
    page.mouse.click(box["x"] + 16, box["y"] + 38 + 17)  # the first row's selection box
    page.wait_for_url("**/prompt", timeout=TIMEOUT_MS)
    browser.idle(page, TIMEOUT_MS)
    browser.charts_drawn(page)
    assert_clean(page)
    body = page.inner_text("body")
    assert "Top-5 tokens at every layer" in body
    assert page.locator('[data-testid="stDownloadButton"]').filter(has_text="Table (CSV)").count() == 1
    shot(page, shots, "prompt_from_overview")
    shot(page, shots, "prompt_chart", chart=0)


def test_trajectories_heat_maps_and_the_reference_run(session, shots, timings):
    """Points 2 and 5 (heat maps in lens order whatever the click order, same rows), 12 (the reference
    study's Huginn-3.5B results are a run) and 15."""
    url, page, _ = session
    visit(page, url, "trajectories")
    figs = figures(page)
    assert min(figs[0]["yaxis"]["range"]) <= -0.3
    assert "p̄" not in json.dumps(figs)
    record(
        timings,
        "interaction",
        "trajectories: hide prompt lines",
        rerun(page, lambda: page.get_by_text("individual prompts", exact=True).first.click()),
    )
    rerun(page, lambda: choice(page, "logit").click())  # now coda alone; then logit again: clicked last
    rerun(page, lambda: choice(page, "logit").click(), charts=3)
    heat = [f for f in figures(page) if f["traces"] and f["traces"][0]["type"] == "heatmap"]
    assert [f["title"].split(" ")[0] for f in heat] == ["logit", "coda"]
    assert heat[0]["traces"][0]["y"] == heat[1]["traces"][0]["y"]  # rows line up
    assert downloads(page) >= len(figures(page)) - 2
    shot(page, shots, "trajectories_heat_map_logit", chart=1)
    shot(page, shots, "trajectories_heat_map_coda", chart=2)
    pick_run(page, "◆")
    browser.charts_drawn(page, 3, TIMEOUT_MS)
    assert_clean(page)
    assert "huginn" in page.inner_text('[data-testid="stSidebar"]').lower()
    shot(page, shots, "trajectories_reference")
    pick_run(page, "arith-small")


def test_compare_overlay(session, shots, timings):
    """Point 13: two runs on one axis, a legend, a colour per run, stage marks; point 12 there too."""
    url, page, _ = session
    pick_run(page, "◆")
    visit(page, url, "compare")
    overlay = figures(page)[0]
    lines = [t for t in overlay["traces"] if t["showlegend"] is not False and t["name"]]
    assert len(lines) >= 2 and overlay["showlegend"]
    assert len({t["color"] for t in lines}) == len(lines)  # a colour per run
    assert any("prelude" in a or "coda" in a for a in overlay["annotations"])  # stage labels
    assert any("Huginn" in t["name"] or "huginn" in t["name"] for t in lines)
    record(
        timings,
        "interaction",
        "compare: relative depth",
        rerun(page, lambda: page.get_by_text("relative depth", exact=True).first.click()),
    )
    shot(page, shots, "compare_overlay", chart=0)
    pick_run(page, "arith-small")


def test_analyses_and_dynamics(session, shots, timings):
    """Point 11 (intermediate vs final vs control and the numeric share, interactive) and point 7's log
    axis without SI prefixes on the dynamics page."""
    url, page, _ = session
    visit(page, url, "analyses")
    ivf, numeric = figures(page)[:2]
    assert {"intermediate result", "final answer", "control token"} <= {t["name"] for t in ivf["traces"]}
    assert numeric["yaxis"]["tickformat"] == ".0%"
    record(timings, "interaction", "analyses: coda lens", rerun(page, lambda: choice(page, "coda").click()))
    shot(page, shots, "analyses_ivf", chart=0)
    shot(page, shots, "analyses_numeric", chart=1)
    visit(page, url, "dynamics")
    assert figures(page)[0]["yaxis"]["exponentformat"] == "power"
    record(
        timings,
        "interaction",
        "dynamics: PCA 3 projections",
        rerun(page, lambda: choice(page, "3 projections").click()),
    )
    shot(page, shots, "dynamics_projections", chart=2)
    record(
        timings, "interaction", "dynamics: PCA 3-D (WebGL)", rerun(page, lambda: choice(page, "3-D").click())
    )
    scene = figures(page)[2]  # one WebGL trace for every trajectory, its legend a note above the plot
    assert [(t["type"], t["mode"]) for t in scene["traces"]] == [("scatter3d", "lines")]
    assert "■" in scene["annotations"][0]
    assert page.locator(".js-plotly-plot").nth(2).locator("canvas").count() >= 1
    shot(page, shots, "dynamics_3d", chart=2)


def test_live_probe_input_checks(session, shots):
    """Point 6: a token counter against the model's context, one limit, an out-of-vocabulary warning, the
    first-token note, and no "Something went wrong"."""
    url, page, _ = session
    visit(page, url, "live", browser.FRESH_FORM)
    assert "of the model's 256-token context" in page.inner_text("body")
    box = page.get_by_label("Prompt", exact=True)
    probe_button = page.get_by_role("button", name="Probe")
    rerun(page, lambda: (box.fill("1 + 1 " * 200), box.press("Control+Enter")))
    error = page.locator('[data-testid="stAlertContentError"]').first.inner_text()
    assert "the model's context holds 256" in error and "Error" not in error.split(":")[0]
    assert probe_button.is_disabled()
    rerun(page, lambda: (box.fill("Question: What is 2 € 3?\nAnswer:"), box.press("Control+Enter")))
    warning = page.locator('[data-testid="stAlertContentWarning"]').first.inner_text()
    assert "€" in warning and "<|unk|>" in warning
    expected = page.get_by_label("Expected answer (optional)", exact=True)
    rerun(page, lambda: (expected.fill(" 12"), expected.press("Enter")))
    assert "first token" in page.locator('[data-testid="stAlertContentInfo"]').first.inner_text()
    shot(page, shots, "live_input_checks")


def test_live_probe_one_iteration_and_views(session, shots, timings):
    """Points 1 (T = 1 probes, every tab draws), 4 (special tokens plain in widgets) and 14 (the Tuned
    Lens offered, probability and entropy per layer, the exit criterion's curve with its threshold)."""
    url, page, _ = session
    visit(page, url, "live", browser.FRESH_FORM)
    box = page.get_by_label("Prompt", exact=True)
    rerun(page, lambda: (box.fill("Question: 1<|end_text|>2\nAnswer:"), box.press("Control+Enter")))
    rerun(page, slider_key(page, 0, "Home"))  # Iterations = 1
    rerun(page, lambda: page.get_by_role("button", name="Probe").click(), charts=1)
    metrics = page.locator('[data-testid="stMetric"]').all_inner_texts()
    assert any("iterations" in m and m.strip().endswith("1") for m in metrics), metrics
    body = page.inner_text("body")
    assert "&lt;" not in body and "&gt;" not in body
    for tab in ["Probability & entropy", "Lens grid", "Latent dynamics", "Adaptive exit"]:
        rerun(page, lambda tab=tab: page.get_by_role("tab", name=tab).click())
        shot(page, shots, "live_t1_" + tab.split(" ")[0].lower(), chart=0)
    page.locator('[data-testid="stMultiSelect"]').filter(has_text="Lenses").click()
    assert page.get_by_role("option", name="tuned").count() == 1  # the Tuned Lens is offered
    page.keyboard.press("Escape")

    # the paper's depth: T = 64, timed from pressing Probe until its chart is drawn (point 9)
    rerun(page, slider_key(page, 0, "End"))
    record(
        timings,
        "live probe T=64",
        "live: probe at T = 64",
        rerun(page, lambda: page.get_by_role("button", name="Probe").click(), charts=1),
    )
    tab = browser.OPEN_TAB_CHART
    rerun(page, lambda: page.get_by_role("tab", name="Probability & entropy").click(), visible=tab)
    wait_for_chart(page, "logit lens")
    pe = figures(page)[0]
    assert {"logit lens", "coda lens"} <= {t["name"] for t in pe["traces"]}
    shot(page, shots, "live_t64_probability", chart=0)
    record(
        timings,
        "interaction",
        "live T=64: tab Adaptive exit",
        rerun(page, lambda: page.get_by_role("tab", name="Adaptive exit").click(), visible=tab),
    )
    wait_for_chart(page, "threshold")
    trace = figures(page)[0]
    assert trace["yaxis"]["type"] == "log" and any("threshold" in a for a in trace["annotations"])
    shot(page, shots, "live_t64_exit", chart=0)
    record(
        timings,
        "interaction",
        "live T=64: tab Lens grid",
        rerun(page, lambda: page.get_by_role("tab", name="Lens grid").click(), visible=tab),
    )
    shot(page, shots, "live_t64_grid", chart=0)


def test_lens_grid_page(session, shots, timings):
    """Points 1 and 4 on the lens grid: T = 1 grids; rows in the order of the forward pass (the latent
    handed to the coda below ``coda.0``); the iteration slider moves every row."""
    url, page, _ = session
    visit(page, url, "lens-grid", browser.FRESH_FORM)
    rerun(page, slider_key(page, 0, "Home"))
    rerun(page, lambda: page.get_by_role("button", name="Probe").click(), charts=1)
    shot(page, shots, "lens_grid_t1", chart=0)
    rerun(page, slider_key(page, 0, "PageUp"))  # T > 1 again
    rerun(page, lambda: page.get_by_role("button", name="Probe").click(), charts=1)
    rerun(page, lambda: choice(page, "logit").click(), charts=1)
    ticks = figures(page)[0]["yaxis"]["ticktext"]
    latent = next(i for i, t in enumerate(ticks) if t.startswith("latent"))
    assert latent < ticks.index("coda.0") < ticks.index("final")  # bottom to top: the forward pass
    record(
        timings, "interaction", "lens grid: iteration 1", rerun(page, slider_key(page, 1, "Home"), charts=1)
    )
    grid = figures(page)[0]
    assert "stopped after 1 of" in grid["title"]
    assert all("t=1" in t for t in grid["yaxis"]["ticktext"] if "·" in t)
    shot(page, shots, "lens_grid_iteration_1", chart=0)
