"""Wall and CPU time of a ``looplens study`` on its embedded model, in a fresh process and a fresh run
directory: ``arithmetic`` (tiny-arith, 100 prompts, 16 iterations, Logit + Coda + Tuned Lens) or
``chains`` (tiny-chains, 60 prompts per number of hops, its default depth, linear probes).

    python -m benchmarks.bench_study [--study chains] [--n N]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import report

DEFAULT_MODEL = {"arithmetic": "tiny-arith", "chains": "tiny-chains"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--study", choices=sorted(DEFAULT_MODEL), default="arithmetic")
    parser.add_argument("--n", type=int, default=None, help="prompts (default: the study's own)")
    parser.add_argument("--model", default=None, help="default: the study's embedded model")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = args.model or DEFAULT_MODEL[args.study]
    with tempfile.TemporaryDirectory() as runs:
        cmd = [sys.executable, "-m", "looplens", "study", args.study, "--model", model, "--out", runs]
        if args.n is not None:
            cmd += ["--n", str(args.n)]
        t = time.perf_counter()
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            sys.exit(f"study failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        figures = sorted(p.name for p in Path(runs).glob("*/figures/*.png"))
    rows = [
        {
            "study": args.study,
            "model": model,
            "prompts": args.n
            if args.n is not None
            else ("100" if args.study == "arithmetic" else "60 per hops"),
            "wall_s": seconds,
            "cpu_s": (after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime),
            "target_s": 300.0,
            "figures": len(figures),
        }
    ]
    name = "study" if args.study == "arithmetic" else f"study-{args.study}"
    report(name, rows, args.out, f"looplens study {args.study}, end to end (fresh process)")


if __name__ == "__main__":
    main()
