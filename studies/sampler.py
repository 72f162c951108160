"""``looplens study sampler``: autoregressive decoding (fixed depth, adaptive exit) against the diffusion sampler.

Every setting generates the same ``--new-tokens`` (≥ 16) continuation of held-out prompts of ``--task``
(end-of-text does not stop it: the long output is the point): arithmetic prompts by default, the
long-answer chains trace (``chains_2hop_trace``: the program written out with its values, ~30 tokens)
for ``tiny-chains``, the model trained on it. The reference is fixed-depth
autoregressive decoding at ``--steps`` iterations; a setting is **correct** on a prompt when its
continuation equals the reference's token for token (``token_agreement`` gives the share of equal
tokens), and ``answer_correct`` says whether the arithmetic answer it wrote (up to the first
end-of-text) is right. Per setting the run records, per prompt, sequential model calls (forward passes
on the critical path), sequential core iterations, core-block applications summed over tokens (the
compute) and wall time; the summary adds tokens/s.

The grid: fixed depth at ``steps / 4``, ``steps / 2`` and ``steps``; adaptive exit with the
``latent-diff`` criterion at each threshold; the diffusion sampler (``latent-diff`` freezing) over
thresholds × inner recurrences × headways, faithful; and the corrected sampler (``faithful=False``) at
the middle threshold and inner recurrence for every headway, which measures what the corrections change.
Initial states are zeros everywhere (no noise), so every number is deterministic. For a few prompts the
middle diffusion setting is traced: the ``wavefront`` table holds each window position's frozen flag,
recurrence and stability at every step, and the Logit/Coda Lens rank of the finally generated token.

Figures: ``sampler_frontier`` (accuracy against sequential model calls per token, and against wall
time) and ``wavefront`` (diffusion step × position: frozen / active, recurrence count, lens rank of the
final token) for the first prompt. The run is resumable: every (setting, batch) is a shard, and a
resume with other settings, weights or prompts is refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

import lens
from lens.errors import InputError
from lens.model import LoopedLM
from lens.runtime import configure_threads
from probes.dataset import open_model_run
from probes.records import records
from probes.store import Run
from probes.wavefront import WavefrontRecorder
from studies.console import print_run_footer
from studies.evaluation import _answer_text
from studies.tasks import arithmetic
from studies.tasks.prompts import PromptTemplate, resolve_template

TASK = "arithmetic_1dc"
CHAINS_TASK = "chains_2hop_trace"
MIN_NEW_TOKENS = 16

__all__ = ["Setting", "cost", "generate_batch", "run_sampler_study", "sampler_grid", "score", "summarize"]


@dataclass(frozen=True)
class Setting:
    """One way of generating: a sampler and its keyword options for ``model.generate``."""

    name: str
    sampler: str
    options: dict[str, Any] = field(default_factory=dict)
    family: str = ""  # "fixed depth", "adaptive exit", "diffusion", "diffusion (corrected)"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sampler": self.sampler, "options": self.options, "family": self.family}


def sampler_grid(
    steps: int,
    thresholds: Sequence[float],
    inner: Sequence[int],
    headways: Sequence[int],
    new_tokens: int = MIN_NEW_TOKENS,
) -> list[Setting]:
    """The study's settings, the reference (fixed depth at ``steps``) first.

    A diffusion setting may take at most ``2 * new_tokens * steps / inner_recurrence`` diffusion steps
    (twice the reference's sequential core iterations): the faithful sampler can stall on a window that
    never converges, and such a prompt then ends short, with ``stopped = "max_diffusion_steps"``.

    Example:
        >>> [s.name for s in sampler_grid(16, [0.03], [4], [1, 2])]  # doctest: +NORMALIZE_WHITESPACE
        ['ar-T16', 'ar-T4', 'ar-T8', 'ar-exit0.03', 'diff-e0.03-r4-h1', 'diff-e0.03-r4-h2',
         'diff-e0.03-r4-h1-corrected', 'diff-e0.03-r4-h2-corrected']
    """
    out = [Setting(f"ar-T{steps}", "autoregressive", {"num_steps": steps}, "fixed depth")]
    for T in sorted({max(1, steps // 4), max(1, steps // 2)} - {steps}):
        out.append(Setting(f"ar-T{T}", "autoregressive", {"num_steps": T}, "fixed depth"))
    for t in thresholds:
        opts = {"num_steps": steps, "exit_criterion": "latent-diff", "exit_threshold": float(t)}
        out.append(Setting(f"ar-exit{t:g}", "autoregressive", opts, "adaptive exit"))
    base = {
        "num_steps": steps,
        "init_scale": 0.0,
        "state_noise_mixing": 0.0,
        "freeze_strategy": "latent-diff",
    }
    for t in thresholds:
        for r in inner:
            for h in headways:
                opts = {**base, "exit_t": float(t), "inner_recurrence": int(r), "headway": int(h)}
                opts["max_diffusion_steps"] = max(1, 2 * new_tokens * steps // int(r))
                out.append(Setting(f"diff-e{t:g}-r{r}-h{h}", "diffusion", opts, "diffusion"))
    t_mid, r_mid = sorted(thresholds)[len(thresholds) // 2], sorted(inner)[len(inner) // 2]
    for h in headways:
        opts = {
            **base,
            "exit_t": float(t_mid),
            "inner_recurrence": int(r_mid),
            "headway": int(h),
            "faithful": False,
            "max_diffusion_steps": max(1, 2 * new_tokens * steps // int(r_mid)),
        }
        out.append(
            Setting(f"diff-e{t_mid:g}-r{r_mid}-h{h}-corrected", "diffusion", opts, "diffusion (corrected)")
        )
    return out


def default_task(model: str) -> str:
    """The study's task for a model: the long-answer chains trace for ``tiny-chains`` (trained on it),
    else continuations of arithmetic prompts."""
    return CHAINS_TASK if Path(str(model)).name == "tiny-chains" else TASK


def sample_problems(task: str, n: int, seed: int) -> list[Any]:
    """``n`` held-out (``test`` split) problems of an arithmetic or a chains task."""
    if task in arithmetic.TASKS:
        return arithmetic.sample(task, n, split="test", seed=seed)
    try:
        from studies.tasks import chains
    except ImportError:  # a checkout without the chains task family
        chains = None
    if chains is None or task not in chains.TASKS:
        known = list(arithmetic.TASKS) + (["chains_{hops}hop[_trace]"] if chains is not None else [])
        raise InputError(f"unknown task {task!r}; tasks are {', '.join(known)}")
    return chains.sample(task, n, split="test", seed=seed)


def traced_setting(grid: Sequence[Setting]) -> Setting:
    """The diffusion setting whose wavefront is traced: middle threshold and inner recurrence, smallest headway."""
    diffusion = [s for s in grid if s.family == "diffusion"]
    middle = {}
    for key in ("exit_t", "inner_recurrence"):
        values = sorted({s.options[key] for s in diffusion})
        middle[key] = values[len(values) // 2]
    middle["headway"] = min(s.options["headway"] for s in diffusion)
    return next(s for s in diffusion if all(s.options[k] == v for k, v in middle.items()))


def _parse_list(values: Sequence[Any], kind: type, what: str, low: float) -> list:
    try:
        out = sorted({kind(v) for v in values})
    except (TypeError, ValueError) as err:
        raise InputError(f"{what}: not a list of numbers ({err})") from None
    if not out or any(v <= low if kind is float else v < low for v in out):
        raise InputError(f"{what} must be {'>' if kind is float else '>='} {low}, got {list(values)}")
    return out


def run_sampler_study(
    model: str = "tiny-arith",
    n: int = 48,
    steps: int = 16,
    new_tokens: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    out: Path = Path("runs"),
    name: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    template: str | None = None,
    thresholds: Sequence[float] = (0.01, 0.03, 0.1),
    inner: Sequence[int] = (2, 4, 8),
    headways: Sequence[int] = (1, 2, 4),
    wavefront_n: int = 2,
    task: str | None = None,
    overwrite: bool = False,
    console: Console | None = None,
) -> Run:
    """Run (or resume) the sampler study; returns the completed run.

    ``task`` defaults to :func:`default_task`; ``new_tokens`` to 24, or the longest expected completion
    (plus its end-of-text) where that is longer, so a long answer is written out in full.
    """
    console = console or Console()
    if steps < 1 or n < 1 or batch_size < 1:
        raise InputError("--steps, --n and --batch-size must be >= 1")
    if new_tokens is not None and new_tokens < MIN_NEW_TOKENS:
        raise InputError(f"--new-tokens must be >= {MIN_NEW_TOKENS} (the sampler matters for long outputs)")
    thresholds = _parse_list(thresholds, float, "exit thresholds", 0.0)
    inner = _parse_list(inner, int, "inner recurrences", 1)
    headways = _parse_list(headways, int, "headways", 1)
    if not 0 <= wavefront_n <= n:
        raise InputError(f"--wavefront-n must be between 0 and --n ({n})")
    t0 = time.monotonic()
    net = lens.load_model(model, dtype=dtype, device=device)
    configure_threads(net.num_parameters(), device)
    tok = net.tokenizer
    if tok is None:
        raise InputError(f"model {model!r} has no tokenizer.json; the study needs one to build prompts")
    lens.DiffusionSampler(net)  # refuses families the sampler does not apply to, before any work
    prompt_template = resolve_template(template, tok)
    task = task or default_task(model)
    problems = sample_problems(task, n, seed)
    texts = [prompt_template.render(p.context, tok) for p in problems]
    if new_tokens is None:
        new_tokens = max(24, max(len(tok.encode(p.completion)) for p in problems) + 1)
    longest = max(len(tok.encode(t)) for t in texts)
    if longest + new_tokens + max(headways) + 1 > net.config.block_size:
        raise InputError(
            f"prompts of {longest} tokens + {new_tokens} new ones do not fit the model's context "
            f"({net.config.block_size}); use fewer --new-tokens"
        )
    grid = sampler_grid(steps, thresholds, inner, headways, new_tokens)
    traced = traced_setting(grid)
    settings = {
        "study": "sampler",
        "task": task,
        "n": n,
        "steps": steps,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "seed": seed,
        "reference": grid[0].name,
        "grid": [s.to_dict() for s in grid],
        "traced": traced.name,
        "wavefront_n": wavefront_n,
        "wavefront_lenses": [lens_name for lens_name in net.layout.lenses() if lens_name != "tuned"],
    }
    run_name = name or f"sampler-{Path(str(model)).name}-T{steps}-N{new_tokens}-n{n}-s{seed}"
    run = open_model_run(out, run_name, model, net, device, dtype, prompt_template, settings, overwrite)
    console.print(
        f"[bold]sampler study[/] → {run.path}  ({n} prompts × {new_tokens} new tokens, {len(grid)} settings; "
        f"{net.layout.family}: {net.layout.describe()})"
    )
    with run:
        _generate_all(run, net, problems, texts, prompt_template, grid, traced, settings)
        figures = _render(run)
        run.mark_complete()
    summary = summarize(run.table("sampler"))
    _print_summary(run, summary, figures, time.monotonic() - t0, console)
    return run


def _generate_all(
    run: Run,
    net: LoopedLM,
    problems: Sequence[Any],
    texts: Sequence[str],
    template: PromptTemplate,
    grid: Sequence[Setting],
    traced: Setting,
    settings: dict[str, Any],
) -> None:
    tok = net.tokenizer
    if not run.has_shard("prompts", 0):
        frame = pd.DataFrame(
            {
                "prompt_id": range(len(problems)),
                "task": settings["task"],
                "context": [p.context for p in problems],
                "completion": [p.completion for p in problems],
                "intermediate": [p.intermediate for p in problems],
                "prompt_text": list(texts),
            }
        )
        run.write_shard("prompts", 0, records("prompts", frame))
    ids = [tok.encode(t) for t in texts]
    batch_size, new = settings["batch_size"], settings["new_tokens"]
    batches = list(range(0, len(problems), batch_size))
    reference: dict[int, list[int]] = {}
    work = [(s, b) for s in grid for b in range(len(batches))]
    for setting, b in tqdm(work, desc="sampler settings × batches", unit="batch"):
        shard = f"{setting.name}-b{b:03d}"
        start = batches[b]
        if run.has_shard("sampler", shard):
            if setting is grid[0]:
                done = run.query("SELECT prompt_id, token_ids FROM sampler WHERE setting = ?", [setting.name])
                reference.update({int(r.prompt_id): _ids(r.token_ids) for r in done.itertuples()})
            continue
        chunk = ids[start : start + batch_size]
        if setting.name == traced.name and start < settings["wavefront_n"]:  # traced once, untimed
            recorder = WavefrontRecorder(net, lenses=settings["wavefront_lenses"])
            traced_res, _ = generate_batch(net, chunk, new, setting, recorder)
            frame = recorder.finalize(traced_res, setting.name)
            frame["prompt_id"] = frame["prompt_id"] + start
            frame = frame[frame["prompt_id"] < settings["wavefront_n"]]
            run.write_shard("wavefront", shard, frame.assign(run=run.name), replace=True)
        res, seconds = generate_batch(net, chunk, new, setting)
        if setting is grid[0]:
            reference.update({start + i: t for i, t in enumerate(res.tokens)})
        answers = [template.expected_answer(problems[start + i].completion) for i in range(len(chunk))]
        rows = score(
            tok, setting, res, seconds, chunk, [reference[start + i] for i in range(len(chunk))], answers
        )
        for i, row in enumerate(rows):
            row.update(prompt_id=start + i, task=settings["task"])
        run.write_shard("sampler", shard, records("sampler", rows).assign(run=run.name))


def score(
    tok: Any,
    setting: Setting,
    res: Any,
    seconds: float,
    chunk: Sequence[Sequence[int]],
    expected: Sequence[Sequence[int]],
    answers: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """``sampler`` rows (without prompt ids) of one generated batch against the reference continuations.

    A continuation is correct when its first ``len(expected)`` tokens equal the reference's; ``answers``
    (the task's expected answer per prompt) fill ``answer_correct``, else it is None.
    """
    rows = []
    decode = tok.decode if tok is not None else (lambda ids: " ".join(map(str, ids)))
    for i, tokens in enumerate(res.tokens):
        want = list(expected[i])
        same = sum(int(a == b) for a, b in zip(tokens, want, strict=False))
        calls, sequential, compute = cost(res, i, len(chunk[i]), setting)
        answer_ok = None
        if answers is not None and tok is not None:
            answer_ok = _answer_text(tok.decode(tokens)).strip() == answers[i].strip()
        rows.append(
            {
                "setting": setting.name,
                "sampler": setting.sampler,
                "options": json.dumps(setting.options, sort_keys=True),
                "expected": decode(want),
                "generated": decode(tokens),
                "token_ids": " ".join(map(str, tokens)),
                "correct": same == len(want) and len(tokens) >= len(want),
                "token_agreement": same / max(len(want), 1),
                "answer_correct": answer_ok,
                "new_tokens": len(tokens),
                "stopped": str(res.stopped[i]),
                "model_calls": calls,
                "core_iterations": sequential,
                "core_passes": compute,
                "seconds": seconds / len(chunk),
            }
        )
    return rows


def _ids(text: str) -> list[int]:
    return [int(t) for t in text.split()] if text else []


def generate_batch(
    net: LoopedLM,
    chunk: Sequence[Sequence[int]],
    new: int,
    setting: Setting,
    recorder: WavefrontRecorder | None = None,
) -> tuple[Any, float]:
    """One batch of ``new`` tokens per prompt (end-of-text does not stop it), and its wall time."""
    opts = dict(setting.options)
    common: dict[str, Any] = {"stop_at_eos": False, "stop_token_ids": []}
    if setting.sampler == "diffusion":
        common["seed"] = 0
        if recorder is not None:
            common["consumers"] = [recorder]
    else:
        common["init_state"] = "zeros"
    start = time.perf_counter()
    res = net.generate([list(c) for c in chunk], new, sampler=setting.sampler, **opts, **common)
    return res, time.perf_counter() - start


def cost(res: Any, i: int, prompt_len: int, setting: Setting) -> tuple[int, int, int]:
    """(sequential model calls, sequential core iterations, core-block applications summed over tokens)."""
    if setting.sampler == "diffusion":
        st = res.stats[i]
        prefill = st.len_prefill * setting.options["num_steps"]
        return st.model_calls, st.core_iterations, st.num_tokens_forward - st.len_prefill + prefill
    used = res.steps_used[i]
    calls = len(used)
    compute = prompt_len * used[0] + sum(used[1:]) if used else 0
    return calls, sum(used), compute


def summarize(sampler: pd.DataFrame) -> pd.DataFrame:
    """One row per setting: accuracy, answer accuracy, calls, iterations and compute per token, tokens/s.

    Example:
        >>> rows = pd.DataFrame({"setting": ["a", "a"], "sampler": "diffusion", "options": "{}",
        ...     "correct": [True, False], "token_agreement": [1.0, 0.5], "answer_correct": [True, True],
        ...     "new_tokens": [20, 20], "model_calls": [10, 12], "core_iterations": [40, 48],
        ...     "core_passes": [400, 480], "seconds": [0.5, 0.5]})
        >>> summarize(rows)[["accuracy", "calls_per_token", "tokens_per_s"]].round(2).values.tolist()
        [[0.5, 0.55, 40.0]]
    """
    sampler = sampler.assign(answer_correct=pd.to_numeric(sampler["answer_correct"], errors="coerce"))
    grouped = sampler.groupby("setting", sort=False)
    out = pd.DataFrame(
        {
            "sampler": grouped["sampler"].first(),
            "options": grouped["options"].first(),
            "n": grouped.size(),
            "accuracy": grouped["correct"].mean(),
            "token_agreement": grouped["token_agreement"].mean(),
            "answer_accuracy": grouped["answer_correct"].mean(),
            "calls_per_token": grouped["model_calls"].sum() / grouped["new_tokens"].sum(),
            "iterations_per_token": grouped["core_iterations"].sum() / grouped["new_tokens"].sum(),
            "compute_per_token": grouped["core_passes"].sum() / grouped["new_tokens"].sum(),
            "seconds": grouped["seconds"].sum(),
            "tokens_per_s": grouped["new_tokens"].sum() / grouped["seconds"].sum(),
        }
    )
    return out.reset_index()


def _render(run: Run) -> dict[str, dict]:
    from studies.figures import Layout, render_all

    tables = {"sampler": run.table("sampler"), "wavefront": run.table("wavefront")}
    layout = Layout.from_manifest(run.manifest, run.manifest["settings"]["steps"])
    title = f"{run.manifest['model']['name']} · reference T={run.manifest['settings']['steps']}"
    return render_all(
        tables, layout, run.figures_dir, title, only=("sampler_frontier", "wavefront"), strict=True
    )


def _print_summary(run: Run, summary: pd.DataFrame, figures: dict, seconds: float, console: Console) -> None:
    reference = run.manifest["settings"]["reference"]
    table = Table(title=f"sampler study: {run.name} (accuracy = the {reference} continuation, exact)")
    for col in ("setting", "accuracy", "agree", "answers", "calls/tok", "iters/tok", "tok/s"):
        table.add_column(col, justify="left" if col == "setting" else "right", no_wrap=True)
    for row in summary.itertuples():
        table.add_row(
            row.setting,
            f"{row.accuracy:.1%}",
            f"{row.token_agreement:.1%}",
            f"{row.answer_accuracy:.1%}",
            f"{row.calls_per_token:.2f}",
            f"{row.iterations_per_token:.1f}",
            f"{row.tokens_per_s:.0f}",
        )
    console.print(table)
    print_run_footer(console, run, seconds, page="Wavefront")
