"""The explorer in a real browser: a Streamlit server on localhost driven by Playwright's Chromium.

Visits every page, runs the live probe and adaptive generation, checks that plotly charts render
and no exception reaches the page, and saves a screenshot per view under the test's tmp folder.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT_S = 60
PAGE_TIMEOUT_MS = 30_000
FIRST_PAGE_TIMEOUT_MS = 120_000  # the first page also pays the server's cold start (imports, first queries)

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer at {url} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory, runs_dir, model_dir):
    """``looplens explore RUNS --model MODEL`` on a free port (bound to 127.0.0.1); always terminated."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not found")
    pytest.importorskip("playwright.sync_api")
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "streamlit.log"
    cmd = [
        sys.executable,
        "-m",
        "looplens",
        "explore",
        str(runs_dir),
        "--model",
        str(model_dir),
        "--port",
        str(port),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, START_TIMEOUT_S)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        print(f"streamlit log: {log}")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not found")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS, timeout=PAGE_TIMEOUT_MS
        )
        try:
            yield b
        finally:
            b.close()


def _settle(page, charts: int = 1, timeout_ms: int = PAGE_TIMEOUT_MS) -> None:
    """Wait until the script finished running and at least ``charts`` plotly charts are drawn."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout_ms)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms
    )
    if charts:
        page.wait_for_function(
            f"() => document.querySelectorAll('.js-plotly-plot').length >= {charts}", timeout=timeout_ms
        )
    page.wait_for_timeout(600)  # let plotly finish layout before the screenshot


def _assert_clean(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, "an exception is shown on the page"
    assert "Traceback" not in page.inner_text("body")


def _shot(page, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def _hover_shot(page, folder: Path) -> Path:
    """Hover a point of the first chart's median line: the tooltip lists the decoded top tokens."""
    chart = page.locator(".js-plotly-plot").first
    points = chart.locator(".scatterlayer .trace").last.locator(".points path")
    points.nth(min(6, points.count() - 1)).hover(force=True)
    tip = page.locator(".hoverlayer .hovertext").first
    tip.wait_for(state="visible", timeout=PAGE_TIMEOUT_MS)
    text = tip.text_content() or ""
    assert "×" in text or "1." in text, text  # top-1 counts across prompts, or a top-5 list
    path = folder / "trajectories_hover.png"
    chart.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


def test_every_page_renders(server, browser, tmp_path):
    context = browser.new_context(viewport={"width": 1440, "height": 2000})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    shots = []
    try:
        for url_path, charts, name in [
            ("", 3, "overview"),
            ("trajectories", 3, "trajectories"),
            ("dynamics", 3, "dynamics"),
            ("compare", 3, "compare"),
        ]:
            page.goto(f"{server}/{url_path}", wait_until="domcontentloaded")
            _settle(page, charts, FIRST_PAGE_TIMEOUT_MS if not shots else PAGE_TIMEOUT_MS)
            _assert_clean(page)
            assert page.locator(".js-plotly-plot").count() >= charts
            shots.append(_shot(page, tmp_path, name))
            if name == "trajectories":
                shots.append(_hover_shot(page, tmp_path))

        # the live probe: type a prompt, run it, look at each tab, generate adaptively
        page.goto(f"{server}/live", wait_until="domcontentloaded")
        _settle(page, charts=0)
        box = page.get_by_label("Prompt", exact=True)
        box.fill("Question: What is (4 + 3) - 2?\nAnswer:")
        page.get_by_label("Expected answer (optional)", exact=True).fill(" 5")
        page.get_by_role("button", name="Probe").click()
        _settle(page, charts=3)
        _assert_clean(page)
        shots.append(_shot(page, tmp_path, "live_rank"))
        for tab, name in [("Lens grid", "live_grid"), ("Latent dynamics", "live_dynamics")]:
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(800)
            shots.append(_shot(page, tmp_path, name))
        page.get_by_role("tab", name="Adaptive generation").click()
        page.get_by_role("button", name="Generate").click()
        _settle(page, charts=1)
        page.wait_for_selector("text=Iterations used per generated token", timeout=PAGE_TIMEOUT_MS)
        _assert_clean(page)
        shots.append(_shot(page, tmp_path, "live_generation"))

        # the lens grid page probes live too
        page.goto(f"{server}/lens-grid", wait_until="domcontentloaded")
        _settle(page, charts=0)
        page.get_by_role("button", name="Probe").click()
        _settle(page, charts=1)
        _assert_clean(page)
        assert page.locator(".js-plotly-plot").count() >= 1
        shots.append(_shot(page, tmp_path, "lens_grid"))
    finally:
        context.close()
    assert all(p.is_file() and p.stat().st_size > 10_000 for p in shots)
