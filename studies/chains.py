"""``looplens study chains``: does a looped model follow a variable chain one hop per iteration?

For each number of hops (1–6), on held-out chains whose values are pairwise distinct (so each value's
digit stands for one hop):

- **accuracy by iterations**: greedy exact match of the short answer at every depth;
- **rank trajectories**: at the answer position, every unrolled layer decoded with the Logit, Coda
  (and a Tuned) Lens; the rank of each value along the chain (``value_0`` … ``value_{hops}``, the
  last one being the answer), of the model's own token and of a control token;
- **linear probes**: a logistic-regression probe per layer reading each value (a digit) from the
  latent, both at the answer position and at the end of the statement assigning that value's
  variable — where a model that propagates values along the program would compute it.

Everything is written per number of hops into a run (resumable); the figures (``chain_ranks``,
``chain_probes``, ``depth_scaling``, and the arithmetic study's ``rank_trajectory``,
``numeric_prefix`` and ``latent_dynamics``) and a one-screen summary follow.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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
from probes.api import probe_prompts
from probes.dataset import open_model_run
from probes.linear import collect_at_positions, linear_probe
from probes.store import Run
from studies.arithmetic import TUNED_LENS_TRAINING, control_token, single_token, tuned_lens_for_run
from studies.console import print_run_footer
from studies.evaluation import accuracy_table, default_depths, evaluate_answers, evaluate_tasks
from studies.tasks import chains
from studies.tasks.prompts import PromptTemplate, resolve_template

DEPTH_ID_OFFSET = 1_000_000
"""Prompt ids of the depth-scaling answers start at ``DEPTH_ID_OFFSET × depth`` (unique within the run;
the ``purpose`` column says what they are), the probed problems' at ``100_000 × hops``."""


def study_problems(hops: int, n: int, seed: int) -> list[chains.Problem]:
    """``n`` held-out problems of ``hops`` hops whose chain values are pairwise distinct."""
    return chains.sample(chains.task_name(hops), n, split="test", seed=seed, distinct_values=True)


def value_targets(tokenizer: Any, template: PromptTemplate, problems: Sequence[chains.Problem]) -> dict:
    """Token id of each chain value per problem (``value_0`` … ``value_{hops}``, ``final``), spelled as
    the model writes its answer (``" 7"``)."""
    hops = problems[0].hops
    spaced = template.expected_answer(problems[0].completion).startswith(" ")
    out: dict[str, list[int]] = {f"value_{k}": [] for k in range(hops + 1)}
    for p in problems:
        for k, v in enumerate(p.values):
            tid = single_token(tokenizer, (" " if spaced else "") + str(v))
            if tid is None:
                raise InputError("the chains study needs every digit as one token of the model's vocabulary")
            out[f"value_{k}"].append(tid)
    out["final"] = list(out[f"value_{hops}"])
    return out


def statement_positions(tokenizer: Any, prompt_text: str, problem: chains.Problem) -> list[int]:
    """Per chain value, the token position (in the prompt) of the ``;`` closing its variable's assignment."""
    start = prompt_text.rindex(problem.program)
    out = []
    for name in problem.names:
        at = 0 if problem.program.startswith(f"{name}=") else problem.program.index(f";{name}=") + 1
        end = problem.program.index(";", at)
        out.append(len(tokenizer.encode(prompt_text[: start + end + 1])) - 1)
    return out


def run_chains_study(
    model: str = "tiny-chains",
    n: int = 60,
    steps: int | None = None,
    batch_size: int = 60,
    seed: int = 0,
    out: Path = Path("runs"),
    name: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    template: str | None = None,
    tuned_lens: bool = True,
    depths: Sequence[int] | None = None,
    depth_n: int = 60,
    probe_n: int = 240,
    hops: Sequence[int] = tuple(h for h in chains.HOPS if h > 0),
    overwrite: bool = False,
    console: Console | None = None,
    ray: str | None = None,
    num_workers: int | None = None,
) -> Run:
    """Run (or resume) the study; returns the completed run.

    ``n`` problems per number of hops are decoded through every lens, ``probe_n`` (including those)
    train and test the linear probes, ``depth_n`` are answered at each of ``depths`` (default: the
    evaluation's depths up to four times the model's default ``steps``). It runs in this process
    (``ray`` and ``num_workers`` are refused: only the arithmetic study is sharded on Ray).
    """
    if ray is not None or num_workers is not None:
        raise InputError(
            "the chains study runs in this process; --ray and --workers apply to the arithmetic study"
        )
    console = console or Console()
    t0 = time.monotonic()
    net = lens.load_model(model, dtype=dtype, device=device)
    configure_threads(net.num_parameters(), device)
    tok = net.tokenizer
    if tok is None:
        raise InputError(f"model {model!r} has no tokenizer.json; the study needs one to build prompts")
    steps = steps if steps is not None else net.config.mean_recurrence
    depths = list(depths) if depths else default_depths(steps)
    hops = sorted(set(hops))
    if steps < 1 or min(depths) < 1:
        raise InputError(f"--steps and depths must be >= 1, got {steps} and {depths}")
    if n < 1 or depth_n < 1 or batch_size < 1:
        raise InputError("--n, depth_n and --batch-size must be >= 1")
    if probe_n < max(n, 40):
        raise InputError(f"probe_n must be >= max(n, 40) (the probes need held-out prompts), got {probe_n}")
    if not hops or not set(hops) <= set(chains.HOPS):
        raise InputError(f"hops must be among {chains.HOPS}, got {hops}")
    prompt_template = resolve_template(template, tok)
    control = control_token(tok)
    lens_names = ["logit", "coda"] + (["tuned"] if tuned_lens else [])
    settings = {
        "study": "chains",
        "hops": hops,
        "n": n,
        "probe_n": probe_n,
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "tuned_lens": tuned_lens,
        "depths": depths,
        "depth_n": depth_n,
        "control": control,
        "lenses": lens_names,
        "tuned_lens_training": dict(TUNED_LENS_TRAINING, prompts=32 * len(hops)) if tuned_lens else None,
    }
    run_name = name or f"chains-{Path(str(model)).name}-T{steps}-n{n}-s{seed}"
    run = open_model_run(out, run_name, model, net, device, dtype, prompt_template, settings, overwrite)
    console.print(
        f"[bold]chains study[/] → {run.path}  (hops {hops[0]}–{hops[-1]}: {n} problems each through "
        f"{len(lens_names)} lenses at T={steps}, {probe_n} for linear probes, {depth_n} at T = "
        f"{', '.join(map(str, depths))})"
    )
    with run:  # any error, an interrupt too, marks the run failed with the reason; re-running resumes it
        lenses: list[Any] = ["logit", "coda"]
        if tuned_lens:
            train_problems = [
                p for h in hops for p in chains.sample(chains.task_name(h), 32, split="train", seed=seed + 1)
            ]
            lenses.append(tuned_lens_for_run(net, run, prompt_template, train_problems, steps, seed))
        for h in tqdm(hops, desc="hops", unit="hop count"):
            _probe_hops(
                net, run, prompt_template, h, n, probe_n, steps, lenses, control["id"], batch_size, seed
            )
        _depth_scaling(net, run, prompt_template, hops, depths, depth_n, seed)
        figures = _render(run, steps)
    run.mark_complete()
    _summary(run, figures, steps, time.monotonic() - t0, console)
    return run


def _probe_hops(
    net: LoopedLM,
    run: Run,
    template: PromptTemplate,
    hops: int,
    n: int,
    probe_n: int,
    steps: int,
    lenses: list[Any],
    control_id: int,
    batch_size: int,
    seed: int,
) -> None:
    """Prompts, lens ranks, answers and linear probes of one number of hops (one shard each)."""
    tok = net.tokenizer
    problems = study_problems(hops, probe_n, seed)
    texts = [template.render(p.context, tok) for p in problems]
    ids = [tok.encode(t) for t in texts]
    prompt_ids = [100_000 * hops + i for i in range(len(problems))]
    if not run.has_shard("prompts", hops):
        prompts = pd.DataFrame(
            {
                "prompt_id": prompt_ids,
                "task": [p.task for p in problems],
                "context": [p.context for p in problems],
                "completion": [p.completion for p in problems],
                "intermediate": [p.intermediate for p in problems],
                "prompt_text": texts,
            }
        )
        run.write_shard("prompts", hops, prompts.assign(run=run.name))
    if not (run.has_shard("ranks", hops) and run.has_shard("answers", hops)):
        targets = value_targets(tok, template, problems[:n])
        targets["control"] = [control_id] * n
        result = probe_prompts(
            net,
            ids[:n],
            targets,
            steps,
            lenses,
            positions="last",
            topk=5,
            batch_size=batch_size,
            seed=seed * 100_003 + hops,
            prompt_ids=prompt_ids[:n],
        )
        answers = evaluate_answers(
            net,
            problems[:n],
            ids[:n],
            steps,
            seed=seed * 100_003 + hops,
            prompt_ids=prompt_ids[:n],
            texts=texts[:n],
            purpose="probe",
        )
        for table, frame in (
            ("ranks", result.ranks),
            ("topk", result.topk),
            ("dynamics", result.dynamics),
            ("verdicts", result.verdicts),
            ("answers", answers),
        ):
            run.write_shard(table, hops, frame.assign(run=run.name), replace=True)
    if not run.has_shard("linear_probes", hops):
        run.write_shard("linear_probes", hops, _linear_probes(net, problems, texts, ids, steps, seed, hops))


def _linear_probes(
    net: LoopedLM,
    problems: Sequence[chains.Problem],
    texts: Sequence[str],
    ids: Sequence[Sequence[int]],
    steps: int,
    seed: int,
    hops: int,
) -> pd.DataFrame:
    """Held-out accuracy of a probe for each chain value, at the answer position and at its statement."""
    tok = net.tokenizer
    statement = [statement_positions(tok, t, p) for t, p in zip(texts, problems, strict=True)]
    anchors = {"last": [-1] * len(problems)}
    for k in range(hops + 1):
        anchors[f"statement_{k}"] = [s[k] for s in statement]
    sites = net.layout.block_sites()
    features = collect_at_positions(net, ids, anchors, steps, sites, seed=seed * 100_003 + hops)
    frames = []
    for k in range(hops + 1):
        labels = [p.values[k] for p in problems]
        for anchor, key in (("statement", f"statement_{k}"), ("last", "last")):
            table = linear_probe(features[key], labels, seed=seed)
            frames.append(table.assign(target=f"value_{k}", anchor=anchor))
    out = pd.concat(frames, ignore_index=True)
    out["unrolled_index"] = [
        net.layout.unrolled_index(site, it, steps)
        for site, it in zip(out["site"], out["iteration"], strict=True)
    ]
    return out.assign(task=chains.task_name(hops))


def _depth_scaling(
    net: LoopedLM,
    run: Run,
    template: PromptTemplate,
    hops: Sequence[int],
    depths: Sequence[int],
    depth_n: int,
    seed: int,
) -> None:
    """Exact match of the short answer per number of hops and iterations (one shard per depth)."""
    tasks = [chains.task_name(h) for h in hops]
    for depth in tqdm(depths, desc="depth scaling", unit="depth"):
        shard = f"depth-{depth:04d}"
        if run.has_shard("answers", shard):
            continue
        frame = evaluate_tasks(
            net,
            tasks,
            depth,
            depth_n,
            seed=seed,
            template=template,
            id_offset=DEPTH_ID_OFFSET * depth,
            purpose="depth",
        )
        run.write_shard("answers", shard, frame.assign(run=run.name))


def split_answers(answers: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(answers of the probed problems, answers of the depth-scaling sample)."""
    return answers[answers["purpose"] == "probe"], answers[answers["purpose"] == "depth"]


def _render(run: Run, steps: int) -> dict[str, dict]:
    from studies.figures import CHAIN_FIGURES, Layout, render_all, render_figure

    probed, depth = split_answers(run.table("answers"))
    tables = {
        "ranks": run.table("ranks"),
        "topk": run.table("topk"),
        "answers": probed,
        "dynamics": run.table("dynamics"),
        "verdicts": run.table("verdicts"),
        "depth": accuracy_table(depth) if len(depth) else pd.DataFrame(),
        "prompts": run.table("prompts"),
        "linear_probes": run.table("linear_probes"),
    }
    layout = Layout.from_manifest(run.manifest, steps)
    title = f"{run.manifest['model']['name']} · T={steps}"
    figures = {}
    for name, spec in CHAIN_FIGURES.items():
        info = render_figure(spec, tables, layout, run.figures_dir, title)
        if info is not None:
            figures[name] = info
    only = ("rank_trajectory", "numeric_prefix", "depth_scaling", "latent_dynamics")
    figures.update(
        render_all(tables, layout, run.figures_dir, title, reference=False, only=only, strict=True)
    )
    return figures


def _summary(run: Run, figures: dict[str, dict], steps: int, seconds: float, console: Console) -> None:
    probed, depth = split_answers(run.table("answers"))
    depth_acc = accuracy_table(depth)
    probes = figures.get("chain_probes", {}).get("headline", {})
    table = Table(title=f"chains study: {run.name}", show_lines=False)
    table.add_column("hops", justify="right")
    table.add_column(f"probed T={steps}", justify="right")
    shown = sorted(depth_acc["num_steps"].unique())
    for d in shown:
        table.add_column(f"T={d}", justify="right")
    table.add_column("decodable from layer (value 0…final)")
    for h in run.manifest["settings"]["hops"]:
        task = chains.task_name(h)
        p = probed[probed["task"] == task]
        row = [str(h), f"{p['correct'].mean():.0%}" if len(p) else "–"]
        for d in shown:
            a = depth_acc[(depth_acc["task"] == task) & (depth_acc["num_steps"] == d)]
            row.append(f"{a['accuracy'].iloc[0]:.0%}" if len(a) else "–")
        row.append(str(probes.get(f"h{h}_statement_first_decodable_layers", "–")))
        table.add_row(*row)
    console.print(table)
    console.print(
        f"probed T={steps}: exact match on the problems decoded through the lenses; T=…: exact match on "
        f"a separate sample of {run.manifest['settings']['depth_n']} problems per hops and depth; "
        "decodable: first unrolled layer where a linear probe reads the value at its own statement "
        "with ≥ 80 % held-out accuracy (-1: never)"
    )
    print_run_footer(console, run, seconds, page="Trajectories")
