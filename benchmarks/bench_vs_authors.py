"""looplens against the Huginn authors' modeling code: forward at decode and prefill shapes, generation.

The authors' ``raven_modeling_minimal.py`` runs in its own Python environment (``transformers`` 4.57.x;
never a looplens dependency, never in this repository) behind :mod:`benchmarks.authors_worker`; looplens
runs in this process. Both get the same weights (a looplens-written Huginn checkpoint that their
loader reads by name), float32, the same number of torch threads, a zero initial state. Each round
times every case once on each side, in alternating order (ABBA), so a change of load on a shared
machine hits both alike; medians over rounds are reported with the machine's load average. Every
case also checks that both sides computed the same thing (last-position logits within 1e-4
relative, identical greedy tokens).

    python -m benchmarks.bench_vs_authors --authors /path/to/recpre/raven_modeling_minimal.py \\
        --python /path/to/reference-env/bin/python [--rounds 7] [--quick] [--no-compile]

Cases: *decode* is one new token at batch 1 against a key/value cache holding a 32-token prompt;
*prefill* a whole prompt (1 × 128, 4 × 256) without a cache; *generate* is greedy generation of
32 tokens at fixed depth on tiny-arith (``generate_minimal`` on their side). With compilation on, a
third contender runs looplens with ``compile=True`` (a compiled core iteration, see
:mod:`lens.compiled`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lens
from benchmarks.common import RESULTS, machine, report
from lens.cache import KVCache

WIDE = dict(
    n_embd=512,
    n_heads=8,
    intermediate_size=1408,
    n_layers_in_prelude=2,
    n_layers_in_recurrent_block=4,
    n_layers_in_coda=2,
    vocab_size=1024,
    block_size=1024,
)
PAST = 32  # prompt tokens already in the cache for the decode cases


class Authors:
    """The worker process running the authors' code; one JSON request and answer per line."""

    def __init__(self, python: str, modeling: Path, threads: int) -> None:
        worker = Path(__file__).with_name("authors_worker.py")
        self.proc = subprocess.Popen(
            [python, str(worker), "--modeling", str(modeling), "--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"},
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise RuntimeError("the authors' worker exited (see its stderr above)")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the authors' worker failed: {answer['error']}")
        return answer

    def __call__(self, op: str, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def copy_cache(cache: KVCache) -> KVCache:
    """A copy a forward pass can extend without changing ``cache`` (its tensors are replaced, not written)."""
    new = KVCache(cache.layout)
    new.keys, new.values = dict(cache.keys), dict(cache.values)
    new.key_mask, new.seq_len = cache.key_mask, cache.seq_len
    return new


@dataclass
class Case:
    """One shape: a looplens call per contender and the matching request to the authors' worker."""

    name: str
    model: str
    kind: str
    batch: int
    tokens: int
    steps: int
    ours: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)
    request: dict[str, Any] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)
    cpu_times: dict[str, list[float]] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)


def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall and CPU (this thread) milliseconds of ``fn()``, and its result."""
    start, cpu = time.perf_counter(), time.thread_time()
    out = fn()
    return (time.perf_counter() - start) * 1000, (time.thread_time() - cpu) * 1000, out


def forward_case(
    name: str, model: lens.RecurrentDepthLM, compiled: lens.RecurrentDepthLM | None, kind: str,
    batch: int, tokens: int, steps: int,
) -> Case:  # fmt: skip
    """A decode (one token after ``PAST`` cached ones, batch 1) or prefill case at ``steps`` iterations."""
    gen = torch.Generator().manual_seed(steps * 1000 + tokens)
    V = model.config.padded_vocab_size
    ids = torch.randint(3, V, (batch, tokens), generator=gen)
    case = Case(f"{kind} {name} {batch}×{tokens}", name, kind, batch, tokens, steps)
    past = torch.randint(3, V, (batch, PAST), generator=gen) if kind == "decode" else None
    contenders = {"looplens": model} | ({"looplens compiled": compiled} if compiled is not None else {})
    for label, m in contenders.items():
        prefilled = None
        if past is not None:
            prefilled = m.new_cache()
            with torch.no_grad():
                m(past, num_steps=steps, init_state="zeros", cache=prefilled, logits="last")

        def call(m=m, prefilled=prefilled) -> dict[str, Any]:
            cache = copy_cache(prefilled) if prefilled is not None else None
            with torch.no_grad():
                ms, cpu_ms, out = _timed(lambda: m(ids, num_steps=steps, init_state="zeros", cache=cache))
            return {"ms": ms, "cpu_ms": cpu_ms, "last_logits": out.logits[0, -1]}

        case.ours[label] = call
    case.request = {"op": "forward", "name": name, "ids": ids.tolist(), "steps": steps}
    if past is not None:
        case.request["past"] = past.tolist()
    return case


def generate_case(
    name: str,
    model: lens.RecurrentDepthLM,
    compiled: lens.RecurrentDepthLM | None,
    steps: int,
    new_tokens: int,
) -> Case:
    """Greedy generation of ``new_tokens`` at fixed depth from an arithmetic prompt (no stop token)."""
    prompt = model.tokenizer.encode("Question: What is (6 - 5) * 3?\nAnswer:")
    case = Case(f"generate {name} 1×{len(prompt)}+{new_tokens}", name, "generate", 1, new_tokens, steps)
    contenders = {"looplens": model} | ({"looplens compiled": compiled} if compiled is not None else {})
    for label, m in contenders.items():

        def call(m=m) -> dict[str, Any]:
            ms, cpu_ms, out = _timed(
                lambda: m.generate([prompt], new_tokens, steps, init_state="zeros", stop_token_ids=[])
            )
            return {"ms": ms, "cpu_ms": cpu_ms, "tokens": out.tokens[0]}

        case.ours[label] = call
    case.request = {
        "op": "generate",
        "name": name,
        "prompt": prompt,
        "new_tokens": new_tokens,
        "steps": steps,
    }
    return case


def _agree(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    if "tokens" in ours:
        return list(ours["tokens"]) == list(theirs["tokens"])
    a, b = ours["last_logits"].float(), torch.tensor(theirs["last_logits"])
    return bool(((a - b).abs().max() / b.abs().max()).item() < 1e-4)


def run(cases: list[Case], authors: Authors, rounds: int) -> list[float]:
    """Warm every contender once (and check agreement), then ``rounds`` ABBA-ordered rounds; load samples."""
    loads = []
    for case in cases:
        theirs = authors(**case.request)
        for label, call in case.ours.items():
            ours = call()
            case.check[label] = _agree(ours, theirs)
        case.times = {label: [] for label in [*case.ours, "authors"]}
        case.cpu_times = {label: [] for label in [*case.ours, "authors"]}
    for r in range(rounds):
        loads.append(os.getloadavg()[0])
        for case in cases:
            order = [*case.ours, "authors"]
            for label in order if r % 2 == 0 else order[::-1]:
                answer = authors(**case.request) if label == "authors" else case.ours[label]()
                case.times[label].append(answer["ms"])
                case.cpu_times[label].append(answer["cpu_ms"])
        print(f"round {r + 1}/{rounds} done (load {loads[-1]:.1f})", file=sys.stderr, flush=True)
    loads.append(os.getloadavg()[0])
    return loads


def rows_of(cases: list[Case]) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        theirs = statistics.median(case.times["authors"])
        theirs_cpu = statistics.median(case.cpu_times["authors"])
        for label in [*case.ours, "authors"]:
            ms = statistics.median(case.times[label])
            cpu_ms = statistics.median(case.cpu_times[label])
            work = case.batch * case.tokens
            rows.append(
                {
                    "case": case.name,
                    "kind": case.kind,
                    "model": case.model,
                    "iterations": case.steps,
                    "implementation": label,
                    "median_ms": ms,
                    "min_ms": min(case.times[label]),
                    "tokens_per_s": work / (ms / 1000),
                    "speedup_vs_authors": theirs / ms,
                    "cpu_median_ms": cpu_ms,
                    "cpu_speedup_vs_authors": theirs_cpu / cpu_ms,
                    "same_result": case.check.get(label, True),
                    "times_ms": case.times[label],
                    "cpu_times_ms": case.cpu_times[label],
                }
            )
    return rows


def build_models(
    compile_: bool,
) -> dict[str, tuple[lens.RecurrentDepthLM, lens.RecurrentDepthLM | None, Path]]:
    """tiny-arith (its trained weights) and a random 512-wide Huginn, each with the checkpoint the worker reads."""
    from lens.loading import EMBEDDED_DIR

    tiny = lens.load_model("tiny-arith").eval()
    tiny.config.eos_token_id = None  # fixed-length generation on both sides: no end-of-text stop
    torch.manual_seed(0)
    wide = lens.RecurrentDepthLM(lens.RecurrentDepthConfig(**WIDE)).eval()
    folder = Path(tempfile.mkdtemp(prefix="looplens-vs-authors-"))
    lens.save_model(wide, folder / "wide-512")
    out = {}
    for name, model, path in (
        ("tiny-arith", tiny, EMBEDDED_DIR / "tiny-arith"),
        ("wide-512", wide, folder / "wide-512"),
    ):
        compiled = None
        if compile_:
            compiled = lens.load_model(path, compile=True).eval()
            compiled.config.eos_token_id = None
        out[name] = (model, compiled, path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--authors", type=Path, required=True, help="path of their raven_modeling_minimal.py")
    parser.add_argument(
        "--python", default=sys.executable, help="Python of the environment that runs their code"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled contender")
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this text")
    parser.add_argument("--out", type=Path, default=RESULTS / "vs_authors.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    models = build_models(not args.no_compile)
    authors = Authors(args.python, args.authors.resolve(), args.threads)
    try:
        for name, (_, _, path) in models.items():
            authors("load", name=name, checkpoint=str(path))
        cases = []
        decode_steps = (4, 16) if args.quick else (4, 16, 32)
        for name, (model, compiled, _) in models.items():
            for T in decode_steps if name == "tiny-arith" else decode_steps[:2]:
                cases.append(forward_case(name, model, compiled, "decode", 1, 1, T))
            for batch, tokens in ((1, 128),) if args.quick else ((1, 128), (4, 256)):
                for T in (4,) if (args.quick or (name == "wide-512" and batch > 1)) else (4, 16):
                    cases.append(forward_case(name, model, compiled, "prefill", batch, tokens, T))
        tiny, tiny_compiled, _ = models["tiny-arith"]
        for T in (16,) if args.quick else (4, 16, 32):
            cases.append(generate_case("tiny-arith", tiny, tiny_compiled, T, 32))
        cases = [c for c in cases if args.only is None or args.only in f"{c.name} T={c.steps}"]
        loads = run(cases, authors, args.rounds)
    finally:
        authors.close()
    rows = rows_of(cases)
    out = report("vs_authors", [{k: v for k, v in r.items() if not k.endswith("times_ms")} for r in rows], args.out,
                 "looplens vs the authors' code (CPU)")  # fmt: skip
    payload = json.loads(out.read_text())
    payload |= {
        "rows": rows,
        "authors": {"file": args.authors.name, **{k: v for k, v in authors.info.items() if k != "ready"}},
        "load_average": {"start": load_start, "per_round": loads, "end": os.getloadavg()},
        "rounds": args.rounds,
        "machine": machine(),
    }
    out.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
