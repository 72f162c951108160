"""Forward pass of a recurrent-depth model at several depths, and the memory cost of streaming.

CPU: a tiny-arith-sized and a wider random model at T = 1 … 64 (tokens/s), and the peak memory of
64 iterations with a consumer that keeps one rank per state vs one that keeps every state (each in
a fresh subprocess). GPU (when present): the real Huginn-3.5B shape in bf16 with random weights.

    python -m benchmarks.bench_forward [--quick]
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import torch

import lens
from benchmarks.common import peak_rss_in_subprocess, report, time_call

SHAPES = {
    "tiny-arith-like": dict(
        n_embd=128,
        n_heads=4,
        intermediate_size=320,
        n_layers_in_prelude=1,
        n_layers_in_recurrent_block=2,
        n_layers_in_coda=1,
    ),
    "wide": dict(
        n_embd=512,
        n_heads=8,
        intermediate_size=1408,
        n_layers_in_prelude=2,
        n_layers_in_recurrent_block=4,
        n_layers_in_coda=2,
    ),
}

_STREAM = textwrap.dedent("""
    import psutil, torch, lens
    keep = {keep}
    torch.manual_seed(0)
    cfg = lens.RecurrentDepthConfig(n_embd=512, n_heads=8, intermediate_size=1408, vocab_size=1024,
                                    block_size=1024, n_layers_in_recurrent_block=4)
    model = lens.RecurrentDepthLM(cfg).eval()
    ids = torch.randint(0, 1024, (1, 512))
    process, kept, peak = psutil.Process(), [], [0]
    def consume(state):
        kept.append(state.tensor if keep else int((state.tensor[0, -1] > state.tensor[0, -1, 0]).sum()))
        peak[0] = max(peak[0], process.memory_info().rss)
    with torch.no_grad():
        model(ids, num_steps=1, init_state="zeros", logits="last")  # warm the allocator
        before = process.memory_info().rss
        model(ids, num_steps=64, init_state="zeros", logits="last", consumers=[lens.Subscription(consume)])
    print(peak[0] - before)
""")


def stream_memory(keep: bool) -> int:
    """Peak resident memory above the pre-pass level, sampled at every state, in a fresh process."""
    return peak_rss_in_subprocess(_STREAM.format(keep=keep))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    depths = (1, 4, 16) if args.quick else (1, 4, 16, 64)
    rows = []
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        model = lens.RecurrentDepthLM(
            lens.RecurrentDepthConfig(vocab_size=1024, block_size=256, **shape)
        ).eval()
        ids = torch.randint(0, 1024, (8, 64))
        for T in depths:
            with torch.no_grad():
                t = time_call(
                    lambda m=model, T=T, ids=ids: m(ids, num_steps=T, init_state="zeros", logits="last"),
                    repeats=3,
                )
            rows.append(
                {
                    "model": name,
                    "params_M": model.num_parameters() / 1e6,
                    "iterations": T,
                    "tokens": ids.numel(),
                    "median_ms": t["median_ms"],
                    "tokens_per_s": ids.numel() / (t["median_ms"] / 1000),
                }
            )
    if torch.cuda.is_available():
        rows += huginn_gpu(depths)
    report("forward", rows, args.out, "forward pass (CPU unless marked)")
    state_mb = 512 * 512 * 4 / 2**20  # one [1, 512, 512] float32 state
    memory = []
    for name, keep in (("one rank per state", False), ("keep every state", True)):
        growth_mb = stream_memory(keep) / 2**20
        memory.append(
            {
                "consumer": name,
                "iterations": 64,
                "states": 64 * 5,
                "state_MB": state_mb,
                "peak_growth_MB": growth_mb,
                "growth_in_states": growth_mb / state_mb,
            }
        )
    report("forward_memory", memory, None, "streaming 64 iterations: peak memory above the pre-pass level")


def huginn_gpu(depths: tuple[int, ...]) -> list[dict]:
    """The real Huginn-3.5B shape, random weights, bf16 on the GPU."""
    cfg = lens.RecurrentDepthConfig.from_name("huginn-0125")
    with torch.device("cuda"):
        model = lens.RecurrentDepthLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 65536, (1, 512), device="cuda")
    rows = []
    for T in depths:
        with torch.no_grad():
            t = time_call(lambda T=T: model(ids, num_steps=T, init_state="zeros", logits="last"), repeats=3)
        rows.append(
            {
                "model": "huginn-3.5B bf16 (GPU)",
                "params_M": model.num_parameters() / 1e6,
                "iterations": T,
                "tokens": ids.numel(),
                "median_ms": t["median_ms"],
                "tokens_per_s": ids.numel() / (t["median_ms"] / 1000),
            }
        )
    return rows


if __name__ == "__main__":
    main()
