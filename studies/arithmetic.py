"""``looplens study arithmetic``: the latent chain-of-thought analysis on one-digit composite arithmetic.

For each problem, at the last prompt position, every unrolled layer is decoded with every lens the
model's family supports (Logit; Coda where a coda exists; optionally a Tuned Lens); the ranks of the
model's own answer token, the correct answer, the intermediate result, a control token and every
digit are recorded; answers are generated; latent dynamics (and, for exit-gated families, exit-gate
readings) are measured; accuracy is measured across depths for every task format. Everything is
written shard by shard into a run whose manifest carries the model's unrolled layout (resumable),
then the figures are drawn from the run and its manifest and a summary printed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

import lens
from lens.errors import InputError
from lens.model import LoopedLM
from lens.runtime import configure_threads
from probes.api import probe_prompts
from probes.dataset import open_model_run
from probes.lenses import TunedLens, applicable_lenses
from probes.lenses.tuned_training import collect_states, fit_tuned_lens
from probes.records import records
from probes.scale import ShardTask, init_ray, require_ray, run_shards
from probes.store import Run
from studies.console import fmt_number, print_run_footer
from studies.evaluation import accuracy_table, card_accuracy, evaluate_answers
from studies.tasks import arithmetic
from studies.tasks.prompts import PromptTemplate, resolve_template

TASK = "arithmetic_1dc"
#: The reference study's control target: ``convert_tokens_to_ids("the")``, the vocabulary entry "the"
#: without a leading space; a vocabulary without it gets the text " the" (or another word) instead.
REFERENCE_CONTROL = "the"
FALLBACK_CONTROLS = (" the", " What", " is", " plus", "Question")
#: The Tuned Lens the study trains (part of the run's identity: changing it changes the tuned ranks).
TUNED_LENS_TRAINING = {"kind": "shared", "split": "train", "prompts": 192, "epochs": 8, "lr": 3e-3}


def single_token(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` if it is exactly one token, else None."""
    ids = tokenizer.encode(text)
    return ids[0] if len(ids) == 1 else None


def problem_targets(
    tokenizer: Any, template: PromptTemplate, problem: arithmetic.Problem
) -> dict[str, int | None]:
    """Token ids tracked for one problem; None where a variant is not a single token.

    ``final``: the correct answer's first token as the template's model writes it; ``intermediate``
    and ``intermediate_alt``: the intermediate digit with and without a leading space (the reference
    took the better rank of "d" and " d"); ``digit_0..9``: every digit in the answer's spelling.
    """
    answer = template.expected_answer(problem.completion)
    spaced = answer.startswith(" ")
    out: dict[str, int | None] = {"final": tokenizer.encode(answer)[0]}
    inter = (problem.intermediate or "").strip()
    out["intermediate"] = single_token(tokenizer, " " + inter) if inter else None
    out["intermediate_alt"] = single_token(tokenizer, inter) if inter else None
    for d in range(10):
        out[f"digit_{d}"] = single_token(tokenizer, (" " if spaced else "") + str(d))
    return out


def control_token(tokenizer: Any) -> dict[str, Any]:
    """The control target, as the reference study took it where the vocabulary allows.

    The reference used ``convert_tokens_to_ids("the")``: the vocabulary entry "the" with no leading
    space (Huginn-3.5B: id 633, not " the" = 264). A vocabulary without that entry (tiny-arith's is
    word-level with " the") gets the first of ``FALLBACK_CONTROLS`` that is one token. Returns
    ``{"id", "text", "source"}``, recorded in the run's settings.
    """
    tid = tokenizer.token_to_id(REFERENCE_CONTROL)
    if tid is not None:
        return {
            "id": int(tid),
            "text": tokenizer.decode([tid]),
            "source": f"vocabulary entry {REFERENCE_CONTROL!r} (the reference study's control)",
        }
    for word in FALLBACK_CONTROLS:
        tid = single_token(tokenizer, word)
        if tid is not None:
            return {
                "id": int(tid),
                "text": word,
                "source": f"the vocabulary has no entry {REFERENCE_CONTROL!r}; {word!r} is one token",
            }
    raise InputError(
        f"the tokenizer has no control token: no vocabulary entry {REFERENCE_CONTROL!r} and none of "
        f"{list(FALLBACK_CONTROLS)} is a single token"
    )


def run_arithmetic_study(
    model: str = "tiny-arith",
    n: int = 100,
    steps: int = 16,
    batch_size: int = 25,
    seed: int = 0,
    out: Path = Path("runs"),
    name: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    template: str | None = None,
    tuned_lens: bool = True,
    depths: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    depth_n: int = 40,
    overwrite: bool = False,
    console: Console | None = None,
    ray: str | None = None,
    num_workers: int | None = None,
) -> Run:
    """Run (or resume) the study; returns the completed run.

    ``ray`` (``"local"`` or a cluster address) computes the probe batches and depth-scaling shards on
    Ray workers, one model each (see ``probes.scale``); the tables are the same as in one process.
    """
    console = console or Console()
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if n < 1 or batch_size < 1:
        raise ValueError("--n and --batch-size must be >= 1")
    if any(d < 1 for d in depths):
        raise ValueError(f"depths must be >= 1, got {list(depths)}")
    if ray is not None:
        require_ray()
    t0 = time.monotonic()
    net = lens.load_model(model, dtype=dtype, device=device)
    configure_threads(net.num_parameters(), device)
    tok = net.tokenizer
    if tok is None:
        raise ValueError(f"model {model!r} has no tokenizer.json; the study needs one to build prompts")
    prompt_template = resolve_template(template, tok)
    problems = study_problems(n, seed)
    control = control_token(tok)
    lens_names = applicable_lenses(net) + (["tuned"] if tuned_lens else [])
    # Everything the numbers depend on; a resume compares all of it (probes.store.Run.create).
    settings = {
        "study": "arithmetic",
        "task": TASK,
        "n": n,
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "positions": "last",
        "topk": 5,
        "lenses": lens_names,
        "targets": ["predicted", *problem_targets(tok, prompt_template, problems[0]), "control"],
        "control": control,
        "tuned_lens": dict(TUNED_LENS_TRAINING) if tuned_lens else None,
        "depths": list(depths),
        "depth_n": depth_n,
    }
    run_name = name or f"arithmetic-{Path(str(model)).name}-T{steps}-n{n}-s{seed}"
    computed_on = device
    if ray is not None:  # the workers compute: on their GPUs where the cluster has GPUs
        cluster = init_ray(ray)
        computed_on = "cuda" if cluster.cluster_resources().get("GPU", 0) else "cpu"
    run = open_model_run(out, run_name, model, net, computed_on, dtype, prompt_template, settings, overwrite)
    console.print(
        f"[bold]arithmetic study[/] → {run.path}  ({len(problems)} problems, T={steps}; "
        f"{net.layout.family}: {net.layout.describe()}; lenses {', '.join(settings['lenses'])})"
    )
    with run:  # any error from here on marks the run failed, with the reason, before it propagates
        figures = _probe_and_render(
            run,
            net,
            str(model),
            problems,
            prompt_template,
            control["id"],
            settings,
            dtype,
            device,
            ray,
            num_workers,
        )
        run.mark_complete()
    _summary(run, model, figures, time.monotonic() - t0, console)
    return run


def _probe_and_render(
    run: Run,
    net: LoopedLM,
    model: str,
    problems: Sequence[arithmetic.Problem],
    prompt_template: PromptTemplate,
    control_id: int,
    settings: dict[str, Any],
    dtype: torch.dtype | None,
    device: str,
    ray: str | None,
    num_workers: int | None,
) -> dict[str, dict]:
    """Every shard the run lacks (here or on Ray workers), then the figures (a figure that fails fails
    the study)."""
    tok = net.tokenizer
    steps, batch_size, seed = settings["steps"], settings["batch_size"], settings["seed"]
    depths, depth_n = settings["depths"], settings["depth_n"]
    texts = [prompt_template.render(p.context, tok) for p in problems]
    prompts_table = records(
        "prompts",
        pd.DataFrame(
            {
                "prompt_id": range(len(problems)),
                "task": TASK,
                "context": [p.context for p in problems],
                "completion": [p.completion for p in problems],
                "intermediate": [p.intermediate for p in problems],
                "prompt_text": texts,
            }
        ),
    )
    if not run.has_shard("prompts", 0):
        run.write_shard("prompts", 0, prompts_table)
    tuned = settings["tuned_lens"] is not None
    lenses: list[Any] = list(applicable_lenses(net))
    if tuned:
        lenses.append(_tuned_lens(net, run, prompt_template, steps, seed))
    spec = StudySpec(steps, seed, control_id, prompt_template, tuned, settings["positions"], settings["topk"])
    tasks = [
        ShardTask(
            f"shard-{b:05d}",
            BATCH_TABLES + (("exit_gate",) if net.layout.exit_gate else ()),
            len(problems[start : start + batch_size]),
            ("batch", start, batch_size, b),
        )
        for b, start in enumerate(range(0, len(problems), batch_size))
    ]
    tasks += [
        ShardTask(f"depth-{d:04d}", ("answers",), depth_n * len(arithmetic.TASKS), ("depth", d, depth_n))
        for d in depths
    ]
    run_shards(
        run,
        tasks,
        ArithmeticWorkerFactory(
            model,
            str(dtype).replace("torch.", "") if dtype else None,
            spec,
            settings["n"],
            str(run.path / "tuned_lens") if tuned else None,
        ),
        device=device,
        ray=ray,
        num_workers=num_workers,
        local_worker=None if ray is not None else ArithmeticWorker(net, spec, settings["n"], lenses),
        desc="arithmetic study",
        unit="problem",
    )
    return _render(run, steps)


BATCH_TABLES = ("ranks", "topk", "dynamics", "verdicts", "answers")


@dataclass(frozen=True)
class StudySpec:
    """What a worker needs besides the model to compute any shard of the study (picklable)."""

    steps: int
    seed: int
    control_id: int
    template: PromptTemplate
    tuned_lens: bool
    positions: str = "last"
    topk: int = 5


class ArithmeticWorker:
    """Computes the study's shards: a probed batch of problems, or the answers at one depth."""

    def __init__(self, net: LoopedLM, spec: StudySpec, n: int, lenses: list[Any]) -> None:
        self.net, self.spec, self.n, self.lenses = net, spec, n, lenses
        self.problems = study_problems(n, spec.seed)
        self.texts = [spec.template.render(p.context, net.tokenizer) for p in self.problems]

    def compute(self, task: ShardTask) -> dict[str, pd.DataFrame]:
        if task.payload[0] == "depth":
            return {"answers": _depth_answers(self.net, self.spec, *task.payload[1:])}
        _, start, batch_size, b = task.payload
        return _probe_batch(self.net, self.spec, self.lenses, self.problems, self.texts, start, batch_size, b)


@dataclass(frozen=True)
class ArithmeticWorkerFactory:
    """Loads the model (and the run's trained Tuned Lens) in a Ray worker."""

    model: str
    dtype: str | None
    spec: StudySpec
    n: int
    tuned_dir: str | None = None

    def __call__(self, device: str) -> ArithmeticWorker:
        net = lens.load_model(
            self.model, dtype=getattr(torch, self.dtype) if self.dtype else None, device=device
        )
        configure_threads(net.num_parameters(), device)
        lenses: list[Any] = list(applicable_lenses(net))
        if self.spec.tuned_lens:
            assert self.tuned_dir is not None
            lenses.append(TunedLens.load(self.tuned_dir, net))
        return ArithmeticWorker(net, self.spec, self.n, lenses)


def _probe_batch(
    net: LoopedLM,
    spec: StudySpec,
    lenses: list[Any],
    problems: list[arithmetic.Problem],
    texts: list[str],
    start: int,
    batch_size: int,
    b: int,
) -> dict[str, pd.DataFrame]:
    """Ranks, top-k, dynamics and answers of one batch of problems (shard ``b``)."""
    tok = net.tokenizer
    batch = problems[start : start + batch_size]
    ids = [tok.encode(t) for t in texts[start : start + batch_size]]
    per_problem = [problem_targets(tok, spec.template, p) for p in batch]
    kinds = list(per_problem[0])
    target_map = {k: [t[k] if t[k] is not None else 0 for t in per_problem] for k in kinds}
    target_map["control"] = [spec.control_id] * len(batch)
    missing = {k: [t[k] is None for t in per_problem] for k in kinds}
    result = probe_prompts(
        net,
        ids,
        target_map,
        spec.steps,
        lenses,
        positions=spec.positions,
        topk=spec.topk,
        batch_size=len(batch),
        seed=spec.seed * 100_003 + b,
        prompt_ids=list(range(start, start + len(batch))),
    )
    answers = evaluate_answers(
        net,
        batch,
        ids,
        spec.steps,
        seed=spec.seed * 100_003 + b,
        prompt_ids=range(start, start + len(batch)),
        texts=texts[start : start + len(batch)],
        purpose="probe",
    )
    tables = {
        "ranks": _drop_missing(result.ranks, missing, start),
        "topk": result.topk,
        "dynamics": result.dynamics,
        "verdicts": result.verdicts,
        "answers": answers,
    }
    if net.layout.exit_gate:
        tables["exit_gate"] = result.exit_gate
    return tables


def _depth_answers(net: LoopedLM, spec: StudySpec, depth: int, depth_n: int) -> pd.DataFrame:
    """Accuracy rows per task format at one number of iterations (the depth-scaling figure)."""
    from studies.evaluation import evaluate_tasks

    return evaluate_tasks(
        net,
        arithmetic.TASKS,
        depth,
        depth_n,
        seed=spec.seed,
        template=spec.template,
        id_offset=1_000_000
        * depth,  # prompt ids unique within the run; the purpose column says what they are
        purpose="depth",
    )


def study_problems(n: int, seed: int) -> list[arithmetic.Problem]:
    """``n`` held-out one-digit composite problems whose answer and intermediate are single digits,
    as in the reference study's filtered set (the test split: never seen in training)."""
    return arithmetic.sample(TASK, n, split="test", seed=seed, single_digit=True)


def _drop_missing(ranks: pd.DataFrame, missing: dict[str, list[bool]], start: int) -> pd.DataFrame:
    """Remove rows of target variants that are not single tokens (their id was a placeholder)."""
    drop = pd.Series(False, index=ranks.index)
    for kind, flags in missing.items():
        bad = {start + i for i, f in enumerate(flags) if f}
        if bad:
            drop |= (ranks["target_kind"] == kind) & ranks["prompt_id"].isin(bad)
    return ranks[~drop].reset_index(drop=True)


def _tuned_lens(net: LoopedLM, run: Run, template: PromptTemplate, steps: int, seed: int) -> TunedLens:
    """Train (once per run; reloaded on resume) a shared Tuned Lens on training-split prompts."""
    return tuned_lens_for_run(net, run, template, study_tuned_lens_problems(seed), steps, seed)


def study_tuned_lens_problems(seed: int = 0) -> list[arithmetic.Problem]:
    """The arithmetic problems (training split, with answers) the study's Tuned Lens is fitted on."""
    training = TUNED_LENS_TRAINING
    return arithmetic.sample(TASK, training["prompts"], split=training["split"], seed=seed + 1)


def tuned_lens_for_run(
    net: LoopedLM, run: Run, template: PromptTemplate, problems: Sequence[Any], steps: int, seed: int
) -> TunedLens:
    """A shared Tuned Lens fitted on ``problems`` (prompt + answer) once per run, reloaded on resume."""
    where = run.path / "tuned_lens"
    if (where / "tuned_lens.json").is_file():
        return TunedLens.load(where, net)
    tuned = fit_study_tuned_lens(net, template, steps, seed, problems)
    tuned.save(where)
    return tuned


def fit_study_tuned_lens(
    net: LoopedLM,
    template: PromptTemplate,
    steps: int,
    seed: int = 0,
    problems: Sequence[Any] | None = None,
) -> TunedLens:
    """The study's Tuned Lens (``TUNED_LENS_TRAINING``: shared over iterations, fitted on ``problems``,
    by default training-split arithmetic problems with their answers); the explorer trains the same one
    for its live model."""
    training = TUNED_LENS_TRAINING
    if problems is None:
        problems = study_tuned_lens_problems(seed)
    prompts = [
        net.tokenizer.encode(template.render(p.context, net.tokenizer) + p.completion) for p in problems
    ]
    data = collect_states(net, prompts, steps, net.layout.block_sites(), seed=seed)
    return fit_tuned_lens(
        net, data, training["kind"], steps, epochs=training["epochs"], lr=training["lr"], seed=seed
    )


def _render(run: Run, steps: int) -> dict[str, dict]:
    """Every figure into ``figures/``; any figure that fails to draw or to be written raises."""
    from studies.figures import Layout, render_all

    answers = run.table("answers")
    tables = {
        "ranks": run.table("ranks"),
        "topk": run.table("topk"),
        "answers": answers[(answers["purpose"] == "probe") & (answers["num_steps"] == steps)],
        "dynamics": run.table("dynamics"),
        "verdicts": run.table("verdicts"),
        "exit_gate": run.table("exit_gate"),
        "depth": accuracy_table(answers[answers["purpose"] == "depth"]),
    }
    layout = Layout.from_manifest(run.manifest, steps)
    title = f"{run.manifest['model']['name']} · T={steps}"
    return render_all(tables, layout, run.figures_dir, title, strict=True)


SUMMARY_KEYS = {
    "rank_trajectory": ("_median_rank_last_core", "_top1_share_last"),
    "numeric_prefix": ("_share_core_mean",),
    "intermediate_vs_final": ("n_correct", "_iters_intermediate_above_final"),
    "depth_scaling": ("arithmetic_1dc_best_steps",),
    "latent_dynamics": ("step_norm_median_last", "verdict_"),
    "reference_overlay": ("_median_rank_last",),
    "exit_gate": ("expected_exit_step", "threshold_exit_share_before_T"),
}


def headline_items(name: str, headline: dict[str, Any]) -> list[str]:
    """The few numbers of a figure worth a line in the one-screen summary."""
    wanted = SUMMARY_KEYS.get(name, ())
    return [
        f"{k}={fmt_number(v)}"
        for k, v in headline.items()
        if v is not None and any(k == w or k.endswith(w) or k.startswith(w) for w in wanted)
    ]


def accuracy_rows(run: Run, model: str) -> list[tuple[str, str, str]]:
    """The study's accuracies at its depth T, each named: ``(what, accuracy, on what)``.

    Three different numbers measure one thing on three samples: the probed problems (those the lenses
    decode), the depth-scaling sample (other held-out problems, ``depth_n`` of them), and the embedded
    model card (every held-out problem, ``looplens eval``).
    """
    settings = run.manifest["settings"]
    steps = settings["steps"]
    answers = run.table("answers")
    answers = answers[(answers["task"] == TASK) & (answers["num_steps"] == steps)]
    rows = []
    for purpose, what, sample in (
        ("probe", "probed problems", "the problems the lenses decode"),
        ("depth", "depth-scaling sample", "other held-out problems"),
    ):
        part = answers[answers["purpose"] == purpose]
        if len(part):
            correct = int(part["correct"].sum())
            rows.append((what, f"{correct / len(part):.1%}", f"{correct}/{len(part)} {sample}"))
    card = card_accuracy(model, TASK, steps)
    if card is not None:
        accuracy, n = card
        rows.append(("model card", f"{accuracy:.1%}", f"all {n:,} held-out problems (looplens eval)"))
    return rows


def _summary(run: Run, model: str, figures: dict[str, dict], seconds: float, console: Console) -> None:
    table = Table(title=f"arithmetic study: {run.name}", show_lines=True)
    table.add_column("figure", no_wrap=True)
    table.add_column("headline numbers")
    for name, info in figures.items():
        table.add_row(f"{name}.png", "\n".join(headline_items(name, info.get("headline") or {})))
    console.print(table)

    steps = run.manifest["settings"]["steps"]
    accuracy = Table(title=f"accuracy at T={steps} ({TASK}, exact match)", title_justify="left", box=None)
    accuracy.add_column("measured on", no_wrap=True)
    accuracy.add_column("accuracy", justify="right", no_wrap=True)
    accuracy.add_column("sample", overflow="fold")
    for row in accuracy_rows(run, model):
        accuracy.add_row(*row)
    console.print(accuracy)

    print_run_footer(console, run, seconds)
