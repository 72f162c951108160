"""Autoregressive decoding against the diffusion sampler, in one run, on CPU.

Models: the embedded ``tiny-arith`` (trained: the sampler study's task, arithmetic prompts continued for
``--new-tokens`` tokens), the embedded ``tiny-chains`` (trained on its long answers: two-hop chain
traces, 28 tokens, the sampler study's task for this model; the reference depth is its default), a random
model of tiny-arith's size, and a wider random model (both Huginn layout, zeros initial state, random
prompts). Per model and setting: sequential model calls, sequential
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
from studies.sampler import CHAINS_TASK, Setting, generate_batch, sample_problems, score, summarize
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


def _trained(name: str, task: str, problems: list) -> dict[str, Any]:
    """An embedded model's workload: its held-out problems rendered with its prompt template."""
    net = lens.load_model(name)
    tok = net.tokenizer
    template = resolve_template(None, tok)
    return {
        "model": f"{name} (trained, {task})",
        "net": net,
        "problems": problems,
        "prompts": [tok.encode(template.render(p.context, tok)) for p in problems],
        "answers": [template.expected_answer(p.completion) for p in problems],
    }


WORKLOADS = ("tiny-arith", "tiny-chains", "random-128", "random-512")
"""The benchmark's models by key (``--models``); ``random-512`` is left out of ``--quick``."""


def workloads(keys: list[str], n: int) -> list[dict[str, Any]]:
    """(name, model, prompts, expected answers or None, optionally new tokens and reference depth) per key."""
    out = []
    gen = torch.Generator().manual_seed(1)
    random_prompts = [torch.randint(0, 1024, (12,), generator=gen).tolist() for _ in range(n)]
    for key in keys:
        if key == "tiny-arith":
            out.append(
                _trained(
                    "tiny-arith", "arithmetic", arithmetic.sample("arithmetic_1dc", n, split="test", seed=0)
                )
            )
        elif key == "tiny-chains":
            work = _trained("tiny-chains", "two-hop traces", sample_problems(CHAINS_TASK, n, seed=0))
            tok = work["net"].tokenizer
            work["new_tokens"] = max(len(tok.encode(p.completion)) for p in work["problems"])
            work["steps"] = work["net"].config.mean_recurrence
            out.append(work)
        else:
            width, heads, core = {"random-128": (128, 4, 1), "random-512": (512, 8, 2)}[key]
            out.append(
                {
                    "model": f"random, d {width}, core {core}"
                    + (" (tiny-arith size)" if width == 128 else ""),
                    "net": random_model(width, heads, core, seed=width),
                    "prompts": random_prompts,
                    "answers": None,
                }
            )
    return out


def run(
    quick: bool, keys: list[str], n: int, new_tokens: int, rounds: int, steps: int, batch_size: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for work in workloads(keys, n):
        grid = settings(work.get("steps", steps), [1, 2, 4, 8] if not quick else [2])
        new = work.get("new_tokens", new_tokens)
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
                    res, seconds = generate_batch(net, chunk, new, setting)
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
            tokens = n * new
            rows.append(
                {
                    "model": work["model"],
                    "setting": setting.name,
                    "new_tokens": new,
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
    parser.add_argument(
        "--models",
        default=None,
        help=f"comma-separated subset of {', '.join(WORKLOADS)} (default: all; --quick: all but random-512)",
    )
    args = parser.parse_args()
    keys = (
        args.models.split(",")
        if args.models
        else [k for k in WORKLOADS if not (args.quick and k == "random-512")]
    )
    unknown = sorted(set(keys) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    n = args.n or (8 if args.quick else 32)
    rounds = args.rounds or (1 if args.quick else 3)
    rows = run(args.quick, keys, n, args.new_tokens, rounds, args.steps, args.batch_size)
    extra = f"load average at the end: {os.getloadavg()[0]:.1f}"
    report(
        "sampler",
        rows,
        args.out,
        f"autoregressive vs diffusion sampler ({n} prompts per model; {extra})",
    )


if __name__ == "__main__":
    main()
