"""Driving the explorer in a real browser: a ``looplens explore`` server and Playwright's Chromium.

Shared by the browser test (``tests/app/test_browser.py``) and the browser benchmark
(``benchmarks/bench_explorer_browser.py``): start a server on a free port (from any checkout, so an
old version can be measured in the same run as the new one), open Debian's Chromium headless, and
time what a researcher waits for, from the browser's side:

- ``first paint``: from navigating to a page until its first chart (or its first control, on pages
  that start with a form) is drawn;
- ``done``: until the script has finished and every chart on the page is drawn;
- an interaction: from the click until the rerun has finished and the charts are drawn again.

Streamlit marks its state on the app root (``data-test-script-state``); a plotly chart is drawn once
its ``.main-svg`` exists.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 900}
DRAWN = ".js-plotly-plot .main-svg"
#: An element of the current script run (Streamlit marks what is left from the previous run as stale).
FRESH = '[data-testid="stElementContainer"]:not([data-stale="true"])'
FRESH_CHART = f"{FRESH} .js-plotly-plot .main-svg"
FRESH_FORM = f"{FRESH} button:has-text('Probe')"
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'


#: The process id of each running explorer started here, by URL (for its CPU time).
SERVER_PIDS: dict[str, int] = {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the explorer exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the explorer did not answer at {url} within {timeout:.0f} s")


@contextmanager
def explorer(
    runs: Path, model: str, log: Path, checkout: Path | None = None, timeout: float = 90
) -> Iterator[str]:
    """``looplens explore RUNS --model MODEL`` from ``checkout`` (default: this one) on a free port of
    127.0.0.1; yields its URL and always stops it (by its own process id)."""
    repo = Path(checkout or Path(__file__).resolve().parents[1]).resolve()
    port = free_port()
    cmd = [sys.executable, "-m", "looplens", "explore", str(runs), "--model", str(model), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=repo, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, timeout)
        SERVER_PIDS[url] = proc.pid
        yield url
    finally:
        SERVER_PIDS.pop(url, None)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def chromium(playwright: Any) -> Iterator[Any]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
    try:
        yield browser
    finally:
        browser.close()


@dataclass
class Network:
    """Every request the page made to another host, every failed request and every HTTP error."""

    origin: str
    external: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)

    def watch(self, page: Any) -> None:
        page.on("request", self._request)
        page.on("requestfailed", lambda r: self.failed.append(f"{r.url} ({r.failure})"))
        page.on("response", lambda r: self.errors.append((r.status, r.url)) if r.status >= 400 else None)

    def _request(self, request: Any) -> None:
        url = request.url
        if not url.startswith((self.origin, "data:", "blob:", "about:")):
            self.external.append(url)

    def our_errors(self) -> list[tuple[int, str]]:
        """HTTP errors except Streamlit's own probes of ``<page>/_stcore/…`` (its frontend tries the page
        path as a base URL first when a page URL is opened directly, then the root: not our assets)."""
        return [
            (s, u) for s, u in self.errors if "/_stcore/health" not in u and "/_stcore/host-config" not in u
        ]


def idle(page: Any, timeout_ms: int = 60_000) -> None:
    page.wait_for_selector(IDLE, timeout=timeout_ms)


def charts_drawn(page: Any, at_least: int = 1, timeout_ms: int = 60_000) -> None:
    page.wait_for_function(
        f"() => document.querySelectorAll('{DRAWN}').length >= {at_least}", timeout=timeout_ms
    )


def _all_drawn(page: Any) -> None:
    """Every plotly container on the page holds its drawing (none still pending)."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('.js-plotly-plot')].every(p => p.querySelector('.main-svg'))"
    )


#: The drawn charts of the open tab (hidden tab panels are in the page too, undrawn or hidden).
OPEN_TAB_CHART = '[role="tabpanel"]:not([hidden]) .js-plotly-plot .main-svg'


def timed_rerun(
    page: Any,
    action: Callable[[], Any],
    timeout_ms: int = 60_000,
    charts: int = 0,
    visible: str | None = None,
) -> float:
    """Seconds from ``action`` (a click, a key) until Streamlit's rerun (if it starts one: a form field
    or a tab drawn in advance does not) has finished, ``visible`` (a CSS selector) is visible and the
    charts are drawn (at least ``charts`` of them)."""
    start = time.perf_counter()
    action()
    try:  # a rerun starts within a frame or two of the click; a change inside a form starts none
        page.wait_for_selector('[data-test-script-state="running"]', timeout=500)
    except Exception:  # noqa: BLE001 - no rerun, or one that finished before the first poll
        pass
    idle(page, timeout_ms)
    if visible:
        page.wait_for_selector(visible, state="visible", timeout=timeout_ms)
    if charts:
        charts_drawn(page, charts, timeout_ms)
    _all_drawn(page)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    return time.perf_counter() - start


def timed_visit(page: Any, url: str, first: str = DRAWN, timeout_ms: int = 60_000) -> tuple[float, float]:
    """``(first paint, done)`` in seconds for opening ``url``: until ``first`` (a CSS selector: the first
    chart by default) is visible, and until the script is idle with every chart drawn."""
    start = time.perf_counter()
    page.goto(url, wait_until="commit")
    page.wait_for_selector(first, state="visible", timeout=timeout_ms)
    paint = time.perf_counter() - start
    idle(page, timeout_ms)
    _all_drawn(page)
    return paint, time.perf_counter() - start


def load_average() -> float:
    return os.getloadavg()[0]


def timed_navigation(
    page: Any, link: str, first: str = FRESH_CHART, timeout_ms: int = 60_000
) -> tuple[float, float]:
    """``(first paint, done)`` in seconds for opening a page from the sidebar (no page load: the app
    stays in the browser): until the page's header and ``first`` (its first chart by default) are drawn
    by the new run, and until the script is idle with every chart drawn."""
    start = time.perf_counter()
    page.get_by_role("link", name=link, exact=True).click()
    page.wait_for_selector(f"{FRESH} h2:has-text('{link}')", timeout=timeout_ms)
    page.wait_for_selector(first, state="visible", timeout=timeout_ms)
    paint = time.perf_counter() - start
    idle(page, timeout_ms)
    _all_drawn(page)
    return paint, time.perf_counter() - start


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds spent by the explorer's server process and the page's renderer process: what a view
    costs whatever else the machine runs (the wall-clock timings grow with the load; these do not)."""

    def __init__(self, page: Any, url: str) -> None:
        self.pid = SERVER_PIDS[url]
        self.cdp = page.context.new_cdp_session(page)
        self.cdp.send("Performance.enable", {"timeDomain": "threadTicks"})

    def _renderer(self) -> float:
        metrics = self.cdp.send("Performance.getMetrics")["metrics"]
        return next(m["value"] for m in metrics if m["name"] == "ProcessTime")

    def snapshot(self) -> tuple[float, float]:
        return process_cpu_seconds(self.pid), self._renderer()

    def since(self, before: tuple[float, float]) -> dict[str, float]:
        """``{"server_cpu", "browser_cpu"}`` seconds since ``before`` (a navigation that moved the page
        to a new renderer process counts that process from its start)."""
        server, renderer = self.snapshot()
        spent = renderer - before[1] if renderer >= before[1] else renderer
        return {"server_cpu": round(server - before[0], 3), "browser_cpu": round(spent, 3)}
