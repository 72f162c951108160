"""``looplens probe`` throughput and memory: one process vs a 2-worker local Ray cluster, and a 10k-prompt run.

1. **Throughput** on ``tiny-arith``: the same prompt file probed by one process and by a local Ray
   cluster of 2 workers, in one run of this script. End to end (model loading, every shard, the
   summary) and steady state (prompts per second between the first and the last shard commit, read off
   the manifest's timestamps). The two runs' tables are compared row for row.
2. **Scale**: 10,000 prompts × 68 unrolled layers (tiny-arith at 66 iterations: 1 + 66 + 1 blocks),
   Logit and Coda Lens, top-5, dynamics: Parquet bytes per table, resident memory over the run
   (sampled every 50 ms: it must not grow with the number of shards), the figures.
3. **Explorer** on that run: every DuckDB query behind the pages, timed on a freshly opened run,
   against loading the ranks and top-k tables whole into pandas.

    python -m benchmarks.bench_probe [--prompts 400] [--scale-prompts 10000] [--skip-scale]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from benchmarks.common import RESULTS, machine  # noqa: E402

OPS = ("plus", "minus", "times")


def write_prompts(path: Path, n: int) -> Path:
    """``n`` arithmetic questions with their answers as targets (the prompts differ in length)."""
    rows = []
    for i in range(n):
        a, b, op = i % 10, (i // 10) % 10, OPS[(i // 100) % 3]
        value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        rows.append({"prompt": f"Question: What is {a} {op} {b}?\nAnswer:", "target": f" {value}", "i": i})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class RssSampler:
    """Peak resident memory of this process (and its children) every ``interval`` seconds."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        t0 = time.monotonic()
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - t0, me.memory_info().rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def steady_rate(run: Any) -> float:
    """Prompts per second between the first and the last shard commit (the manifest's timestamps)."""
    shards = run.manifest["shards"]["prompt_meta"]
    times = sorted((dt.datetime.fromisoformat(r["written"]), r["rows"]) for r in shards.values())
    if len(times) < 2:
        return float("nan")
    seconds = (times[-1][0] - times[0][0]).total_seconds()
    return sum(rows for _, rows in times[1:]) / max(seconds, 1e-9)


def parquet_bytes(run: Any) -> dict[str, int]:
    return {t: sum(r["bytes"] for r in s.values()) for t, s in run.manifest["shards"].items()}


def same_tables(a: Any, b: Any) -> bool:
    for table in a.tables():
        x, y = (r.table(table).drop(columns="run") for r in (a, b))
        cols = list(x.columns)
        if not x.sort_values(cols).reset_index(drop=True).equals(y.sort_values(cols).reset_index(drop=True)):
            return False
    return True


def throughput(root: Path, n: int, steps: int, shard_size: int) -> list[dict[str, Any]]:
    import probes
    from probes.scale import init_ray

    data = write_prompts(root / "throughput.jsonl", n)
    common = dict(num_steps=steps, shard_size=shard_size, batch_size=25, figures=False, progress=False)
    rows = []
    t = time.perf_counter()
    single = probes.probe_dataset(data, "tiny-arith", out=root, name="one-process", **common)
    wall = time.perf_counter() - t
    rows.append(
        {
            "part": "throughput",
            "setup": "1 process",
            "prompts": n,
            "steps": steps,
            "wall_s": round(wall, 2),
            "prompts_per_s": round(n / wall, 2),
            "steady_prompts_per_s": round(steady_rate(single), 2),
            "startup_s": 0.0,
        }
    )
    t = time.perf_counter()
    init_ray("local", num_cpus=2)
    startup = time.perf_counter() - t
    t = time.perf_counter()
    on_ray = probes.probe_dataset(
        data, "tiny-arith", out=root, name="ray-2", ray="local", num_workers=2, **common
    )
    wall = time.perf_counter() - t
    rows.append(
        {
            "part": "throughput",
            "setup": "Ray, 2 local workers",
            "prompts": n,
            "steps": steps,
            "wall_s": round(wall, 2),
            "prompts_per_s": round(n / wall, 2),
            "steady_prompts_per_s": round(steady_rate(on_ray), 2),
            "startup_s": round(startup, 2),
            "same_tables": same_tables(single, on_ray),
        }
    )
    import ray

    ray.shutdown()
    return rows


def scale(root: Path, n: int, steps: int, shard_size: int) -> tuple[list[dict[str, Any]], Any]:
    import probes
    from studies.figures.runs import render_probe_figures

    data = write_prompts(root / "scale.jsonl", n)
    with RssSampler() as rss:
        base = psutil.Process().memory_info().rss
        started = dt.datetime.now(dt.timezone.utc)
        t = time.perf_counter()
        run = probes.probe_dataset(
            data,
            "tiny-arith",
            out=root,
            name="scale",
            num_steps=steps,
            shard_size=shard_size,
            batch_size=64,
            figures=False,
            progress=True,
        )
        wall = time.perf_counter() - t
        marks = sorted(
            dt.datetime.fromisoformat(r["written"]) for r in run.manifest["shards"]["ranks"].values()
        )
    first = (marks[0] - started).total_seconds()  # seconds into the sampling when shard 0 was recorded
    peaks_first = max((r for s, r in rss.samples if s <= first), default=base)
    peak = max(r for _, r in rss.samples)
    sizes = parquet_bytes(run)
    with RssSampler() as fig_rss:
        t = time.perf_counter()
        render_probe_figures(run)
        fig_s = time.perf_counter() - t
    row = {
        "part": "scale",
        "setup": "1 process",
        "prompts": n,
        "steps": steps,
        "unrolled_layers": 1 + steps + 1,
        "shards": len(marks),
        "wall_s": round(wall, 1),
        "prompts_per_s": round(n / wall, 2),
        "rows_ranks": run.rows()["ranks"],
        "rows_topk": run.rows()["topk"],
        "mb_ranks": round(sizes["ranks"] / 2**20, 1),
        "mb_topk": round(sizes["topk"] / 2**20, 1),
        "mb_all_tables": round(sum(sizes.values()) / 2**20, 1),
        "rss_start_mb": round(base / 2**20),
        "rss_after_first_shard_mb": round(peaks_first / 2**20),
        "rss_peak_mb": round(peak / 2**20),
        "figures_s": round(fig_s, 1),
        "figures_rss_peak_mb": round(max(r for _, r in fig_rss.samples) / 2**20),
    }
    return [row], run


def explorer(run: Any) -> list[dict[str, Any]]:
    import logging

    logging.getLogger("streamlit").setLevel(logging.ERROR)  # no Streamlit runtime here: plain queries
    from app import data

    path, mtime = data.run_ref(run.path)
    choices = data.q_choices(path, mtime)
    lenses, kinds = choices["lenses"], choices["target_kinds"]
    one = [17]
    queries = {
        "choices": lambda: data.q_choices(path, mtime),
        "prompt_table (10k rows)": lambda: data.q_prompt_table(path, mtime),
        "rank_rows (one prompt)": lambda: data.q_rank_rows(path, mtime, tuple(lenses), tuple(kinds), one),
        "median_trajectories": lambda: data.q_median_trajectories(path, mtime),
        "hover_aggregate": lambda: data.q_hover_aggregate(path, mtime, tuple(lenses)),
        "hover_per_prompt (one prompt)": lambda: data.q_hover_per_prompt(path, mtime, tuple(lenses), one),
        "dynamics_rows (one prompt)": lambda: data.q_dynamics_rows(path, mtime, one),
        "verdict_counts": lambda: data.q_verdict_counts(path, mtime),
        "headline": lambda: data.q_headline(path, mtime),
    }
    rows = []
    me = psutil.Process()
    for i, (name, fn) in enumerate(queries.items()):
        if i == 0:
            data.open_run.cache_clear()  # the first query pays the cold open (manifest, checksums)
        before = me.memory_info().rss
        t = time.perf_counter()
        fn()
        cold = time.perf_counter() - t
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        rows.append(
            {
                "part": "explorer",
                "query": name,
                "first_ms": round(cold * 1000, 1),
                "median_ms": round(sorted(times)[1] * 1000, 1),
                "rss_growth_mb": round((me.memory_info().rss - before) / 2**20, 1),
            }
        )
    before = me.memory_info().rss
    t = time.perf_counter()
    ranks = run.table("ranks")
    topk = run.table("topk")
    load = time.perf_counter() - t
    rows.append(
        {
            "part": "explorer",
            "query": "naive: ranks + topk loaded whole into pandas",
            "first_ms": round(load * 1000, 1),
            "median_ms": None,
            "rss_growth_mb": round((me.memory_info().rss - before) / 2**20, 1),
        }
    )
    del ranks, topk
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=25)
    parser.add_argument("--scale-prompts", type=int, default=10_000)
    parser.add_argument("--scale-steps", type=int, default=66)
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--root", type=Path, default=None, help="where runs go (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-probe-"))
    root.mkdir(parents=True, exist_ok=True)
    load = {"loadavg_start": os.getloadavg()}
    rows = throughput(root, args.prompts, args.steps, args.shard_size)
    if not args.skip_scale:
        scale_rows, run = scale(root, args.scale_prompts, args.scale_steps, 250)
        rows += scale_rows + explorer(run)
    load["loadavg_end"] = os.getloadavg()
    out = args.out or RESULTS / "probe.json"
    doc = {"benchmark": "probe", "machine": machine(), "load": load, "rows": rows}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    show(rows)
    print(f"load average at start {load['loadavg_start']}, at end {load['loadavg_end']}; wrote {out}")


def show(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    for part in dict.fromkeys(r["part"] for r in rows):
        group = [r for r in rows if r["part"] == part]
        keys = list(dict.fromkeys(k for r in group for k in r if k != "part"))
        if len(group) == 1:  # one row: show it as a list of values
            group = [{"what": k, "value": group[0][k]} for k in keys]
            keys = ["what", "value"]
        table = Table(title=part)
        for key in keys:
            table.add_column(key)
        for r in group:
            table.add_row(*[str(r.get(k, "")) for k in keys])
        Console().print(table)


if __name__ == "__main__":
    main()
