"""Autoregressive decoding against the diffusion sampler, in one run, on CPU.

Models: the embedded ``tiny-arith`` (trained: the sampler study's task, arithmetic prompts continued for
``--new-tokens`` tokens), a random model of tiny-arith's size, and a wider random model (both Huginn
layout, zeros initial state, random prompts). Per model and setting: sequential model calls, sequential
core iterations and core-block applications (compute) per generated token, wall time and tokens/s
(median of ``--rounds`` interleaved rounds: every setting once per round), accuracy = the share of
prompts whose continuation equals fixed-depth decoding at the reference depth (for tiny-arith also the
share of right arithmetic answers). The target of issue #13: at equal accuracy (within 1 point), ≥ 2×
fewer sequential model calls than fixed-depth autoregressive decoding; the wall-time ratio is reported
as measured.

    python -m benchmarks.bench_sampler            # full (several minutes on 2 cores)
    python -m benchmarks.bench_sampler --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import lens
from benchmarks.common import report
from lens.runtime import configure_threads
from studies.sampler import Setting, generate_batch, score, summarize
from studies.tasks import arithmetic
from studies.tasks.prompts import resolve_template


def settings(steps: int, headways: list[int]) -> list[Setting]:
    """The reference (fixed depth ``steps``) first, half depth, adaptive exit, then the diffusion sampler."""
    out = [
        Setting(f"ar-T{steps}", "autoregressive", {"num_steps": steps}, "fixed depth"),
        Setting(f"ar-T{steps // 2}", "autoregressive", {"num_steps": steps // 2}, "fixed depth"),
        Setting(
            "ar-exit-kl",
            "autoregressive",
            {"num_steps": steps, "exit_criterion": "kl", "exit_threshold": 1e-3},
            "adaptive exit",
        ),
    ]
    base = {
        "num_steps": steps,
        "init_scale": 0.0,
        "state_noise_mixing": 0.0,
        "inner_recurrence": 4,
        "max_diffusion_steps": 4 * steps,  # a stalled faithful window costs at most this
    }
    for faithful in (True, False):
        for h in headways:
            for exit_t in (0.03, 0.1):
                name = f"diff-e{exit_t:g}-r4-h{h}" + ("" if faithful else "-corrected")
                opts = {**base, "headway": h, "exit_t": exit_t, "faithful": faithful}
                out.append(
                    Setting(name, "diffusion", opts, "diffusion" if faithful else "diffusion (corrected)")
                )
    return out


def random_model(width: int, heads: int, core: int, seed: int) -> lens.RecurrentDepthLM:
    torch.manual_seed(seed)
    cfg = lens.RecurrentDepthConfig(
        n_embd=width,
        n_heads=heads,
        vocab_size=1024,
        block_size=256,
        intermediate_size=int(width * 2.5) // 8 * 8,
        n_layers_in_prelude=1,
        n_layers_in_recurrent_block=core,
        n_layers_in_coda=1,
        mean_recurrence=16,
        name=f"random-{width}",
    )
    return lens.RecurrentDepthLM(cfg).eval()


def workloads(quick: bool, n: int) -> list[dict[str, Any]]:
    """(name, model, prompts, expected answers or None)."""
    out = []
    arith = lens.load_model("tiny-arith")
    tok = arith.tokenizer
    template = resolve_template(None, tok)
    problems = arithmetic.sample("arithmetic_1dc", n, split="test", seed=0)
    out.append(
        {
            "model": "tiny-arith (trained, arithmetic)",
            "net": arith,
            "prompts": [tok.encode(template.render(p.context, tok)) for p in problems],
            "answers": [template.expected_answer(p.completion) for p in problems],
        }
    )
    gen = torch.Generator().manual_seed(1)
    random_prompts = [torch.randint(0, 1024, (12,), generator=gen).tolist() for _ in range(n)]
    shapes = [(128, 4, 1, "random, tiny-arith size (d 128, core 1)")]
    if not quick:
        shapes.append((512, 8, 2, "random, wider (d 512, core 2)"))
    for width, heads, core, label in shapes:
        out.append(
            {
                "model": label,
                "net": random_model(width, heads, core, seed=width),
                "prompts": random_prompts,
                "answers": None,
            }
        )
    return out


def run(
    quick: bool, n: int, new_tokens: int, rounds: int, steps: int, batch_size: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    grid = settings(steps, [1, 2, 4] if not quick else [2])
    for work in workloads(quick, n):
        net = work["net"]
        configure_threads(net.num_parameters())
        prompts = work["prompts"]
        batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
        times: dict[str, list[float]] = {s.name: [] for s in grid}
        results: dict[str, list] = {}
        for r in range(rounds):  # interleaved: every setting once per round
            for setting in grid:
                total, outs = 0.0, []
                for chunk in batches:
                    res, seconds = generate_batch(net, chunk, new_tokens, setting)
                    total += seconds
                    outs.append((chunk, res, seconds))
                times[setting.name].append(total)
                if r == 0:
                    results[setting.name] = outs
        reference = [t for _, res, _ in results[grid[0].name] for t in res.tokens]
        scored = []
        for setting in grid:
            start = 0
            for chunk, res, seconds in results[setting.name]:
                answers = work["answers"][start : start + len(chunk)] if work["answers"] else None
                expected = reference[start : start + len(chunk)]
                scored += score(net.tokenizer, setting, res, seconds, chunk, expected, answers)
                start += len(chunk)
        summary = summarize(pd.DataFrame(scored)).set_index("setting")
        ref = summary.loc[grid[0].name]
        ref_ms = 1000 * statistics.median(times[grid[0].name])
        for setting in grid:
            s = summary.loc[setting.name]
            ms = 1000 * statistics.median(times[setting.name])
            tokens = n * new_tokens
            rows.append(
                {
                    "model": work["model"],
                    "setting": setting.name,
                    "accuracy": round(float(s["accuracy"]), 4),
                    "token_agreement": round(float(s["token_agreement"]), 4),
                    "answer_accuracy": None
                    if work["answers"] is None
                    else round(float(s["answer_accuracy"]), 4),
                    "calls_per_token": round(float(s["calls_per_token"]), 3),
                    "iterations_per_token": round(float(s["iterations_per_token"]), 2),
                    "compute_per_token": round(float(s["compute_per_token"]), 1),
                    "wall_ms": round(ms, 1),
                    "tokens_per_s": round(tokens / (ms / 1000), 1),
                    "calls_ratio_vs_ref": round(float(ref["calls_per_token"] / s["calls_per_token"]), 3),
                    "iterations_ratio_vs_ref": round(
                        float(ref["iterations_per_token"] / s["iterations_per_token"]), 3
                    ),
                    "wall_ratio_vs_ref": round(ref_ms / ms, 3),
                    "within_1pt_of_ref": bool(s["accuracy"] >= ref["accuracy"] - 0.01),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=None, help="prompts per model (default 32, quick 8)")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3, quick 1)")
    parser.add_argument("--steps", type=int, default=16, help="the reference depth")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    n = args.n or (8 if args.quick else 32)
    rounds = args.rounds or (1 if args.quick else 3)
    rows = run(args.quick, n, args.new_tokens, rounds, args.steps, args.batch_size)
    extra = f"load average at the end: {os.getloadavg()[0]:.1f}"
    report(
        "sampler",
        rows,
        args.out,
        f"autoregressive vs diffusion sampler ({n} prompts × {args.new_tokens} tokens; {extra})",
    )


if __name__ == "__main__":
    main()
