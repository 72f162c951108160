"""Wall time of ``looplens study arithmetic`` on the embedded model (100 prompts, 16 iterations, both
lenses and the Tuned Lens, CPU), in a fresh process and a fresh run directory, phase by phase.

    python -m benchmarks.bench_study [--n 100]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--model", default="tiny-arith")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as runs:
        cmd = [
            sys.executable,
            "-m",
            "looplens",
            "study",
            "arithmetic",
            "--model",
            args.model,
            "--n",
            str(args.n),
            "--out",
            runs,
        ]
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if done.returncode != 0:
            sys.exit(f"study failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        figures = sorted(p.name for p in Path(runs).glob("*/figures/*.png"))
    rows = [
        {
            "study": "arithmetic",
            "model": args.model,
            "prompts": args.n,
            "iterations": 16,
            "wall_s": seconds,
            "target_s": 300.0,
            "figures": len(figures),
        }
    ]
    report("study", rows, args.out, "looplens study arithmetic, end to end (fresh process)")


if __name__ == "__main__":
    main()
