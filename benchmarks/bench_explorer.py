"""Explorer responsiveness on a Huginn-sized run: DuckDB queries per page, and each page under AppTest.

Builds a 100-prompt run shaped like the Huginn study (prelude 2, core 4 × 16 iterations, coda 2 =
68 unrolled layers; Logit and Coda Lens; the study's 15 target kinds; a 65,536-token vocabulary),
then times

- every query behind each page: **cold** (run freshly opened: manifest read, shard checksums
  verified, DuckDB views created), **uncached** (plain DuckDB query) and **cached** (an
  ``st.cache_data`` hit, what a page rerun pays);
- each page as Streamlit's ``AppTest`` runs it: the first visit and a rerun (any widget
  interaction is a rerun), plus typical interactions (pick a prompt, change a target, probe live).

The budget is one second per page interaction on the 2-core machine.

    python -m benchmarks.bench_explorer [--out benchmarks/results/explorer.json] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
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

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

BUDGET_MS = 1000.0
TARGETS = (
    "predicted",
    "final",
    "intermediate",
    "intermediate_alt",
    "control",
    *(f"digit_{d}" for d in range(10)),
)
DEFAULT_OUT = REPO / "benchmarks" / "results" / "explorer.json"
MAIN = REPO / "app" / "main.py"


def _ms(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(median, max) wall time in milliseconds over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), max(times)


def build_run(root: Path, prompts: int) -> Path:
    from studies.synthetic import write_run

    return write_run(
        root,
        "huginn-like-100",
        n_prompts=prompts,
        prelude=2,
        core=4,
        coda=2,
        steps=16,
        lenses=("logit", "coda"),
        target_kinds=TARGETS,
        vocab_size=65536,
        model_name="huginn-0125",
        batches=4,
        figures=False,
    )


def page_queries(path: str, mtime: int, prompt_ids: list[int]) -> dict[str, list[tuple[str, tuple]]]:
    """The queries each page issues on its first visit (their default arguments)."""
    both = ("logit", "coda")
    return {
        "overview": [
            ("manifest", ()),
            ("headline", ()),
            ("choices", ()),
            ("median_trajectories", ()),
            ("depth_accuracy", ()),
            ("verdict_counts", ()),
            ("prompt_table", ()),
        ],
        "trajectories": [
            ("choices", ()),
            ("prompt_table", ()),
            ("rank_rows", (both, ("final",), None)),
            ("hover_per_prompt", (both, None)),
            ("hover_aggregate", (both, None)),
            ("rank_rows", (both, ("final", "intermediate"), tuple(prompt_ids[:1]))),
        ],
        "dynamics": [
            ("prompt_table", ()),
            ("dynamics_rows", (tuple(prompt_ids[:8]),)),
            ("verdict_counts", ()),
        ],
        "compare": [
            ("choices", ()),
            ("rank_rows", (("logit",), ("final",), None)),
            ("hover_aggregate", (("logit",), None)),
            ("manifest", ()),
            ("headline", ()),
        ],
    }


def bench_queries(path: Path, repeats: int) -> list[dict[str, Any]]:
    from app import data

    p, mtime = data.run_ref(path)
    prompts = data.q_prompt_table(p, mtime)["prompt_id"].tolist()
    rows = []
    for page, queries in page_queries(p, mtime, prompts).items():
        for name, args in queries:
            plain, cached = data.QUERIES[name]
            data.open_run.cache_clear()
            t = time.perf_counter()
            result = plain(p, mtime, *args)
            cold = (time.perf_counter() - t) * 1000
            uncached, _ = _ms(lambda plain=plain, args=args: plain(p, mtime, *args), repeats)
            cached(p, mtime, *args)  # fill the cache
            hit, _ = _ms(lambda cached=cached, args=args: cached(p, mtime, *args), repeats)
            size = len(result) if hasattr(result, "__len__") else 0
            label = name + ("" if not args else f"({_describe(args)})")
            rows.append(
                {
                    "page": page,
                    "query": label,
                    "rows": size,
                    "cold_ms": cold,
                    "uncached_ms": uncached,
                    "cached_ms": hit,
                }
            )
    return rows


def _describe(args: tuple) -> str:
    parts = []
    for a in args:
        if a is None:
            parts.append("all")
        elif isinstance(a, tuple) and a and isinstance(a[0], int):
            parts.append(f"{len(a)} prompt{'s' if len(a) > 1 else ''}")
        elif isinstance(a, tuple):
            parts.append("+".join(map(str, a)))
    return ", ".join(parts)


def bench_pages(runs: Path, model: str, repeats: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from app import data

    os.environ["LOOPLENS_RUNS"] = str(runs)
    os.environ["LOOPLENS_MODEL"] = str(model)
    st.cache_data.clear()  # first visits start from empty query caches, as in a fresh server
    data.open_run.cache_clear()
    at = AppTest.from_file(str(MAIN), default_timeout=120)
    at.run()  # imports (torch, plotly, duckdb) happen once per server process; not a page interaction
    pages, actions = [], []
    from app import live

    t = time.perf_counter()
    live.cached_model(str(model))  # once per server process (torch internals import on first use)
    load_ms = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    live.probe_text(live.cached_model(str(model)), "warm up", 2)  # first forward pass: allocator, kernels
    warm_ms = (time.perf_counter() - t) * 1000
    actions.append(
        {"page": "(server start)", "action": "load the live model, once", "ms": load_ms, "charts": 0}
    )
    actions.append(
        {"page": "(server start)", "action": "first forward pass, once", "ms": warm_ms, "charts": 0}
    )

    def check(label: str) -> None:
        if at.exception or at.error:
            raise RuntimeError(f"{label}: {[e.value for e in list(at.exception) + list(at.error)]}")

    def timed(fn: Callable[[], Any]) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1000

    st.cache_data.clear()  # the start-up run above already read the overview's queries
    data.open_run.cache_clear()
    for page in ["overview", "trajectories", "dynamics", "compare", "lens_grid", "live_probe"]:
        first = timed(lambda page=page: at.switch_page(f"views/{page}.py").run())
        check(page)
        rerun, worst = _ms(lambda: at.run(), repeats)
        check(page)
        pages.append(
            {
                "page": page,
                "first_visit_ms": first,
                "rerun_ms": rerun,
                "rerun_max_ms": worst,
                "charts": len(at.get("plotly_chart")),
            }
        )
        for action, fn in _interactions(at, page):
            ms = timed(fn)
            check(f"{page}: {action}")
            actions.append({"page": page, "action": action, "ms": ms, "charts": len(at.get("plotly_chart"))})
    return pages, actions


def _interactions(at: Any, page: str) -> list[tuple[str, Callable[[], Any]]]:
    def probe() -> None:
        next(b for b in at.button if b.label == "Probe").click().run()

    def generate() -> None:
        next(b for b in at.button if b.label == "Generate").click().run()

    if page == "overview":
        return [
            (
                "targets: + predicted",
                lambda: (
                    at.pills(key="overview_targets")
                    .set_value(["predicted", "final", "intermediate", "control"])
                    .run()
                ),
            )
        ]
    if page == "trajectories":
        return [
            ("pick one prompt", lambda: at.multiselect(key="traj_prompts").set_value([7]).run()),
            (
                "add a target",
                lambda: at.multiselect(key="traj_targets").set_value(["final", "intermediate"]).run(),
            ),
            ("all prompts again", lambda: at.multiselect(key="traj_prompts").set_value([]).run()),
            ("hide prompt lines", lambda: at.toggle(key="traj_thin").set_value(False).run()),
        ]
    if page == "dynamics":
        return [
            ("PCA 3-D", lambda: at.segmented_control(key="dyn_run_dims").set_value("3-D").run()),
            ("20 prompts", lambda: at.multiselect(key="dyn_prompts").set_value(list(range(20))).run()),
        ]
    if page == "compare":
        return [
            ("right lens: coda", lambda: at.selectbox(key="cmp_right_lens").set_value("coda").run()),
            ("relative depth", lambda: at.toggle(key="cmp_relative").set_value(True).run()),
        ]
    if page == "lens_grid":
        return [
            ("probe (live, all positions)", probe),
            ("iteration slider", lambda: at.slider(key="grid_iter").set_value(1).run()),
            ("all iterations", lambda: at.toggle(key="grid_all").set_value(True).run()),
        ]
    if page == "live_probe":
        return [
            ("probe (live)", probe),
            ("another position", lambda: at.selectbox(key="live_rank_pos").set_value(2).run()),
            ("generate 6 tokens (kl exit)", generate),
        ]
    return []


def live_model(arg: str | None) -> tuple[str, str]:
    """The model for the live pages: ``--model``, else the embedded ``tiny-arith``."""
    return (arg, arg) if arg else ("tiny-arith", "tiny-arith (embedded)")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--model", default=None, help="model for the live pages (default: tiny-arith if shipped)"
    )
    args = parser.parse_args(argv)
    console = Console()
    import logging

    logging.getLogger("streamlit").setLevel(logging.ERROR)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-explorer-") as tmp:
        scratch = Path(tmp)
        t = time.perf_counter()
        run_path = build_run(scratch / "runs", args.prompts)
        built = time.perf_counter() - t
        from probes.store import Run

        rows_per_table = Run.open(run_path).rows()
        console.print(f"built {run_path.name} in {built:.1f} s: {rows_per_table}")
        model, model_desc = live_model(args.model)
        queries = bench_queries(run_path, args.repeats)
        pages, actions = bench_pages(scratch / "runs", model, args.repeats)

    q = Table(
        title=f"DuckDB queries behind each page ({args.prompts} prompts × 68 layers, median of "
        f"{args.repeats}; cold = first read of the run)"
    )
    for col in ("page", "query", "rows", "cold ms", "uncached ms", "cached ms"):
        q.add_column(col, justify="right" if col.endswith(("ms", "rows")) else "left")
    for r in queries:
        q.add_row(
            r["page"],
            r["query"],
            f"{r['rows']:,}",
            f"{r['cold_ms']:.1f}",
            f"{r['uncached_ms']:.1f}",
            f"{r['cached_ms']:.2f}",
        )
    console.print(q)
    p = Table(title="Pages under AppTest (first visit: queries uncached; rerun = any widget change)")
    for col in ("page", "first visit ms", f"rerun ms (median of {args.repeats})", "rerun max ms", "charts"):
        p.add_column(col, justify="left" if col == "page" else "right")
    for r in pages:
        p.add_row(
            r["page"],
            f"{r['first_visit_ms']:.0f}",
            f"{r['rerun_ms']:.0f}",
            f"{r['rerun_max_ms']:.0f}",
            str(r["charts"]),
        )
    console.print(p)
    a = Table(title="Interactions (one rerun each, including any new query or live probe)")
    for col in ("page", "action", "ms", "charts"):
        a.add_column(col, justify="right" if col in ("ms", "charts") else "left")
    for r in actions:
        a.add_row(r["page"], r["action"], f"{r['ms']:.0f}", str(r["charts"]))
    console.print(a)

    interactions = [r["ms"] for r in actions if not r["page"].startswith("(")]
    worst = max([r["first_visit_ms"] for r in pages] + [r["rerun_max_ms"] for r in pages] + interactions)
    ok = worst < BUDGET_MS
    console.print(
        f"slowest page interaction: {worst:.0f} ms — {'within' if ok else 'OVER'} the "
        f"{BUDGET_MS:.0f} ms budget (1-min load average {load_before[0]:.1f} → "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )
    import duckdb
    import streamlit

    from benchmarks.common import machine

    result = {
        "benchmark": "explorer",
        "machine": {**machine(), "streamlit": streamlit.__version__, "duckdb": duckdb.__version__},
        "run": {
            "prompts": args.prompts,
            "layout": "prelude 2 · core 4 × 16 · coda 2 (68 unrolled layers)",
            "lenses": ["logit", "coda"],
            "target_kinds": len(TARGETS),
            "rows": rows_per_table,
            "build_s": built,
        },
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "live_model": model_desc,
        "budget_ms": BUDGET_MS,
        "slowest_interaction_ms": worst,
        "within_budget": ok,
        "queries": queries,
        "pages": pages,
        "interactions": actions,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    console.print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
