"""Forward pass of a looped model at several depths, and the memory cost of streaming.

CPU: a tiny-arith-sized and a wider random model at T = 1 … 64 (tokens/s), and the peak memory of
streaming 512 tokens into the real ``LensRecorder`` at T = 1 and T = 64 vs a consumer that keeps every
state (each in a fresh subprocess). ``--memory``: only the memory rows. ``--families``: one row per family (Huginn, retrofitted recurrence, Ouro) at the
same width and the same number of looped blocks per iteration, at several depths, plus Ouro's
generation with real early exit against running every iteration. GPU (when present): the real
Huginn-3.5B shape in bf16 with random weights.

    python -m benchmarks.bench_forward [--quick] [--families]
"""

from __future__ import annotations

import argparse
import statistics
import textwrap
from pathlib import Path

import torch

import lens
from benchmarks.common import report, time_call

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
    from probes.lenses.logit import LogitLens
    from probes.recorder import LensRecorder
    steps, mode = {steps}, {mode!r}
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = lens.RecurrentDepthConfig(n_embd=512, n_heads=8, intermediate_size=1408, vocab_size=1024,
                                    block_size=1024, n_layers_in_recurrent_block=4)
    model = lens.RecurrentDepthLM(cfg).eval()
    ids = torch.randint(0, 1024, (1, 512))
    process, peak, states = psutil.Process(), [0], [0]
    def sample(state=None):
        states[0] += state is not None
        peak[0] = max(peak[0], process.memory_info().rss)
    def run(T):
        kept = []
        if mode == "recorder":  # Logit Lens ranks, entropy, top-5 and KL of every state, decoded at the end
            consumer = LensRecorder(model, [LogitLens(model)], targets={{"answer": torch.tensor([3])}})
        else:
            consumer = lens.Subscription(lambda state: kept.append(state.tensor))
        out = model(ids, num_steps=T, init_state="zeros", logits="last",
                    consumers=[consumer, lens.Subscription(sample)])
        if mode == "recorder":
            consumer.finalize(out.logits)
        sample()
    with torch.no_grad():
        run(2)  # warm the allocator and every code path
        before, states[0] = process.memory_info().rss, 0
        peak[0] = before
        run(steps)
    print(states[0], peak[0] - before)
""")


def stream_memory(steps: int, mode: str) -> tuple[int, int]:
    """States seen and peak resident memory above the pre-pass level (sampled at every state and after
    the recorder's ``finalize``), in a fresh process: ``mode`` is ``recorder`` or ``keep``."""
    from benchmarks.common import run_in_subprocess

    states, growth = run_in_subprocess(_STREAM.format(steps=steps, mode=mode)).split()
    return int(states), int(growth)


#: One model per family, same width (128), heads (4), MLP (320) and looped blocks per iteration (2);
#: Huginn and the retrofit add one prelude and one coda block, Ouro loops its whole two-layer stack.
FAMILY_SHAPES = {
    "huginn": dict(n_embd=128, n_heads=4, intermediate_size=320, n_layers_in_prelude=1,
                   n_layers_in_recurrent_block=2, n_layers_in_coda=1),
    "retrofit": dict(n_embd=128, n_heads=4, num_key_value_heads=2, intermediate_size=320,
                     n_layers_in_prelude=1, n_layers_in_recurrent_block=2, n_layers_in_coda=1),
    "ouro": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=320,
                 num_hidden_layers=2),
}  # fmt: skip


def family_model(family: str) -> lens.LoopedLM:
    torch.manual_seed(0)
    shape = FAMILY_SHAPES[family]
    if family == "ouro":
        return lens.OuroLM(
            lens.OuroConfig(vocab_size=1024, max_position_embeddings=256, initializer_range=0.1, **shape)
        ).eval()
    cls, config = (
        (lens.RetrofitLM, lens.RetrofitConfig)
        if family == "retrofit"
        else (lens.RecurrentDepthLM, lens.RecurrentDepthConfig)
    )
    return cls(config(vocab_size=1024, block_size=256, **shape)).eval()


def families(depths: tuple[int, ...], rounds: int = 7) -> list[dict]:
    """Forward pass per family at each depth, batch 8 × 64 tokens, float32; ratio to Huginn's time.

    The families are timed interleaved (one call of each per round, after a warm-up), so a change of
    load on a shared machine hits all three alike; the median over rounds is reported.
    """
    import statistics
    import time

    ids = torch.randint(0, 1024, (8, 64), generator=torch.Generator().manual_seed(0))
    models = {family: family_model(family) for family in FAMILY_SHAPES}
    kwargs = {family: {} if family == "ouro" else {"init_state": "zeros"} for family in FAMILY_SHAPES}
    rows = []
    for T in depths:
        times: dict[str, list[float]] = {family: [] for family in models}
        with torch.no_grad():
            for family, model in models.items():  # warm-up
                model(ids, num_steps=T, logits="last", **kwargs[family])
            for _ in range(rounds):
                for family, model in models.items():
                    start = time.perf_counter()
                    model(ids, num_steps=T, logits="last", **kwargs[family])
                    times[family].append((time.perf_counter() - start) * 1000)
        huginn = statistics.median(times["huginn"])
        for family, model in models.items():
            ms = statistics.median(times[family])
            rows.append(
                {
                    "family": family,
                    "layout": model.layout.describe(),
                    "params_M": model.num_parameters() / 1e6,
                    "iterations": T,
                    "tokens": ids.numel(),
                    "median_ms": ms,
                    "min_ms": min(times[family]),
                    "tokens_per_s": ids.numel() / (ms / 1000),
                    "vs_huginn": ms / huginn,
                }
            )
    return rows


def ouro_early_exit(new_tokens: int = 24, T: int = 16, threshold: float = 0.5) -> list[dict]:
    """Ouro greedy generation: real early exit (the gate criterion) against every token running all T
    iterations (the authors' generation computes every step), batch 1, cached; block calls counted."""
    model = family_model("ouro")
    prompt = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(1))
    calls = [0]
    handles = [
        b.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1)) for b in model.stage("core")
    ]
    rows = []
    try:
        for name, kwargs in (
            ("all T iterations", {}),
            (f"early exit (gate ≥ {threshold})", {"exit_criterion": "gate", "exit_threshold": threshold}),
        ):
            run = lambda kw=kwargs: model.generate(prompt, new_tokens, T, stop_token_ids=[], **kw)  # noqa: E731
            calls[0] = 0
            res = run()
            blocks = calls[0]
            t = time_call(run, repeats=5)
            rows.append(
                {
                    "generation": name,
                    "max_iterations": T,
                    "new_tokens": new_tokens,
                    "mean_iterations": sum(res.steps_used[0]) / len(res.steps_used[0]),
                    "block_calls": blocks,
                    "median_ms": t["median_ms"],
                    "tokens_per_s": new_tokens / (t["median_ms"] / 1000),
                }
            )
    finally:
        for h in handles:
            h.remove()
    rows[1]["speedup"] = rows[0]["median_ms"] / rows[1]["median_ms"]
    rows[0]["speedup"] = 1.0
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--families", action="store_true", help="only the per-family rows")
    parser.add_argument("--memory", action="store_true", help="only the streaming-memory rows")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    depths = (1, 4, 16) if args.quick else (1, 4, 16, 64)
    if args.families:
        torch.set_num_threads(1)
        report("forward_families", families(depths), args.out, "forward pass per family (CPU, 1 thread)")
        report("ouro_early_exit", ouro_early_exit(), None, "Ouro generation: early exit vs all iterations")
        return
    if not args.memory:
        forward_rows(depths, args.out)
    stream_rows()


def forward_rows(depths: tuple[int, ...], out: Path | None) -> None:
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
    report("forward", rows, out, "forward pass (CPU unless marked)")


def stream_rows() -> None:
    state_mb = 512 * 512 * 4 / 2**20  # one [1, 512, 512] float32 state
    memory = []
    for name, steps, mode in (
        ("LensRecorder (Logit Lens, last position)", 1, "recorder"),
        ("LensRecorder (Logit Lens, last position)", 64, "recorder"),
        ("keep every state", 64, "keep"),
    ):
        runs = [stream_memory(steps, mode) for _ in range(3 if mode == "recorder" else 1)]
        growth = statistics.median(g for _, g in runs) / 2**20
        memory.append(
            {
                "consumer": name,
                "iterations": steps,
                "states": runs[0][0],
                "state_MB": state_mb,
                "peak_growth_MB": growth,  # median over fresh processes (the allocator's luck varies)
                "runs_MB": [g / 2**20 for _, g in runs],
                "growth_in_states": growth / state_mb,
            }
        )
    memory[1]["vs_T1"] = memory[1]["peak_growth_MB"] / memory[0]["peak_growth_MB"]
    report("forward_memory", memory, None, "streaming 512 tokens: peak memory above the pre-pass level")


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
