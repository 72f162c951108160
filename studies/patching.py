"""``looplens study patching``: where across iterations the answer is decided, by activation patching.

On one-digit composite arithmetic (``(a op1 b) op2 c``), prompt pairs differ in one operand and have
different answers (both answered correctly by the model). Experiments, each a batched sweep
(:mod:`probes.patching`) written chunk by chunk into a resumable run:

``operand``           every core block × iteration × position: the clean state patched into the
                      corrupted run (denoise) and the corrupted state into the clean run (noise), plus
                      attribution patching's estimate of every cell (its agreement is measured)
``operand_reinject``  (families with an adapter) the clean input re-injected at one position from
                      iteration t to T into the corrupted run: how many iterations of the right input
                      the model needs to change its answer
``cot_other``         the latent chain-of-thought check: a donor with a *different intermediate result*
                      and a different final operation; its state at the last position (where lenses
                      decode the intermediate) patched in at iteration t. The answer can stay the
                      recipient's (``base``), follow the donor's intermediate through the recipient's
                      final operation (``follow``), or copy the donor's answer (``source``)
``cot_same``          the same with a donor that has the *same* intermediate and a different final
                      operation: a state that carries only the intermediate leaves the answer alone
``cot_reinject``      (adapter families) the donor's parenthesised sub-expression re-injected from
                      iteration t on: does the final answer follow the intermediate it implies?

Positions before the first token where the two prompts differ hold identical states in both runs
(same tokens, same initial state, causal attention), so patching them is exactly a no-op; the sweeps
skip them and the figures show them as such. The lens-based finding (the Logit and Coda Lens ranks of
the intermediate and the final answer at the last position) is measured on the same recipients and
reported beside the causal check. Figures: effect heat maps (iteration × position, per core block),
the iteration at which patching flips the answer, the exit gate's response (exit-gated families), the
chain-of-thought outcomes, attribution vs exact patching.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
from probes.lenses import applicable_lenses
from probes.patching import PromptPair, attribution_agreement, initial_states, iter_patching
from probes.store import Run, atomic_write
from studies.arithmetic import TASK, problem_targets
from studies.console import fmt_number, print_run_footer
from studies.tasks import arithmetic
from studies.tasks.prompts import PromptTemplate, resolve_template

__all__ = ["EXPERIMENTS", "OPERANDS", "cot_pairs", "operand_pairs", "run_patching_study"]

OPERANDS = ("a", "b", "c")
#: Every experiment of the study, in the order it runs (re-injections only where there is an adapter).
EXPERIMENTS = ("operand", "operand_reinject", "cot_other", "cot_same", "cot_reinject")
PAIRS_PER_SHARD = 10


@dataclass(frozen=True)
class StudyPair:
    """A prompt pair with where its prompts start to differ (earlier positions are identical states)."""

    pair: PromptPair
    pair_id: int
    first_difference: int
    clean: arithmetic.Problem
    corrupt: arithmetic.Problem


def _encode(tok: Any, template: PromptTemplate, problem: arithmetic.Problem) -> tuple[int, ...]:
    return tuple(tok.encode(template.render(problem.context, tok)))


def _answer(tok: Any, template: PromptTemplate, problem: arithmetic.Problem) -> int:
    return int(problem_targets(tok, template, problem)["final"])


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)


def _correct(
    model: LoopedLM, prompts: list[tuple[int, ...]], answers: list[int], steps: int, init: str, seed: int,
    ids: list[int],
) -> list[bool]:  # fmt: skip
    """Whether the model's top-1 token at the last position is the answer, with the sweep's own start."""
    out = []
    for length in sorted({len(p) for p in prompts}):
        members = [i for i, p in enumerate(prompts) if len(p) == length]
        x0 = initial_states(model, [length], init, seed, [ids[i] for i in members])
        with torch.no_grad():
            logits = model(
                torch.tensor([prompts[i] for i in members], device=model.device), steps, x0, logits="last"
            ).logits[:, -1]
        top = logits.argmax(-1).tolist()
        out.append({i: top[k] == answers[i] for k, i in enumerate(members)})
    merged = {k: v for part in out for k, v in part.items()}
    return [merged[i] for i in range(len(prompts))]


def operand_pairs(
    model: LoopedLM,
    template: PromptTemplate,
    n: int,
    steps: int,
    seed: int,
    init: str,
    keep_incorrect: bool = False,
) -> list[StudyPair]:
    """``n`` clean/corrupted pairs that differ in one operand (a, b, c in turn; the new digit drawn with
    ``seed``), have answers with different first tokens and prompts of one length, and are both answered
    correctly at ``steps`` iterations. Clean problems are held-out single-digit ones, as in the
    arithmetic study."""
    tok = model.tokenizer
    rng = np.random.default_rng(seed)
    try:
        pool = arithmetic.sample(TASK, min(4 * n + 40, 800), split="test", seed=seed, single_digit=True)
    except ValueError as exc:
        raise InputError(f"--n {n}: {exc}") from None
    candidates: list[StudyPair] = []
    for index, clean in enumerate(pool):
        which = index % 3
        a, b, c = clean.operands
        o1, o2 = clean.operators
        for value in rng.permutation(10).tolist():
            operands = [a, b, c]
            if value == operands[which]:
                continue
            operands[which] = value
            corrupt = arithmetic.composite(operands[0], o1, operands[1], o2, operands[2])
            ci, ki = _encode(tok, template, clean), _encode(tok, template, corrupt)
            ca, ka = _answer(tok, template, clean), _answer(tok, template, corrupt)
            if len(ci) == len(ki) and ca != ka:
                pair = PromptPair(ci, ki, ca, ka, group=OPERANDS[which])
                candidates.append(StudyPair(pair, index, _first_difference(ci, ki), clean, corrupt))
                break
        if len(candidates) >= 2 * n + 20:
            break
    kept = (
        candidates
        if keep_incorrect
        else _keep_correct(model, candidates, len(candidates), steps, seed, init, "operand", False)
    )
    by_group = {g: [c for c in kept if c.pair.group == g] for g in OPERANDS}
    balanced = [c for row in zip(*by_group.values(), strict=False) for c in row]  # a, b, c in turn
    balanced += [c for c in kept if c not in balanced]
    if len(balanced) < n:
        raise InputError(
            f"only {len(balanced)} of {len(candidates)} operand pairs are answered correctly on both sides at "
            f"T={steps}; the study needs {n} (try a smaller --n, more --steps, or --keep-incorrect)"
        )
    return sorted(balanced[:n], key=lambda c: c.pair_id)


def _keep_correct(
    model: LoopedLM, candidates: list[StudyPair], n: int, steps: int, seed: int, init: str, what: str,
    required: bool = True,
) -> list[StudyPair]:  # fmt: skip
    """The first ``n`` candidates whose prompts the model answers correctly (too few: an error if ``required``)."""
    if not candidates:
        return []
    prompts = [c.pair.clean for c in candidates] + [c.pair.corrupt for c in candidates]
    answers = [c.pair.clean_answer for c in candidates] + [c.pair.corrupt_answer for c in candidates]
    ids = [c.pair_id for c in candidates] * 2
    ok = _correct(model, prompts, answers, steps, init, seed, ids)
    m = len(candidates)
    kept = [c for i, c in enumerate(candidates) if ok[i] and ok[m + i]]
    if len(kept) < n and required:
        raise InputError(
            f"only {len(kept)} {what} pairs of {m} candidates are answered correctly on both sides at "
            f"T={steps}; the study needs {n} (try --n {len(kept)} or more iterations)"
        )
    return kept[:n]


def cot_pairs(
    model: LoopedLM, template: PromptTemplate, recipients: Sequence[arithmetic.Problem], steps: int, seed: int,
    init: str, keep_incorrect: bool = False,
) -> dict[str, list[StudyPair]]:  # fmt: skip
    """Donors for the chain-of-thought check, per recipient ``(a op1 b) op2 c``:

    ``cot_other``: a donor with a different intermediate result and a different final operation, such
    that the recipient's answer, the donor's answer and the recipient's final operation applied to the
    donor's intermediate (``follow_answer``) are three different tokens; ``cot_same``: a donor with the
    same intermediate and a different final operation (a different answer token). Donors are held-out
    problems of the prompt's length; recipient and donor are both answered correctly.
    """
    tok = model.tokenizer
    rng = np.random.default_rng(seed + 17)
    donors = list(arithmetic.enumerate_all(TASK, "test"))
    out: dict[str, list[StudyPair]] = {"cot_other": [], "cot_same": []}
    for index, r in enumerate(recipients):
        ri = _encode(tok, template, r)
        own = _answer(tok, template, r)
        order = rng.permutation(len(donors)).tolist()
        found: dict[str, StudyPair] = {}
        for j in order:
            d = donors[j]
            if (d.operators[1], d.operands[2]) == (r.operators[1], r.operands[2]):
                continue  # the final operation must differ
            kind = "cot_same" if d.intermediate == r.intermediate else "cot_other"
            if kind in found:
                continue
            di = _encode(tok, template, d)
            if len(di) != len(ri):
                continue
            theirs = _answer(tok, template, d)
            follow = None
            if kind == "cot_other":
                value = arithmetic.OPS[r.operators[1]](int(d.intermediate), r.operands[2])
                follow = int(tok.encode(template.expected_answer(f" {value}"))[0])
                if len({own, theirs, follow}) < 3:
                    continue
            elif theirs == own:
                continue
            pair = PromptPair(di, ri, theirs, own, follow_answer=follow, group=kind)
            found[kind] = StudyPair(pair, index, _first_difference(di, ri), d, r)
            if len(found) == 2:
                break
        for kind, sp in found.items():
            out[kind].append(sp)
    if keep_incorrect:
        return out
    return {
        kind: _keep_correct(model, pairs, len(pairs), steps, seed, init, kind, False)
        for kind, pairs in out.items()
    }


def _subexpression(tok: Any, template: PromptTemplate, problem: arithmetic.Problem) -> list[int]:
    """Token positions of ``(a op1 b)`` in the prompt (the part that carries the intermediate result):
    the tokens whose text overlaps it, located by decoding growing prefixes."""
    ids = _encode(tok, template, problem)
    a, b, _ = problem.operands
    inner = f"({a} {problem.operators[0]} {b})"
    text = template.render(problem.context, tok)
    start = text.index(inner)
    stop = start + len(inner)
    ends = [len(tok.decode(list(ids[: i + 1]))) for i in range(len(ids))]
    begins = [0, *ends[:-1]]
    spans = [i for i in range(len(ids)) if ends[i] > start and begins[i] < stop]
    if not spans:
        raise InputError(f"cannot find the sub-expression {inner!r} among the prompt's tokens")
    return spans


# ---------------------------------------------------------------------------------------- the study
def run_patching_study(
    model: str = "tiny-arith",
    n: int = 50,
    steps: int = 16,
    seed: int = 0,
    out: Path = Path("runs"),
    name: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    template: str | None = None,
    init_state: str = "random",
    rows_per_forward: int = 256,
    keep_incorrect: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
) -> Run:
    """Run (or resume) the patching study; returns the completed run.

    ``keep_incorrect`` keeps pairs the model answers wrongly (for weak or untrained models; the
    normalised effect then measures movement between two wrong answers)."""
    console = console or Console()
    if steps < 1 or n < 1:
        raise InputError(f"--steps and --n must be >= 1, got {steps} and {n}")
    if init_state not in ("random", "zeros"):
        raise InputError(f"--init-state must be 'random' or 'zeros', got {init_state!r}")
    t0 = time.monotonic()
    net = lens.load_model(model, dtype=dtype, device=device)
    configure_threads(net.num_parameters(), device)
    tok = net.tokenizer
    if tok is None:
        raise InputError(f"model {model!r} has no tokenizer.json; the study needs one to build prompts")
    prompt_template = resolve_template(template, tok)
    layout = net.layout
    experiments = [e for e in EXPERIMENTS if layout.adapter or not e.endswith("reinject")]
    settings = {
        "study": "patching",
        "task": TASK,
        "n": n,
        "steps": steps,
        "seed": seed,
        "init_state": init_state if layout.family != "ouro" else None,
        "experiments": experiments,
        "pairs": "held-out single-digit problems; one operand (a, b, c in turn) changed to a seeded digit; "
        "answers with different first tokens; "
        + ("every pair kept" if keep_incorrect else "both prompts answered correctly at T"),
        "positions": "from the first differing token to the last (earlier states are identical in both runs)",
        "sites": [f"core.{j}" for j in range(layout.core)],
        "cot": "donor state at the last position patched at each iteration; cot_other: different "
        "intermediate and final operation; cot_same: same intermediate, different final operation; "
        "cot_reinject: the donor's sub-expression re-injected from each iteration on",
        "lenses": applicable_lenses(net),
    }
    run_name = name or f"patching-{Path(str(model)).name}-T{steps}-n{n}-s{seed}"
    run = open_model_run(out, run_name, model, net, device, dtype, prompt_template, settings, overwrite)
    console.print(
        f"[bold]patching study[/] → {run.path}  ({n} pairs, T={steps}; {layout.family}: {layout.describe()}; "
        f"experiments {', '.join(experiments)})"
    )
    with run:
        init = settings["init_state"] or "zeros"
        pairs = operand_pairs(net, prompt_template, n, steps, seed, init, keep_incorrect)
        cot = cot_pairs(net, prompt_template, [p.clean for p in pairs], steps, seed, init, keep_incorrect)
        sweeps = _sweeps(net, prompt_template, pairs, cot, experiments)
        for experiment, chunk_id, study_pairs, kwargs in sweeps:
            _write_sweep(
                run, net, experiment, chunk_id, study_pairs, steps, init, seed, rows_per_forward, kwargs
            )
        _lens_ranks(run, net, prompt_template, cot, steps, seed)
        figures = _render(run, steps)
        agreement = attribution_agreement(run.table("patching"))
        summary = {
            "attribution_agreement": agreement,
            "headlines": {name: info.get("headline") for name, info in figures.items()},
            "pairs": {kind: len(v) for kind, v in {"operand": pairs, **cot}.items()},
        }
        atomic_write(
            run.figures_dir / "summary.json", (json.dumps(summary, indent=1, default=str) + "\n").encode()
        )
        run.mark_complete()
    _summary(run, figures, agreement, time.monotonic() - t0, console)
    return run


def _sweeps(
    net: LoopedLM,
    template: PromptTemplate,
    pairs: list[StudyPair],
    cot: dict[str, list[StudyPair]],
    experiments: list[str],
) -> list[tuple[str, str, list[StudyPair], dict[str, Any]]]:
    """Every sweep of the study, as (experiment, shard id, pairs, sweep arguments), in a fixed order."""
    out = []
    for experiment in experiments:
        if experiment.startswith("operand"):
            for operand in OPERANDS:
                group = [p for p in pairs if p.pair.group == operand]
                for chunk in range(0, len(group), PAIRS_PER_SHARD):
                    part = group[chunk : chunk + PAIRS_PER_SHARD]
                    S = len(part[0].pair.clean)
                    first = min(p.first_difference for p in part)
                    kwargs: dict[str, Any] = {"positions": list(range(first, S))}
                    if experiment == "operand":
                        kwargs.update(attribution=True)
                    else:
                        kwargs.update(kind="reinject", directions=["denoise"])
                    out.append(
                        (experiment, f"{experiment}-{operand}-{chunk // PAIRS_PER_SHARD:03d}", part, kwargs)
                    )
            continue
        source = "cot_other" if experiment == "cot_reinject" else experiment
        group = cot.get(source, [])
        for chunk in range(0, len(group), PAIRS_PER_SHARD):
            part = group[chunk : chunk + PAIRS_PER_SHARD]
            kwargs = {
                "directions": ["denoise"],
                "sites": [f"core.{net.layout.core - 1}"],
                "positions": "last",
            }
            if experiment == "cot_reinject":
                spans = {tuple(_subexpression(net.tokenizer, template, p.clean)) for p in part}
                if len(spans) != 1:  # one position set per sweep: split the chunk by span
                    raise InputError("donors of one chunk place their sub-expression at different positions")
                kwargs = {"directions": ["denoise"], "kind": "reinject", "positions": [list(spans.pop())]}
            out.append((experiment, f"{experiment}-{chunk // PAIRS_PER_SHARD:03d}", part, kwargs))
    return out


def _write_sweep(
    run: Run,
    net: LoopedLM,
    experiment: str,
    shard: str,
    pairs: list[StudyPair],
    steps: int,
    init: str,
    seed: int,
    rows_per_forward: int,
    kwargs: dict[str, Any],
) -> None:
    if run.has_shard("patching", shard) and run.has_shard("patch_pairs", shard):
        return
    (pair_rows, rows) = next(
        iter_patching(
            net,
            [p.pair for p in pairs],
            steps,
            experiment=experiment,
            pair_ids=[p.pair_id for p in pairs],
            init_state=init,
            seed=seed,
            rows_per_forward=rows_per_forward,
            pairs_per_chunk=len(pairs),
            progress=True,
            **kwargs,
        )
    )
    run.write_shard("patching", shard, rows.assign(run=run.name), replace=True)
    run.write_shard("patch_pairs", shard, pair_rows.assign(run=run.name), replace=True)


def _lens_ranks(
    run: Run, net: LoopedLM, template: PromptTemplate, cot: dict[str, list[StudyPair]], steps: int, seed: int
) -> None:
    """The lens-based finding on the chain-of-thought recipients: ranks of the intermediate and the final
    answer at the last position, every lens that applies (written as the ``ranks`` table)."""
    if run.has_shard("ranks", "cot-recipients"):
        return
    recipients = {p.pair_id: p.corrupt for kind in ("cot_other", "cot_same") for p in cot.get(kind, [])}
    if not recipients:
        return
    ids = sorted(recipients)
    problems = [recipients[i] for i in ids]
    targets = [problem_targets(net.tokenizer, template, p) for p in problems]
    kinds = ["final", "intermediate", "intermediate_alt"]
    target_map = {k: [t[k] if t[k] is not None else 0 for t in targets] for k in kinds}
    result = probe_prompts(
        net,
        [list(_encode(net.tokenizer, template, p)) for p in problems],
        target_map,
        steps,
        applicable_lenses(net),
        prompt_ids=ids,
        seed=seed,
        dynamics=False,
        predicted_target=None,
    )
    ranks = result.ranks
    for k in kinds:  # drop placeholders of variants that are not one token
        bad = {ids[i] for i, t in enumerate(targets) if t[k] is None}
        ranks = ranks[~((ranks["target_kind"] == k) & ranks["prompt_id"].isin(bad))]
    run.write_shard("ranks", "cot-recipients", ranks.assign(run=run.name), replace=True)


# ---------------------------------------------------------------------------------------- figures
def _render(run: Run, steps: int) -> dict[str, dict]:
    from studies.figures import Layout, render_all
    from studies.figures.patching import PATCHING_FIGURES

    ranks = run.table("ranks")
    tables = {
        "patching": run.table("patching"),
        "patch_pairs": run.table("patch_pairs"),
        "ranks": ranks,
        # the recipients were chosen answered correctly: the lens figure keeps every one of them
        "answers": pd.DataFrame({"prompt_id": sorted(set(ranks["prompt_id"])), "correct": True}),
    }
    layout = Layout.from_manifest(run.manifest, steps)
    title = f"{run.manifest['model']['name']} · T={steps}"
    only = [*PATCHING_FIGURES, "intermediate_vs_final"]
    return render_all(tables, layout, run.figures_dir, title, reference=False, only=only, strict=True)


def _summary(
    run: Run, figures: dict[str, dict], agreement: dict[str, Any], seconds: float, console: Console
) -> None:
    table = Table(title=f"patching study: {run.name}", show_lines=True)
    table.add_column("figure", no_wrap=True)
    table.add_column("headline numbers")
    for name, info in figures.items():
        items = [f"{k}={fmt_number(v)}" for k, v in (info.get("headline") or {}).items() if v is not None]
        table.add_row(f"{name}.png", "\n".join(items))
    console.print(table)
    if agreement:
        by = ", ".join(f"{d} {fmt_number(v)}" for d, v in agreement["rho_by_direction"].items())
        console.print(
            f"attribution patching vs exact patching (Spearman ρ of the effect): "
            f"{fmt_number(agreement['rho_cells'])} over {agreement['cells']:,} cells, "
            f"{fmt_number(agreement['rho_heatmap'])} over the mean heat maps; by direction: {by}"
        )
    cot = (figures.get("cot_patching") or {}).get("headline") or {}
    lens_line = (figures.get("intermediate_vs_final") or {}).get("headline") or {}
    if cot:
        console.print(f"latent chain of thought, causal: {cot.get('finding', '')}")
    if lens_line:
        above = {k: v for k, v in lens_line.items() if k.endswith("iters_intermediate_above_final")}
        console.print(
            "latent chain of thought, lenses: the intermediate result ranks above the final answer in "
            + ", ".join(f"{k.split('_')[0]} {v} iteration(s)" for k, v in above.items())
        )
    print_run_footer(console, run, seconds, page="Patching")
