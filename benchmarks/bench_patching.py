"""Patching sweeps: batched (patches on the batch axis, the loop resumed at the patched iteration) vs one
patch per forward pass, in the same run, on tiny-arith; then attribution patching and the full study.

50 prompt pairs (one operand changed, both answered correctly) × 16 iterations × every position of the
15-token prompt, clean states patched into the corrupted run: 12,000 patched runs either way. Both
methods must give the same numbers (logit difference, probabilities, ranks, top tokens to 1e-5); the
ratio of their times is what counts. Attribution patching estimates the same cells from one forward and
backward pass per pair; its Spearman agreement with the exact cells is reported. Finally the whole
``looplens study patching`` (every experiment, figures) is timed.

    python -m benchmarks.bench_patching [--pairs 50] [--loop-pairs 50] [--no-study]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import lens
from benchmarks.common import report
from lens.runtime import configure_threads
from probes.patching import attribution_agreement, patching_sweep
from studies.patching import operand_pairs, run_patching_study
from studies.tasks.prompts import resolve_template


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} / {five:.1f}"


def _float64_check(model: lens.LoopedLM, pairs: list, ids: list, steps: int, sweep: dict) -> float:
    """Batched vs loop in float64: what is left of their difference once rounding is (almost) gone."""
    double = lens.load_model("tiny-arith", dtype=__import__("torch").float64)
    kwargs = {**sweep, "pair_ids": ids}
    _, a = patching_sweep(double, pairs, steps, **kwargs)
    _, b = patching_sweep(double, pairs, steps, batched=False, **kwargs)
    return float(np.max(np.abs(a["logit_diff"].to_numpy(float) - b["logit_diff"].to_numpy(float))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument(
        "--loop-pairs", type=int, default=None, help="pairs the naive loop runs (default all)"
    )
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--no-study", action="store_true", help="skip timing the full study")
    parser.add_argument("--check-pairs", type=int, default=5, help="pairs compared again in float64")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model = lens.load_model("tiny-arith")
    threads = configure_threads(model.num_parameters())
    template = resolve_template(None, model.tokenizer)
    T = args.steps
    study_pairs = operand_pairs(model, template, args.pairs, T, seed=0, init="random")
    pairs = [p.pair for p in study_pairs]
    ids = [p.pair_id for p in study_pairs]
    sweep = dict(positions="all", directions=["denoise"], init_state="random", pair_ids=ids)
    loop_n = args.loop_pairs or len(pairs)
    rows = []

    load0 = _load()
    t0 = time.perf_counter()
    _, batched = patching_sweep(model, pairs, T, **sweep)
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, loop = patching_sweep(model, pairs[:loop_n], T, batched=False, **{**sweep, "pair_ids": ids[:loop_n]})
    t_loop = time.perf_counter() - t0
    load1 = _load()

    same = batched[batched["pair_id"].isin(ids[:loop_n])].reset_index(drop=True)
    diffs = {
        col: float(np.nanmax(np.abs(same[col].to_numpy(float) - loop[col].to_numpy(float))))
        for col in ("logit_diff", "clean_prob", "corrupt_prob", "top_prob", "effect")
    }
    identical = {
        col: bool((same[col].astype(str) == loop[col].astype(str)).all())
        for col in ("clean_rank", "corrupt_rank", "top_token_id", "outcome")
    }
    relative = float(
        np.max(np.abs(same["logit_diff"] - loop["logit_diff"]) / np.maximum(1.0, np.abs(loop["logit_diff"])))
    )
    exact64 = _float64_check(model, pairs[: args.check_pairs], ids[: args.check_pairs], T, sweep)
    per_patch_loop = t_loop / len(loop)
    per_patch_batched = t_batched / len(batched)
    rows.append(
        {
            "method": "one patch per forward (naive loop)",
            "pairs": loop_n,
            "patched_runs": len(loop),
            "seconds": round(t_loop, 2),
            "ms_per_patch": round(1000 * per_patch_loop, 3),
            "speedup": 1.0,
            "load_1m_5m": f"{load0} → {load1}",
        }
    )
    rows.append(
        {
            "method": "batched sweep (RowPatches, resumed loop)",
            "pairs": len(pairs),
            "patched_runs": len(batched),
            "seconds": round(t_batched, 2),
            "ms_per_patch": round(1000 * per_patch_batched, 3),
            "speedup": round(per_patch_loop / per_patch_batched, 2),
            "load_1m_5m": f"{load0} → {load1}",
            "max_abs_diff": diffs,
            "max_rel_diff_logit_diff": relative,
            "max_abs_diff_float64": exact64,
            "identical": identical,
        }
    )

    t0 = time.perf_counter()
    _, attributed = patching_sweep(model, pairs, T, exact=False, attribution=True, **sweep)
    t_attr = time.perf_counter() - t0
    agreement = attribution_agreement(pd.concat([batched, attributed], ignore_index=True))
    rows.append(
        {
            "method": "attribution patching (one forward + backward per pair)",
            "pairs": len(pairs),
            "patched_runs": len(attributed),
            "seconds": round(t_attr, 2),
            "ms_per_patch": round(1000 * t_attr / len(attributed), 3),
            "speedup": round(per_patch_loop / (t_attr / len(attributed)), 1),
            "load_1m_5m": _load(),
            "spearman_rho_cells": agreement.get("rho_cells"),
            "spearman_rho_heatmap": agreement.get("rho_heatmap"),
        }
    )

    if not args.no_study:
        with tempfile.TemporaryDirectory() as where:
            load_before = _load()
            t0 = time.perf_counter()
            run = run_patching_study(model="tiny-arith", n=args.pairs, steps=T, out=Path(where))
            t_study = time.perf_counter() - t0
            study_rows = len(run.table("patching"))
            study_agreement = attribution_agreement(run.table("patching"))
        rows.append(
            {
                "method": "looplens study patching (every experiment + figures)",
                "pairs": args.pairs,
                "patched_runs": study_rows,
                "seconds": round(t_study, 1),
                "ms_per_patch": round(1000 * t_study / study_rows, 3),
                "speedup": None,
                "load_1m_5m": f"{load_before} → {_load()}",
                "spearman_rho_cells": study_agreement.get("rho_cells"),
                "spearman_rho_heatmap": study_agreement.get("rho_heatmap"),
            }
        )
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k) for k in keys} for r in rows]  # one column set for the printed table
    report("patching", rows, args.out, f"patching sweeps on tiny-arith, T={T}, {threads} thread(s)")


if __name__ == "__main__":
    main()
