"""``looplens study arithmetic``: the latent chain-of-thought analysis on one-digit composite arithmetic.

For each problem, at the last prompt position, every unrolled layer is decoded with the Logit, Coda
(and optionally Tuned) Lens; the ranks of the model's own answer token, the correct answer, the
intermediate result, a control token and every digit are recorded; answers are generated; latent
dynamics are measured; accuracy is measured across depths for every task format. Everything is
written shard by shard into a run (resumable), then the figures are drawn and a summary printed.
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
from lens.model import RecurrentDepthLM
from lens.runtime import configure_threads
from probes.api import probe_prompts
from probes.lenses import TunedLens
from probes.lenses.tuned_training import collect_states, fit_tuned_lens
from probes.store import Run
from studies.evaluation import accuracy_table, evaluate_answers
from studies.tasks import arithmetic
from studies.tasks.prompts import PromptTemplate, resolve_template

TASK = "arithmetic_1dc"
CONTROL_WORD = " the"


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


def control_token(tokenizer: Any) -> tuple[int, str]:
    """ " the" as the reference study used; models whose vocabulary lacks it get their first word token."""
    tid = single_token(tokenizer, CONTROL_WORD)
    if tid >= 0:
        return tid, CONTROL_WORD
    for word in (" What", " is", " plus", "Question"):
        tid = single_token(tokenizer, word)
        if tid >= 0:
            return tid, word
    raise ValueError("the tokenizer has no single-token control word")


def model_description(name: str, model: RecurrentDepthLM, device: str, dtype: torch.dtype | None) -> dict:
    return {
        "name": str(name),
        "config_name": model.config.name,
        "weights": lens.loading.weights_fingerprint(name),
        "parameters": model.num_parameters(),
        "dtype": str(dtype or model.dtype).replace("torch.", ""),
        "device": device,
        "layout": {"prelude": model.layout.prelude, "core": model.layout.core, "coda": model.layout.coda},
    }


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
) -> Run:
    """Run (or resume) the study; returns the completed run."""
    console = console or Console()
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if n < 1 or batch_size < 1:
        raise ValueError("--n and --batch-size must be >= 1")
    if any(d < 1 for d in depths):
        raise ValueError(f"depths must be >= 1, got {list(depths)}")
    t0 = time.monotonic()
    net = lens.load_model(model, dtype=dtype, device=device)
    configure_threads(net.num_parameters(), device)
    tok = net.tokenizer
    if tok is None:
        raise ValueError(f"model {model!r} has no tokenizer.json; the study needs one to build prompts")
    prompt_template = resolve_template(template, tok)
    problems = study_problems(n, seed)
    control_id, control_word = control_token(tok)
    settings = {
        "study": "arithmetic",
        "task": TASK,
        "n": n,
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "tuned_lens": tuned_lens,
        "depths": list(depths),
        "depth_n": depth_n,
        "control": control_word,
        "lenses": ["logit", "coda"] + (["tuned"] if tuned_lens else []),
    }
    run_name = name or f"arithmetic-{Path(str(model)).name}-T{steps}-n{n}-s{seed}"
    manifest = {
        "model": model_description(model, net, device, dtype),
        "config": net.config.to_dict(),
        "prompt_template": prompt_template.to_dict(),
        "settings": settings,
    }
    run = Run.create(out, run_name, manifest, resume=not overwrite, overwrite=overwrite)
    console.print(f"[bold]arithmetic study[/] → {run.path}  ({len(problems)} problems, T={steps})")

    lenses: list[Any] = ["logit", "coda"]
    if tuned_lens:
        lenses.append(_tuned_lens(net, run, prompt_template, steps, seed))

    texts = [prompt_template.render(p.context, tok) for p in problems]
    prompts_table = pd.DataFrame(
        {
            "prompt_id": range(len(problems)),
            "task": TASK,
            "context": [p.context for p in problems],
            "completion": [p.completion for p in problems],
            "intermediate": [p.intermediate for p in problems],
            "prompt_text": texts,
        }
    )
    if not run.has_shard("prompts", 0):
        run.write_shard("prompts", 0, prompts_table.assign(run=run.name))
    batches = list(range(0, len(problems), batch_size))
    for b, start in enumerate(tqdm(batches, desc="probe batches", unit="batch")):
        if run.has_shard("ranks", b) and run.has_shard("answers", b):
            continue
        batch = problems[start : start + batch_size]
        ids = [tok.encode(t) for t in texts[start : start + batch_size]]
        per_problem = [problem_targets(tok, prompt_template, p) for p in batch]
        kinds = list(per_problem[0])
        target_map = {k: [t[k] if t[k] is not None else 0 for t in per_problem] for k in kinds}
        target_map["control"] = [control_id] * len(batch)
        missing = {k: [t[k] is None for t in per_problem] for k in kinds}
        result = probe_prompts(
            net,
            ids,
            target_map,
            steps,
            lenses,
            positions="last",
            topk=5,
            batch_size=len(batch),
            seed=seed * 100_003 + b,
            prompt_ids=list(range(start, start + len(batch))),
        )
        ranks = _drop_missing(result.ranks, missing, start)
        answers = evaluate_answers(
            net,
            batch,
            ids,
            steps,
            seed=seed * 100_003 + b,
            prompt_ids=range(start, start + len(batch)),
            texts=texts[start : start + len(batch)],
        )
        run.write_shard("ranks", b, ranks.assign(run=run.name), replace=True)
        run.write_shard("topk", b, result.topk.assign(run=run.name), replace=True)
        run.write_shard("dynamics", b, result.dynamics.assign(run=run.name), replace=True)
        run.write_shard("verdicts", b, result.verdicts.assign(run=run.name), replace=True)
        run.write_shard("answers", b, answers.assign(run=run.name), replace=True)

    _depth_scaling(net, run, prompt_template, depths, depth_n, seed)
    figures = _render(run, net, steps)
    run.mark_complete()
    _summary(run, figures, time.monotonic() - t0, console)
    return run


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


def _tuned_lens(
    net: RecurrentDepthLM, run: Run, template: PromptTemplate, steps: int, seed: int
) -> TunedLens:
    """Train (once per run; reloaded on resume) a shared Tuned Lens on training-split prompts."""
    problems = arithmetic.sample(TASK, 192, split="train", seed=seed + 1)
    return tuned_lens_for_run(net, run, template, problems, steps, seed)


def tuned_lens_for_run(
    net: RecurrentDepthLM, run: Run, template: PromptTemplate, problems: Sequence[Any], steps: int, seed: int
) -> TunedLens:
    """A shared Tuned Lens fitted on ``problems`` (prompt + answer) once per run, reloaded on resume."""
    where = run.path / "tuned_lens"
    if (where / "tuned_lens.json").is_file():
        return TunedLens.load(where, net)
    prompts = [
        net.tokenizer.encode(template.render(p.context, net.tokenizer) + p.completion) for p in problems
    ]
    data = collect_states(net, prompts, steps, net.layout.block_sites(), seed=seed)
    tuned = fit_tuned_lens(net, data, "shared", steps, epochs=8, lr=3e-3, seed=seed)
    tuned.save(where)
    return tuned


def _depth_scaling(
    net: RecurrentDepthLM, run: Run, template: PromptTemplate, depths: Sequence[int], depth_n: int, seed: int
) -> None:
    """Accuracy per task format and number of iterations (shards keyed by depth)."""
    from studies.evaluation import evaluate_tasks

    for depth in tqdm(depths, desc="depth scaling", unit="depth"):
        shard = f"depth-{depth:04d}"
        if run.has_shard("answers", shard):
            continue
        frame = evaluate_tasks(
            net, arithmetic.TASKS, depth, depth_n, seed=seed, template=template, id_offset=1_000_000 * depth
        )
        run.write_shard("answers", shard, frame.assign(run=run.name))


def _render(run: Run, net: RecurrentDepthLM, steps: int) -> dict[str, dict]:
    from studies.figures import Layout, render_all

    answers = run.table("answers")
    tables = {
        "ranks": run.table("ranks"),
        "topk": run.table("topk"),
        "answers": answers[answers["num_steps"] == steps] if len(answers) else answers,
        "dynamics": run.table("dynamics"),
        "verdicts": run.table("verdicts"),
        "depth": accuracy_table(answers[answers["prompt_id"] >= 1_000_000])
        if len(answers)
        else pd.DataFrame(),
    }
    layout = Layout(prelude=net.layout.prelude, core=net.layout.core, coda=net.layout.coda, steps=steps)
    title = f"{run.manifest['model']['name']} · T={steps}"
    return render_all(tables, layout, run.figures_dir, title)


SUMMARY_KEYS = {
    "rank_trajectory": ("_median_rank_last_core", "_top1_share_last"),
    "numeric_prefix": ("_share_core_mean",),
    "intermediate_vs_final": ("n_correct", "_iters_intermediate_above_final"),
    "depth_scaling": ("arithmetic_1dc_accuracy_T", "arithmetic_1dc_best_steps"),
    "latent_dynamics": ("step_norm_median_last", "verdict_"),
    "reference_overlay": ("_median_rank_last",),
}


def headline_items(name: str, headline: dict[str, Any]) -> list[str]:
    """The few numbers of a figure worth a line in the one-screen summary."""
    wanted = SUMMARY_KEYS.get(name, ())
    return [
        f"{k}={_fmt(v)}"
        for k, v in headline.items()
        if v is not None and any(k == w or k.endswith(w) or k.startswith(w) for w in wanted)
    ]


def _summary(run: Run, figures: dict[str, dict], seconds: float, console: Console) -> None:
    table = Table(title=f"arithmetic study: {run.name}", show_lines=True)
    table.add_column("figure", no_wrap=True)
    table.add_column("headline numbers")
    for name, info in figures.items():
        table.add_row(f"{name}.png", "\n".join(headline_items(name, info.get("headline") or {})))
    console.print(table)
    answers = run.table("answers")
    steps = run.manifest["settings"]["steps"]
    probed = answers[
        (answers["task"] == TASK) & (answers["prompt_id"] < 1_000_000) & (answers["num_steps"] == steps)
    ]
    if len(probed):
        console.print(
            f"accuracy on the probed problems at T={steps}: {probed['correct'].mean():.1%} "
            f"({int(probed['correct'].sum())}/{len(probed)})"
        )
    console.print(f"figures (PNG + interactive HTML): {run.figures_dir}")
    console.print(
        f"tables: {', '.join(run.tables())}  ·  explore: looplens explore {run.path.parent}  ·  "
        f"time: {seconds:.0f} s"
    )


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
