"""Kernel benchmarks: the lens pass (naive vs chunked PyTorch vs Triton) and the core-loop ops (eager vs fused).

A lens pass over ``N`` states costs ``2 N d V`` FLOPs; every lens variant is compared with a plain
``[N, d] x [d, V]`` matmul measured in the same run (same process, interleaved rounds), and its peak
extra memory is measured on its own: on CPU in a fresh subprocess per variant (peak RSS above the RSS
with the inputs built, via ``/proc/self/clear_refs`` + ``VmHWM``), on GPU with
``torch.cuda.max_memory_allocated``.

    python -m benchmarks.bench_kernels            # CPU shape (+ Huginn shape and Triton on a GPU)
    python -m benchmarks.bench_kernels --quick    # CI-sized shapes, seconds
    (``python benchmarks/bench_kernels.py`` works too)

Prints tables (rich) and writes JSON (``--out``, default ``benchmarks/results/kernels.json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runnable as a plain script

import kernels  # noqa: E402
from benchmarks.common import RESULTS  # noqa: E402
from benchmarks.common import machine as common_machine  # noqa: E402
from kernels.lens_stats import lens_statistics_chunked, prepare_lens_inputs  # noqa: E402

DEFAULT_OUT = RESULTS / "kernels.json"
#: The CPU target of the sibling issue: chunked within this factor of the bare matmul, and this many times
#: less peak memory than materialise-then-sort.
CPU_TIME_TARGET, CPU_MEMORY_TARGET = 1.25, 10.0


@dataclass(frozen=True)
class LensShape:
    """One lens-pass workload: ``n`` states of width ``d`` against a ``v``-token vocabulary."""

    name: str
    n: int
    d: int
    v: int
    dtype: str
    targets: int = 3
    topk: int = 5
    kl: bool = False

    @property
    def flops(self) -> float:
        return 2.0 * self.n * self.d * self.v


@dataclass(frozen=True)
class CoreShape:
    """Core-loop workload: ``rows`` token positions, width ``d``, MLP width ``ffn``."""

    name: str
    rows: int
    d: int
    ffn: int
    dtype: str


# --- lens workloads ---------------------------------------------------------------------------------


def lens_inputs(shape: LensShape, device: str) -> dict:
    """Seeded inputs, built without large temporaries (so the RSS baseline is not inflated)."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, shape.dtype)
    hidden = torch.randn(shape.n, shape.d, generator=gen, device=device).mul_(3).to(dtype)
    w = torch.randn(shape.v, shape.d, generator=gen, device=device).mul_(2.0 / shape.d**0.5).to(dtype)
    inputs = {
        "hidden": hidden,
        "unembedding": w,
        "norm_weight": torch.rand(shape.d, generator=gen, device=device).add_(0.5).to(dtype),
        "targets": torch.randint(0, shape.v, (shape.n, shape.targets), generator=gen, device=device),
        "topk": shape.topk,
    }
    if shape.kl:
        ref = torch.randn(shape.n, shape.v, generator=gen, device=device).mul_(2)
        inputs["ref_logprobs"] = ref.sub_(torch.logsumexp(ref, dim=-1, keepdim=True))
    return inputs


def naive_lens(inputs: dict) -> dict:
    """Materialise the fp32 logits, log-softmax them, sort every row (the method this issue replaces)."""
    x = kernels.rms_norm(inputs["hidden"], inputs["norm_weight"])
    logits = x.float() @ inputs["unembedding"].float().T
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    ascending = logits.sort(dim=-1).values
    tz = logits.gather(1, inputs["targets"])
    ranks = 1 + logits.shape[1] - torch.searchsorted(ascending, tz.contiguous(), right=True)
    top = ascending[:, -inputs["topk"] :].flip(-1)
    out = {"entropy": entropy, "ranks": ranks, "top": top, "logprobs": logp.gather(1, inputs["targets"])}
    if "ref_logprobs" in inputs:
        ref = inputs["ref_logprobs"]
        out["kl"] = (ref.exp() * (ref - logp)).sum(-1)
    return out


def chunked_lens(inputs: dict) -> object:
    """The chunked PyTorch path (what ``kernels.lens_statistics`` runs for CPU tensors)."""
    return lens_statistics_chunked(prepare_lens_inputs(**inputs))


def triton_lens(inputs: dict) -> object:
    from kernels.triton_lens import lens_statistics_triton

    return lens_statistics_triton(**inputs)


def matmul(inputs: dict) -> torch.Tensor:
    """The bare ``[N, d] x [d, V]`` matmul in the input dtype, output allocated as a user would."""
    return inputs["hidden"] @ inputs["unembedding"].T


LENS_VARIANTS: dict[str, Callable[[dict], object]] = {
    "matmul": matmul,
    "naive": naive_lens,
    "chunked": chunked_lens,
    "triton": triton_lens,
}


# --- measuring ----------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, device: str
) -> dict[str, list[float]]:
    """Seconds per call: one warm-up each, then ``rounds`` rounds running every variant once, so slow
    drifts of a shared machine hit all variants alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory_worker(shape: LensShape, variant: str, threads: int, queue: mp.Queue) -> None:
    torch.set_num_threads(threads)
    inputs = lens_inputs(shape, "cpu")
    gc.collect()
    base = _rss_bytes()
    reset = _reset_peak_rss()
    LENS_VARIANTS[variant](inputs)
    queue.put({"peak_extra_bytes": max(0, _peak_rss_bytes() - base), "peak_reset": reset})


def peak_memory_cpu(shape: LensShape, variant: str) -> dict:
    """Peak RSS above the inputs of one call, in a fresh ``spawn`` process (nothing cached from other runs)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_worker, args=(shape, variant, torch.get_num_threads(), queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    return result


def peak_memory_cuda(fn: Callable[[], object]) -> dict:
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - base, "peak_reset": True}


def bench_lens(shape: LensShape, device: str, rounds: int) -> list[dict]:
    names = ["matmul", "naive", "chunked"] + (["triton"] if device == "cuda" else [])
    inputs = lens_inputs(shape, device)
    fns = {name: (lambda fn=LENS_VARIANTS[name]: fn(inputs)) for name in names}
    if device == "cpu":  # the same matmul into a preallocated output: no page faults for a fresh 4NV bytes
        out = torch.empty(shape.n, shape.v, dtype=inputs["hidden"].dtype)
        fns["matmul (out=)"] = lambda: torch.mm(inputs["hidden"], inputs["unembedding"].T, out=out)
    times = time_interleaved(fns, rounds, device)
    del fns
    if device == "cpu":
        del out
    med = {name: statistics.median(ts) for name, ts in times.items()}
    paired = {  # per-round ratio to the matmul of the same round: robust to drifts of a shared machine
        name: statistics.median(t / m for t, m in zip(ts, times["matmul"], strict=True))
        for name, ts in times.items()
    }
    rows = []
    for name, ts in times.items():
        memory = {}
        if name in LENS_VARIANTS:
            if device == "cpu":
                memory = peak_memory_cpu(shape, name)
            else:
                memory = peak_memory_cuda(lambda fn=LENS_VARIANTS[name]: fn(inputs))
        rows.append(
            {
                "shape": asdict(shape),
                "variant": name,
                "device": device,
                "ms_median": 1e3 * med[name],
                "ms_min": 1e3 * min(ts),
                "ms_all": [1e3 * t for t in ts],
                "tflops": shape.flops / med[name] / 1e12,
                "x_matmul": med[name] / med["matmul"],
                "x_matmul_paired": paired[name],
                **memory,
            }
        )

    naive_mem = next((r.get("peak_extra_bytes") for r in rows if r["variant"] == "naive"), None)
    for r in rows:
        if naive_mem and r.get("peak_extra_bytes"):
            r["memory_vs_naive"] = naive_mem / r["peak_extra_bytes"]
    return rows


# --- core loop -----------------------------------------------------------------------------------------


def huginn_rms_norm(h: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype) * w


def bench_core(shape: CoreShape, device: str, rounds: int) -> list[dict]:
    """Each op eager (the model's plain expression) vs through ``kernels`` (Triton on GPU; on CPU the
    same eager expression by design, except the adapter, whose split form halves the per-iteration FLOPs)."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, shape.dtype)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device).to(dtype)

    x, res, e = rand(shape.rows, shape.d), rand(shape.rows, shape.d), rand(shape.rows, shape.d)
    w_norm = rand(shape.d).abs_().add_(0.5)
    fc = rand(shape.rows, 2 * shape.ffn)
    adapter = rand(shape.d, 2 * shape.d).mul_(shape.d**-0.5)
    injection = kernels.adapter_injection(e, adapter)
    ops = {
        "rms_norm(x + residual)": (
            lambda: huginn_rms_norm(x + res, w_norm),
            lambda: kernels.rms_norm(x, w_norm, residual=res),
        ),
        "swiglu": (lambda: F.silu(fc[:, : shape.ffn]) * fc[:, shape.ffn :], lambda: kernels.swiglu(fc)),
        "adapter (per iteration)": (
            lambda: F.linear(torch.cat([x, e], dim=-1), adapter),
            lambda: kernels.adapter_step(x, adapter, injection),
        ),
    }
    rows = []
    with torch.inference_mode():
        for op, (eager, fused) in ops.items():
            times = time_interleaved({"eager": eager, "fused": fused}, rounds, device)
            eager_ms, fused_ms = (1e3 * statistics.median(times[k]) for k in ("eager", "fused"))
            rows.append(
                {
                    "shape": asdict(shape),
                    "op": op,
                    "device": device,
                    "backend": kernels.backend_for(x),
                    "eager_ms": eager_ms,
                    "fused_ms": fused_ms,
                    "speedup": eager_ms / fused_ms,
                }
            )
    return rows


# --- report ------------------------------------------------------------------------------------------------


def machine() -> dict:
    """The shared description plus what matters here: the CPU model, the load during the run, Triton."""
    info = common_machine()
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def cpu_target(rows: list[dict], shape_name: str) -> dict | None:
    by_variant = {r["variant"]: r for r in rows if r["shape"]["name"] == shape_name and r["device"] == "cpu"}
    if "chunked" not in by_variant:
        return None
    chunked = by_variant["chunked"]
    result = {
        "shape": shape_name,
        "x_matmul": chunked["x_matmul"],
        "x_matmul_paired": chunked["x_matmul_paired"],
        "x_matmul_out": chunked["ms_median"] / by_variant["matmul (out=)"]["ms_median"],
        "memory_vs_naive": chunked.get("memory_vs_naive"),
    }
    result["time_ok"] = result["x_matmul"] <= CPU_TIME_TARGET
    result["memory_ok"] = (result["memory_vs_naive"] or 0) >= CPU_MEMORY_TARGET
    return result


def print_tables(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(150, Console().width))
    table = Table(title="Lens pass (2·N·d·V FLOPs)")
    for col in (
        "shape",
        "device",
        "variant",
        "ms (median)",
        "ms (min)",
        "TFLOP/s",
        "× matmul",
        "peak extra MiB",
        "memory ÷ naive",
    ):
        table.add_column(col, justify="right" if col not in ("shape", "variant", "device") else "left")
    for r in report["lens"]:
        s = r["shape"]
        mem = r.get("peak_extra_bytes")
        table.add_row(
            f"{s['name']} {s['n']}×{s['d']}×{s['v']} {s['dtype']}",
            r["device"],
            r["variant"],
            f"{r['ms_median']:.1f}",
            f"{r['ms_min']:.1f}",
            f"{r['tflops']:.3f}",
            f"{r['x_matmul']:.2f}",
            "" if mem is None else f"{mem / 2**20:.0f}",
            "" if "memory_vs_naive" not in r else f"{r['memory_vs_naive']:.1f}×",
        )
    console.print(table)
    core = Table(title="Core loop ops")
    for col in ("op", "shape", "backend", "eager ms", "fused ms", "speedup"):
        core.add_column(col)
    for r in report["core"]:
        s = r["shape"]
        core.add_row(
            r["op"],
            f"{s['rows']}×{s['d']} ffn={s['ffn']} {s['dtype']}",
            r["backend"],
            f"{r['eager_ms']:.3f}",
            f"{r['fused_ms']:.3f}",
            f"{r['speedup']:.2f}×",
        )
    console.print(core)
    for t in report["targets"]:
        console.print(
            f"CPU target ({t['shape']}): chunked = {t['x_matmul']:.2f}× matmul (paired {t['x_matmul_paired']:.2f}×, "
            f"{t['x_matmul_out']:.2f}× matmul into a preallocated output; target ≤ {CPU_TIME_TARGET}×) "
            f"{'PASS' if t['time_ok'] else 'FAIL'}; peak memory {t['memory_vs_naive'] or float('nan'):.1f}× less than naive "
            f"(target ≥ {CPU_MEMORY_TARGET:.0f}×) {'PASS' if t['memory_ok'] else 'FAIL'}"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized shapes and few rounds")
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds per variant (default 5, quick 3)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument(
        "--no-kl", action="store_true", help="skip the lens rows that include KL to a reference"
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)

    if args.quick:
        lens_shapes = [LensShape("quick", 256, 128, 4096, "float32")]
        core_cpu = CoreShape("quick", 256, 128, 352, "float32")
    else:
        lens_shapes = [LensShape("cpu", 2048, 512, 32768, "float32")]
        if not args.no_kl:
            lens_shapes.append(LensShape("cpu+kl", 2048, 512, 32768, "float32", kl=True))
        core_cpu = CoreShape("cpu", 2048, 1024, 3456, "float32")
    report: dict = {"machine": machine(), "rounds": rounds, "lens": [], "core": [], "targets": []}
    for shape in lens_shapes:
        report["lens"] += bench_lens(shape, "cpu", rounds)
    report["core"] += bench_core(core_cpu, "cpu", rounds)
    if torch.cuda.is_available():
        gpu_shapes = (
            [LensShape("quick-gpu", 1024, 1024, 16384, "bfloat16")]
            if args.quick
            else [
                LensShape("huginn", 4096, 5280, 65536, "bfloat16"),
                LensShape("huginn+kl", 4096, 5280, 65536, "bfloat16", kl=True),
            ]
        )
        for shape in gpu_shapes:
            report["lens"] += bench_lens(shape, "cuda", rounds)
        report["core"] += bench_core(
            CoreShape("quick-gpu", 1024, 1024, 3456, "bfloat16")
            if args.quick
            else CoreShape("huginn", 4096, 5280, 17920, "bfloat16"),
            "cuda",
            rounds,
        )
    else:
        report["gpu"] = "GPU figures pending: no GPU was available"
    report["load_average_1m_end"] = os.getloadavg()[0]  # a shared machine: say how busy it was
    target = cpu_target(report["lens"], "cpu")  # the sibling issue's target is for this shape only
    if target:
        report["targets"].append(target)
    print_tables(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
