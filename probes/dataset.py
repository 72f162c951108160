"""``probe_dataset``: your own prompts, at any scale, into a run the explorer opens.

Prompts come from a file (JSONL, JSON, CSV, Parquet), a saved Hugging Face dataset or a list
(``probes.inputs``). Everything that can be wrong with the input — an unreadable file, no prompt
column, a target that tokenises to nothing or is not in the vocabulary, an unknown lens or site — is
checked before any work starts and raised as one :class:`~lens.errors.InputError`. A prompt longer
than the model's context (or without a requested position) is not an input error: it is recorded in
the run's ``prompt_meta`` table with the reason, and the rest are probed.

The prompts are cut into shards of ``shard_size``; each shard writes its rows of ``prompts``,
``prompt_meta``, ``ranks``, ``topk``, ``dynamics`` and ``verdicts``, so a long probe never holds more
than one shard's records, resumes where it stopped, and runs shard by shard on a Ray cluster
(``ray="local"`` or an address; see ``probes.scale``) with exactly the same tables. Each shard seeds its
own random initial states from ``(seed, shard)``, so where a shard runs does not change its numbers.

Example:
    >>> import tempfile
    >>> run = probe_dataset(["Question: What is 2 plus 3?\\nAnswer:"], "tiny-arith", out=tempfile.mkdtemp(),
    ...                     num_steps=8, progress=False)
    >>> run.status, int(run.query("SELECT count(DISTINCT prompt_id) AS n FROM ranks")["n"].item())
    ('complete', 1)
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import lens
from lens.errors import InputError, LooplensError
from lens.exit_criteria import DEFAULT_THRESHOLDS, ExitCriterion
from lens.loading import resolve_dtype
from lens.model import LoopedLM
from lens.runtime import configure_threads
from probes.api import probe_prompts
from probes.batching import select_positions
from probes.inputs import PromptSet, read_prompts
from probes.lenses import LENSES, Lens, TunedLens, make_lens
from probes.scale import ShardTask, init_ray, require_ray, run_shards
from probes.store import Run

__all__ = ["ProbeSettings", "last_position_sql", "model_description", "probe_dataset", "probe_summary"]

TABLES = ("prompts", "prompt_meta", "ranks", "topk", "dynamics", "verdicts")
PREDICTED = "predicted"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]+")


@dataclass(frozen=True)
class ProbeSettings:
    """Everything that changes a probe's numbers (recorded in the manifest; a resume must match)."""

    lenses: tuple[str, ...] = ("logit", "coda")
    sites: tuple[str, ...] | None = None
    positions: str | tuple[int, ...] = "last"
    num_steps: int = 16
    exit_criterion: str | None = None
    exit_threshold: float | None = None
    topk: int = 5
    batch_size: int = 16
    shard_size: int = 256
    seed: int = 0
    init_state: str | None = None
    dynamics: bool = True
    chat: bool = False
    system: str | None = None


@dataclass(frozen=True)
class PromptJob:
    """One prompt as a worker gets it: tokens and target ids, or the reason it is skipped."""

    prompt_id: int
    context: str
    prompt_text: str
    tokens: tuple[int, ...]
    target_ids: tuple[tuple[str, int], ...]
    targets_json: str | None
    metadata_json: str | None
    task: str
    completion: str
    error: str | None = None


# ---------------------------------------------------------------------------------------------- lenses


def build_lenses(model: LoopedLM, specs: Sequence[str]) -> list[Lens]:
    """``"logit"``, ``"coda"`` or ``"tuned=DIR"`` (a Tuned Lens saved by ``TunedLens.save``)."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise InputError("choose at least one lens (logit, coda, tuned=DIR)")
    built: list[Lens] = []
    for spec in specs:
        if not isinstance(spec, str):
            raise InputError(f"a lens is given by name (logit, coda, tuned=DIR), not {spec!r}")
        if spec in LENSES:
            built.append(make_lens(model, spec))
            continue
        if spec.startswith("tuned="):
            where = Path(spec.split("=", 1)[1])
            if not (where / "tuned_lens.json").is_file():
                raise InputError(f"lens {spec!r}: {where} holds no saved Tuned Lens (tuned_lens.json)")
            try:
                built.append(TunedLens.load(where, model))
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise InputError(f"lens {spec!r}: cannot load the Tuned Lens in {where}: {exc}") from exc
            continue
        raise InputError(f"unknown lens {spec!r}; lenses are {', '.join(sorted(LENSES))} and tuned=DIR")
    names = [lens.name for lens in built]
    if len(set(names)) != len(names):
        raise InputError(f"each lens may be given once, got {list(specs)}")
    return built


# ---------------------------------------------------------------------------------------------- workers


class ProbeWorker:
    """Probes the prompts of one shard task with a loaded model (one per process or Ray actor)."""

    def __init__(self, model: LoopedLM, settings: ProbeSettings) -> None:
        self.model = model
        self.settings = settings
        self.lenses = build_lenses(model, settings.lenses)

    def compute(self, task: ShardTask) -> dict[str, pd.DataFrame]:
        jobs: list[PromptJob] = task.payload
        shard_index = int(task.shard.rsplit("-", 1)[1])
        s = self.settings
        prompts = pd.DataFrame(
            {
                "prompt_id": [j.prompt_id for j in jobs],
                "task": [j.task for j in jobs],
                "context": [j.context for j in jobs],
                "completion": [j.completion for j in jobs],
                "intermediate": [None] * len(jobs),
                "prompt_text": [j.prompt_text for j in jobs],
            }
        )
        meta = pd.DataFrame(
            {
                "prompt_id": [j.prompt_id for j in jobs],
                "n_tokens": [len(j.tokens) for j in jobs],
                "steps_used": pd.array([None] * len(jobs), dtype="Int32"),
                "error": [j.error for j in jobs],
                "targets": [j.targets_json for j in jobs],
                "metadata": [j.metadata_json for j in jobs],
            }
        )
        out: dict[str, pd.DataFrame] = {"prompts": prompts, "prompt_meta": meta}
        ok = sorted((j for j in jobs if j.error is None), key=lambda j: len(j.tokens))  # less padding
        if not ok:
            return out
        kinds = list(dict.fromkeys(kind for j in ok for kind, _ in j.target_ids))
        given = [dict(j.target_ids) for j in ok]
        targets = {kind: [g.get(kind, 0) for g in given] for kind in kinds}
        result = probe_prompts(
            self.model,
            [list(j.tokens) for j in ok],
            targets,
            s.num_steps,
            self.lenses,
            positions=list(s.positions) if isinstance(s.positions, tuple) else s.positions,  # type: ignore[arg-type]
            sites=list(s.sites) if s.sites is not None else None,
            topk=s.topk,
            batch_size=s.batch_size,
            init_state=s.init_state,  # type: ignore[arg-type]  # checked: None, "random" or "zeros"
            seed=s.seed * 1_000_003 + shard_index,
            dynamics=s.dynamics,
            prompt_ids=[j.prompt_id for j in ok],
            predicted_target=PREDICTED,
            exit_criterion=ExitCriterion(s.exit_criterion, s.exit_threshold) if s.exit_criterion else None,
        )
        ranks = result.ranks
        missing = [
            (j.prompt_id, kind) for j, g in zip(ok, given, strict=True) for kind in kinds if kind not in g
        ]
        if missing and len(ranks):  # a kind some prompts do not have: drop its placeholder rows
            drop = pd.MultiIndex.from_tuples(missing)
            ranks = ranks[~pd.MultiIndex.from_arrays([ranks["prompt_id"], ranks["target_kind"]]).isin(drop)]
        out["ranks"] = ranks.reset_index(drop=True)
        out["topk"] = result.topk
        if s.dynamics:
            out["dynamics"] = result.dynamics
            out["verdicts"] = result.verdicts
        used = dict(zip((j.prompt_id for j in ok), result.steps_used, strict=True))
        meta["steps_used"] = pd.array([used.get(pid) for pid in meta["prompt_id"]], dtype="Int32")
        return out


@dataclass(frozen=True)
class ProbeWorkerFactory:
    """Builds a :class:`ProbeWorker` in a worker process: loads the model there (picklable)."""

    model: str
    dtype: str | None
    settings: ProbeSettings

    def __call__(self, device: str) -> ProbeWorker:
        dtype = getattr(torch, self.dtype) if self.dtype else None
        net = lens.load_model(self.model, dtype=dtype, device=device)
        configure_threads(net.num_parameters(), device)
        return ProbeWorker(net, self.settings)


# ---------------------------------------------------------------------------------------------- the run


def model_description(name: str, model: LoopedLM, device: str, dtype: torch.dtype | None) -> dict:
    """What a run records about its model: name, weights fingerprint, size, dtype, device class, layout."""
    try:
        weights = lens.loading.weights_fingerprint(name)
    except (FileNotFoundError, ValueError):
        weights = None
    return {
        "name": str(name),
        "config_name": model.config.name,
        "weights": weights,
        "parameters": model.num_parameters(),
        "dtype": str(dtype or model.dtype).replace("torch.", ""),
        "device": torch.device(device).type,  # the class (cpu, cuda): cuda:0 and cuda:1 compute alike
        "family": model.layout.family,
        "layout": model.layout.to_dict(),
    }


def open_model_run(
    out: Path,
    name: str,
    model_name: str,
    model: LoopedLM,
    device: str,
    dtype: torch.dtype | None,
    prompt_template: Any,
    settings: Mapping[str, Any],
    overwrite: bool = False,
) -> Run:
    """Create (or resume) a study's run whose manifest holds everything its numbers depend on: the
    model (:func:`model_description`), its config, the prompt template and the settings. A resume
    compares all of it (``probes.store.Run.create``)."""
    manifest = {
        "model": model_description(model_name, model, device, dtype),
        "config": model.config.to_dict(),
        "prompt_template": prompt_template.to_dict(),
        "settings": dict(settings),
    }
    return Run.create(out, name, manifest, resume=not overwrite, overwrite=overwrite)


def _positions(positions: Any) -> str | tuple[int, ...]:
    if isinstance(positions, str):
        if positions not in ("last", "all"):
            raise InputError(f"positions must be 'last', 'all' or a list of ints, got {positions!r}")
        return positions
    try:
        out = tuple(int(p) for p in positions)
    except (TypeError, ValueError) as exc:
        raise InputError(f"positions must be 'last', 'all' or a list of ints, got {positions!r}") from exc
    if not out:
        raise InputError("positions=[] selects no token; give at least one position, 'last' or 'all'")
    return out


def _check_settings(model: LoopedLM, settings: ProbeSettings) -> None:
    """Every setting checked against the model before any work (one clear error)."""
    s = settings
    build_lenses(model, s.lenses)
    for site in s.sites or ():
        if site not in ("prelude", "core", "coda"):
            try:
                model.layout.parse(site)
            except ValueError as exc:
                raise InputError(str(exc)) from exc
    for name, value, low in (("num_steps", s.num_steps, 1), ("batch_size", s.batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(s.shard_size, bool) or not isinstance(s.shard_size, int) or s.shard_size < 1:
        raise InputError(f"shard_size must be an integer >= 1, got {s.shard_size!r}")
    if not 0 <= s.topk <= 10:
        raise InputError(f"topk must be between 0 and 10, got {s.topk}")
    if s.exit_criterion is not None and s.exit_criterion not in DEFAULT_THRESHOLDS:
        raise InputError(
            f"unknown exit criterion {s.exit_criterion!r}; choose from {sorted(DEFAULT_THRESHOLDS)}"
        )
    if s.init_state not in (None, "random", "zeros"):
        raise InputError(f"init_state must be 'random' or 'zeros', got {s.init_state!r}")
    if s.chat and (model.tokenizer is None or not model.tokenizer.has_chat_template):
        raise InputError("chat=True needs a model whose tokenizer has a chat template; this one has none")


def _render(model: LoopedLM, text: str, settings: ProbeSettings) -> str:
    if not settings.chat:
        return text
    turns = [{"role": "system", "content": settings.system}] if settings.system else []
    turns.append({"role": "user", "content": text})
    return model.tokenizer.apply_chat_template(turns, add_generation_prompt=True)


def _prepare(model: LoopedLM, data: PromptSet, settings: ProbeSettings) -> list[PromptJob]:
    """Tokenise prompts and targets; bad targets raise, prompts the model cannot take get an error."""
    tok = model.tokenizer
    if tok is None:
        raise InputError("the model has no tokenizer.json; looplens probe needs one to read text prompts")
    vocab = int(model.config.padded_vocab_size or model.config.vocab_size)
    limit = model.config.block_size
    jobs = []
    text_ids: dict[str, int] = {}
    for i, text in enumerate(data.texts):
        ids: dict[str, int] = {}
        for kind, value in data.targets[i].items():
            if isinstance(value, int):
                if not 0 <= value < vocab:
                    raise InputError(
                        f"{data.source}, row {i}: target {kind!r} is token id {value}, outside the "
                        f"vocabulary [0, {vocab})"
                    )
                ids[kind] = value
                continue
            if value not in text_ids:
                encoded = tok.encode(value)
                if not encoded:
                    raise InputError(
                        f"{data.source}, row {i}: target {kind!r} = {value!r} tokenises to nothing"
                    )
                text_ids[value] = encoded[0]
            ids[kind] = text_ids[value]
        prompt_text = _render(model, text, settings)
        tokens = tok.encode(prompt_text)
        error = None
        if not tokens:
            error = "the prompt tokenises to nothing"
        elif len(tokens) > limit:
            error = f"the prompt has {len(tokens)} tokens, longer than the model's context ({limit} tokens)"
        elif isinstance(settings.positions, tuple):
            try:
                select_positions(list(settings.positions), None, 1, len(tokens))
            except IndexError:
                error = (
                    f"the prompt has {len(tokens)} tokens, too few for positions {list(settings.positions)}"
                )
        single = data.targets[i].get("target")
        jobs.append(
            PromptJob(
                prompt_id=i,
                context=text,
                prompt_text=prompt_text,
                tokens=tuple(tokens),
                target_ids=tuple(ids.items()),
                targets_json=json.dumps(data.targets[i], ensure_ascii=False) if data.targets[i] else None,
                metadata_json=json.dumps(data.metadata[i], ensure_ascii=False) if data.metadata[i] else None,
                task=str(data.metadata[i].get("task", data.source)),
                completion=single if isinstance(single, str) else "",
                error=error,
            )
        )
    return jobs


def _fingerprint(model: LoopedLM) -> str:
    import hashlib

    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def probe_dataset(
    prompts: str | Path | Sequence[str] | Sequence[Mapping[str, Any]] | pd.DataFrame,
    model: str | LoopedLM = "tiny-arith",
    *,
    out: str | Path = "runs",
    name: str | None = None,
    lenses: Sequence[str] = ("logit", "coda"),
    sites: Sequence[str] | None = None,
    positions: str | Sequence[int] = "last",
    num_steps: int | None = None,
    exit_criterion: str | None = None,
    exit_threshold: float | None = None,
    chat: bool = False,
    system: str | None = None,
    topk: int = 5,
    batch_size: int = 16,
    shard_size: int = 256,
    seed: int = 0,
    init_state: str | None = None,
    dynamics: bool = True,
    prompt_column: str = "prompt",
    split: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    ray: str | None = None,
    num_workers: int | None = None,
    cpus_per_worker: float = 1,
    overwrite: bool = False,
    progress: bool = True,
    figures: Callable[[Run], Mapping[str, Any]] | None = None,
) -> Run:
    """Probe every prompt of ``prompts`` and return the completed run (resuming it if it exists).

    ``lenses``: ``"logit"``, ``"coda"``, ``"tuned=DIR"``; ``sites``: default every block output plus
    ``latent`` and ``final``; ``positions``: ``"last"``, ``"all"`` or a list counted within each
    prompt's own tokens; ``num_steps``: iterations (default: the model's mean recurrence), the cap when
    ``exit_criterion`` (``"kl"``, ``"cosine"``, …) gives adaptive depth; ``chat``: wrap each prompt as a
    user turn of the model's chat template (with ``system``). The model's own next token is always a
    target (kind ``"predicted"``), given targets are tracked beside it, and the ``topk`` best tokens
    of every lens are kept. ``ray``: ``"local"`` or a cluster address runs the shards on Ray workers
    (``num_workers``, default one per GPU or per CPU); a local cluster started here stays up for later
    calls in this process (``ray.shutdown()`` stops it). ``figures``: a function drawing the run's
    figures, such as ``studies.figures.runs.render_probe_figures`` (the standard figures that apply to
    any probe; ``looplens probe`` passes it: figures sit above this package); a ``summary.json`` is
    always written.
    """
    t0 = time.monotonic()
    data = read_prompts(prompts, prompt_column, split)
    torch_dtype = resolve_dtype(dtype)
    dtype_name = str(torch_dtype).replace("torch.", "") if torch_dtype is not None else None
    if ray is not None:
        require_ray()  # a missing extra is an input error too: before the model is loaded
        if not isinstance(model, str | Path):
            raise InputError("on Ray, pass the model's name or checkpoint directory (each worker loads it)")
    if isinstance(model, str | Path):
        model_name = str(model)
        # the driver only tokenises and checks; on Ray the workers hold the weights
        net = lens.load_model(model_name, dtype=torch_dtype, device="meta" if ray is not None else device)
    else:
        net, model_name = model, model.config.name
    settings = ProbeSettings(
        lenses=tuple(lenses) if not isinstance(lenses, str) else (lenses,),
        sites=tuple(sites) if sites is not None else None,
        positions=_positions(positions),
        num_steps=int(num_steps) if num_steps is not None else net.config.mean_recurrence,
        exit_criterion=exit_criterion,
        exit_threshold=exit_threshold,
        topk=topk,
        batch_size=batch_size,
        shard_size=shard_size,
        seed=seed,
        init_state=init_state,
        dynamics=dynamics,
        chat=chat,
        system=system if chat else None,
    )
    _check_settings(net, settings)
    jobs = _prepare(net, data, settings)

    device_class = torch.device(device).type
    if ray is not None:  # every input is checked: now start (or join) the cluster
        cluster = init_ray(ray)
        device_class = "cuda" if cluster.cluster_resources().get("GPU", 0) else "cpu"
    description = model_description(model_name, net, device_class, torch_dtype)
    if not isinstance(model, str | Path):
        description["weights"] = _fingerprint(net)

    run_name = name or _UNSAFE.sub(
        "-", f"probe-{data.source}-{Path(model_name).name}-T{settings.num_steps}-s{seed}"
    )
    manifest = {
        "model": description,
        "config": net.config.to_dict(),
        "prompt_template": {
            "name": "chat" if chat else "verbatim",
            "kind": "chat" if chat else "plain",
            "system": settings.system,
        },
        "settings": {
            "study": "probe",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
            "input": {
                "source": data.source,
                "rows": len(data),
                "fingerprint": data.fingerprint,
                "prompt_column": prompt_column,
            },
        },
    }
    try:
        run = Run.create(
            out, run_name[:120].strip("-.") or "probe", manifest, resume=not overwrite, overwrite=overwrite
        )
    except (ValueError, FileExistsError, NotADirectoryError) as exc:  # a bad name, a folder that is no run
        if isinstance(exc, LooplensError):
            raise
        raise InputError(str(exc)) from exc
    with run:
        tasks = [
            ShardTask(f"shard-{k:05d}", TABLES, len(chunk), chunk)
            for k, chunk in enumerate(
                jobs[i : i + settings.shard_size] for i in range(0, len(jobs), settings.shard_size)
            )
        ]
        local_worker = None
        if ray is None:
            configure_threads(net.num_parameters(), device)
            local_worker = ProbeWorker(net, settings)
        stats = run_shards(
            run,
            tasks,
            ProbeWorkerFactory(model_name, dtype_name, settings),
            device=device,
            ray=ray,
            num_workers=num_workers,
            cpus_per_worker=cpus_per_worker,
            local_worker=local_worker,
            progress=progress,
            desc=f"probe {data.source}",
        )
        drawn: Mapping[str, Any] = figures(run) if figures is not None else {}
        summary = probe_summary(run)
        summary["figures"] = sorted(drawn)
        summary["seconds"] = round(time.monotonic() - t0, 2)
        summary["shards"] = {
            "computed": stats.computed,
            "resumed": stats.skipped,
            "workers": stats.workers,
            "backend": stats.backend,
        }
        run.write_file("summary.json", (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode())
        run.mark_complete()
    return run


# ---------------------------------------------------------------------------------------------- summary


def last_position_sql(table: str) -> str:
    """A SQL condition keeping each prompt's last recorded position of ``table`` (``-1`` = the last
    token; else the prompt's largest position), as a semi-join: prompts differ in length."""
    if table not in ("ranks", "topk", "dynamics", "verdicts", "exit_gate"):
        raise ValueError(f"no position column in table {table!r}")
    return (
        "EXISTS (SELECT 1 FROM (SELECT prompt_id AS _pid, CASE WHEN min(position) = -1 THEN -1 "
        f"ELSE max(position) END AS _pos FROM {table} GROUP BY prompt_id) WHERE _pid = prompt_id AND _pos = position)"
    )


def probe_summary(run: Run) -> dict[str, Any]:
    """Headline numbers of a probe run, computed in DuckDB (nothing is loaded whole).

    Per lens and target kind, at each prompt's last recorded position: the median rank at the last
    block layer, the share of prompts at rank 1 there, and the first unrolled layer whose median
    rank is 1.
    """
    counts = run.query(
        "SELECT count(*) AS n, count(error) AS errors, avg(steps_used) AS mean_steps FROM prompt_meta"
    ).iloc[0]
    errors = run.query(
        "SELECT prompt_id, error FROM prompt_meta WHERE error IS NOT NULL ORDER BY prompt_id LIMIT 5"
    )
    medians = run.query(
        f"""
        SELECT lens, target_kind, unrolled_index, median(rank) AS median, avg(CAST(rank = 1 AS DOUBLE)) AS top1,
               count(*) AS n
        FROM ranks WHERE unrolled_index >= 0 AND {last_position_sql("ranks")}
        GROUP BY ALL ORDER BY lens, target_kind, unrolled_index"""
    )
    per: list[dict[str, Any]] = []
    for (lens_name, kind), group in medians.groupby(["lens", "target_kind"], sort=False):
        last = group.iloc[-1]
        top = group[group["median"] <= 1]
        per.append(
            {
                "lens": str(lens_name),
                "target_kind": str(kind),
                "median_rank_last_layer": float(last["median"]),
                "top1_share_last_layer": round(float(last["top1"]), 4),
                "first_layer_median_rank_1": int(top["unrolled_index"].iloc[0]) if len(top) else None,
                "layers": int(group["unrolled_index"].max()) + 1,
                "prompts": int(last["n"]),
            }
        )
    mean_steps = counts["mean_steps"]
    return {
        "run": run.name,
        "prompts": int(counts["n"]),
        "probed": int(counts["n"] - counts["errors"]),
        "errors": int(counts["errors"]),
        "first_errors": [{"prompt_id": int(r.prompt_id), "error": str(r.error)} for r in errors.itertuples()],
        "mean_steps_used": None if pd.isna(mean_steps) else round(float(mean_steps), 3),
        "rows": run.rows(),
        "ranks": per,
    }
