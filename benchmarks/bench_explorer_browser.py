"""Explorer speed as a researcher waits for it, measured in the browser (Chromium), old code against new.

Starts ``looplens explore`` on a runs folder holding a Huginn-sized run (100 prompts × 68 unrolled
layers, Logit and Coda Lens, 15 target kinds) with the embedded ``tiny-arith`` as the live model, warms
the server (every page opened once), then times in headless Chromium (1400 × 900):

- **first paint** of every page: from opening its URL until its first chart (or, on a live page, its
  form) is drawn, and **done**: until the script is idle and every chart drawn;
- **page switch**: the same through the sidebar's link (the app stays loaded: what moving from page
  to page costs), first paint and done;
- **interactions**: a target pill, a toggle, a 3-D switch, a tab, a slider;
- **the live probe at T = 64**: from pressing Probe until the charts of the result are drawn.

Each timing carries the CPU seconds the server process and the page's renderer process spent on it
(``server_cpu``, ``browser_cpu``): on a machine shared with other jobs the wall-clock time grows with
the load, the CPU time does not, so it says what the same view costs on an idle machine.

With ``--baseline DIR`` (a checkout of the old code, e.g. ``git worktree add /tmp/base <commit>``) the
same scenario runs against it first, in the same run, so the two columns share the machine's load.
Targets (issue #17): first paint ≤ 2 s after the server is warm, every interaction ≤ 1 s, the T = 64
live probe ≤ 2 s.

    python -m benchmarks.bench_explorer_browser [--baseline DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import browser  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "explorer_browser.json"
TARGETS = {"first paint": 2.0, "switch: first paint": 2.0, "interaction": 1.0, "live probe T=64": 2.0}
FORM = 'button:has-text("Probe")'
#: (url path, what the first paint waits for); pages every version of the explorer has.
PAGES = [
    ("", browser.DRAWN),
    ("trajectories", browser.DRAWN),
    ("dynamics", browser.DRAWN),
    ("compare", browser.DRAWN),
    ("lens-grid", FORM),
    ("live", FORM),
]
NEW_PAGES = [("prompt", browser.DRAWN), ("analyses", browser.DRAWN)]
#: The sidebar link (and page header) of each page.
LINKS = {
    "": "Run overview",
    "trajectories": "Rank trajectories",
    "dynamics": "Latent dynamics",
    "compare": "Compare",
    "lens-grid": "Lens grid",
    "live": "Live probe",
    "prompt": "Prompt",
    "analyses": "Latent CoT analyses",
}


def _click(page: Any, role: str, name: str, nth: int = 0) -> Callable[[], None]:
    return lambda: page.get_by_role(role, name=name, exact=True).nth(nth).click()


def _choice(page: Any, text: str) -> Callable[[], None]:
    """A pill or a segmented-control option (Streamlit draws them as buttons of a button group)."""
    option = page.locator('[data-testid="stButtonGroup"] button').filter(
        has_text=re.compile(f"^{re.escape(text)}$")
    )
    return lambda: option.first.click()


def _toggle(page: Any, label: str) -> Callable[[], None]:
    return lambda: page.get_by_text(label, exact=True).first.click()


def _slider_end(page: Any, index: int, key: str) -> Callable[[], None]:
    def act() -> None:
        slider = page.get_by_role("slider").nth(index)
        slider.focus()
        page.keyboard.press(key)

    return act


def scenario(
    page: Any, url: str, pages: list[tuple[str, str]], repeats: int, new: bool
) -> list[dict[str, Any]]:
    """Every timing of one version of the explorer (the server is warm), each with the CPU seconds the
    server and the page's renderer spent on it and the load average at that moment."""
    out: list[dict[str, Any]] = []
    cpu = browser.CpuMeter(page, url)

    def record(kind: str, what: str, fn: Callable[[], Any]) -> None:
        before = cpu.snapshot()
        seconds = fn()
        spent = cpu.since(before)
        if isinstance(seconds, tuple):  # a visit: (first paint, done); the CPU is the whole visit's
            first = "first paint" if kind == "visit" else "switch: first paint"
            out.append({"kind": first, "what": what, "seconds": round(seconds[0], 3)})
            kind, seconds = ("done" if kind == "visit" else "switch: done"), seconds[1]
        out.append({"kind": kind, "what": what, "seconds": round(seconds, 3), **spent})
        out[-1]["load"] = browser.load_average()

    def rerun(action: Callable[[], None], **kw: Any) -> Callable[[], float]:
        return lambda: browser.timed_rerun(page, action, **kw)

    for _ in range(repeats):
        for path, first in pages:
            record(
                "visit",
                path or "overview",
                lambda p=path, f=first: browser.timed_visit(page, f"{url}/{p}", f),
            )
    # from page to page through the sidebar, as a researcher moves (the app stays loaded in the tab)
    links = [(LINKS[path], first) for path, first in pages if path in LINKS]
    for _ in range(repeats):
        browser.timed_visit(page, f"{url}/compare")
        for link, first in links:
            fresh = browser.FRESH_FORM if first == FORM else browser.FRESH_CHART
            record("page switch", link, lambda k=link, f=fresh: browser.timed_navigation(page, k, f))
    for _ in range(repeats):
        browser.timed_visit(page, f"{url}/")
        record("interaction", "overview: + predicted target", rerun(_choice(page, "predicted")))
        browser.timed_visit(page, f"{url}/trajectories")
        record("interaction", "trajectories: hide prompt lines", rerun(_toggle(page, "individual prompts")))
        browser.timed_visit(page, f"{url}/dynamics")
        record("interaction", "dynamics: PCA 3-D (WebGL)", rerun(_choice(page, "3-D")))
        if new:
            browser.timed_visit(page, f"{url}/dynamics")
            record("interaction", "dynamics: PCA 3 projections", rerun(_choice(page, "3 projections")))
        browser.timed_visit(page, f"{url}/compare")
        record("interaction", "compare: relative depth", rerun(_toggle(page, "relative depth")))
        # the live probe at T = 64: the iterations slider to its end (64), then Probe
        browser.timed_visit(page, f"{url}/live", FORM)
        browser.timed_rerun(page, _slider_end(page, 0, "End"))
        record("live probe T=64", "live: probe at T = 64", rerun(_click(page, "button", "Probe"), charts=1))
        tab = browser.OPEN_TAB_CHART
        record(
            "interaction", "live T=64: tab Lens grid", rerun(_click(page, "tab", "Lens grid"), visible=tab)
        )
        record(
            "interaction", "live T=64: grid at iteration 1", rerun(_slider_end(page, 1, "Home"), visible=tab)
        )
        record(
            "interaction",
            "live T=64: tab Latent dynamics",
            rerun(_click(page, "tab", "Latent dynamics"), visible=tab),
        )
    return out


def measure(
    checkout: Path | None, runs: Path, model: str, repeats: int, new: bool, log: Path
) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    pages = PAGES + (NEW_PAGES if new else [])
    started = time.perf_counter()
    with (
        browser.explorer(runs, model, log, checkout) as url,
        sync_playwright() as pw,
        browser.chromium(pw) as b,
    ):
        ready = time.perf_counter() - started
        context = b.new_context(viewport=browser.VIEWPORT)
        page = context.new_page()
        page.set_default_timeout(120_000)
        t = time.perf_counter()
        cold = browser.timed_visit(page, f"{url}/", timeout_ms=180_000)
        for path, first in pages[1:]:  # warm: every page once (imports, the model, first queries)
            browser.timed_visit(page, f"{url}/{path}", first, timeout_ms=180_000)
        warm_up = time.perf_counter() - t
        timings = scenario(page, url, pages, repeats, new)
        context.close()
    return {"server_ready_s": ready, "cold_first_page_s": cold, "warm_up_s": warm_up, "timings": timings}


def summarize(timings: list[dict[str, Any]], field: str = "seconds") -> dict[tuple[str, str], float]:
    """The median of ``field`` per (kind, what)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for t in timings:
        if field in t:
            groups.setdefault((t["kind"], t["what"]), []).append(t[field])
    return {key: statistics.median(values) for key, values in groups.items()}


def _cpu(timings: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    server, page = summarize(timings, "server_cpu"), summarize(timings, "browser_cpu")
    return {key: f"{server[key]:.2f} + {page[key]:.2f}" for key in server}


def markdown(new: dict[str, Any], old: dict[str, Any] | None) -> str:
    cur, base = summarize(new["timings"]), summarize(old["timings"]) if old else {}
    cpu_new, cpu_old = _cpu(new["timings"]), _cpu(old["timings"]) if old else {}
    lines = [
        "| what | kind | old (s) | new (s) | ratio | target | CPU s old (server + page) | CPU s new |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for (kind, what), seconds in cur.items():
        before = base.get((kind, what))
        target = TARGETS.get(kind)
        mark = "" if target is None else f"≤ {target:g} s {'✓' if seconds <= target else '✗'}"
        lines.append(
            f"| {what} | {kind} | {'' if before is None else f'{before:.2f}'} | {seconds:.2f} | "
            f"{'' if before is None else f'{before / seconds:.1f}×'} | {mark} | "
            f"{cpu_old.get((kind, what), '')} | {cpu_new.get((kind, what), '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout of the old code")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--model", default="tiny-arith")
    args = parser.parse_args(argv)
    from benchmarks.bench_explorer import build_run
    from benchmarks.common import machine

    load_before = browser.load_average()
    with tempfile.TemporaryDirectory(prefix="bench-explorer-browser-") as tmp:
        runs = Path(tmp) / "runs"
        build_run(runs, args.prompts)
        results: dict[str, Any] = {}
        if args.baseline is not None:
            results["old"] = measure(
                args.baseline, runs, args.model, args.repeats, False, Path(tmp) / "old.log"
            )
            print(f"old: ready in {results['old']['server_ready_s']:.1f} s", flush=True)
        results["new"] = measure(None, runs, args.model, args.repeats, True, Path(tmp) / "new.log")
    table = markdown(results["new"], results.get("old"))
    print(table)
    out = {
        "benchmark": "explorer_browser",
        "machine": machine(),
        "browser": "Debian Chromium, headless, 1400 × 900",
        "run": f"{args.prompts} prompts × 68 unrolled layers (huginn-like), live model {args.model}",
        "baseline": str(args.baseline) if args.baseline else None,
        "load_average": {"before": load_before, "after": browser.load_average()},
        "targets_s": TARGETS,
        **results,
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
