"""Coda Lens: one batched coda pass over many iterations vs the reference study's per-state loop.

The reference study decoded each intermediate state by copying the model's key/value cache and
running the coda on that state alone, one state at a time. looplens stacks the states of many
iterations along the batch axis and runs the coda once. Both are timed in the same run on a small
model; the ratio is what counts.

    python -m benchmarks.bench_coda_lens [--quick]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

import lens
from benchmarks.common import report, time_call
from probes.lenses import CodaLens


def prompt_cache(model: lens.RecurrentDepthLM, ids: torch.Tensor, iterations: int) -> lens.KVCache:
    """The key/value cache of the prompt before its last token (built once, outside the timing)."""
    cache = model.new_cache()
    with torch.no_grad():
        model(ids[:, :-1], num_steps=iterations, init_state="zeros", cache=cache)
    return cache


def per_state_with_cache_copy(
    model: lens.RecurrentDepthLM, ids: torch.Tensor, states: torch.Tensor, cache: lens.KVCache
) -> torch.Tensor:
    """The reference method: for each state, copy the cache, run the coda on the last position."""
    with torch.no_grad():
        out = []
        S = ids.shape[1]
        freqs = model.rope(torch.tensor([[S - 1]]))
        for state in states:  # [B, S, d] each
            scratch = copy.deepcopy(cache)
            x = model.final_norm(state[:, -1:])
            for i, block in enumerate(model.transformer.coda):
                x = block(x, freqs, -1 - i, None, scratch)
            out.append(model.head(model.final_norm(x))[:, -1])
        return torch.stack(out)


def batched(model: lens.RecurrentDepthLM, states: torch.Tensor) -> torch.Tensor:
    coda = CodaLens(model)
    with torch.no_grad():
        T, B, S, d = states.shape
        h = coda.transform_hidden(states.reshape(T * B, S, d), "core.0")
        return model.head(model.final_norm(h[:, -1])).reshape(T, B, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    width, seq, iterations = (128, 32, 8) if args.quick else (256, 96, 32)
    cfg = lens.RecurrentDepthConfig(
        n_embd=width,
        n_heads=4,
        intermediate_size=2 * width,
        vocab_size=512,
        block_size=256,
        n_layers_in_prelude=1,
        n_layers_in_recurrent_block=2,
        n_layers_in_coda=2,
    )
    model = lens.RecurrentDepthLM(cfg).eval()
    ids = torch.randint(0, 512, (1, seq))
    with torch.no_grad():
        trace = model(ids, num_steps=iterations, init_state="zeros", return_trace=["core.1"]).trace
    states = trace["core.1"]  # [T, 1, S, d]
    cache = prompt_cache(model, ids, iterations)
    naive = time_call(lambda: per_state_with_cache_copy(model, ids, states, cache), repeats=3)
    ours = time_call(lambda: batched(model, states), repeats=3)
    rows = [
        {
            "method": "per-state loop, cache copied (reference study)",
            "states": iterations,
            "median_ms": naive["median_ms"],
            "speedup": 1.0,
        },
        {
            "method": "looplens CodaLens, one batched pass",
            "states": iterations,
            "median_ms": ours["median_ms"],
            "speedup": naive["median_ms"] / ours["median_ms"],
        },
    ]
    report(
        "coda_lens",
        rows,
        args.out,
        f"Coda Lens over {iterations} iterations (width {width}, {seq} tokens, CPU)",
    )


if __name__ == "__main__":
    main()
