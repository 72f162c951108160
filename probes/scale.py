"""Shards of a batch job, run in this process or on a Ray cluster, recorded into one run.

A job is a list of :class:`ShardTask` s (say, 256 prompts each). Each task writes one shard of every
table it names; a shard id is fixed by the task, so a re-run skips what the run already records
(``Run.has_shard``) and a run stopped anywhere — a crash, Ctrl-C, a cluster that went away — is
resumed by running the same command again.

On Ray (``ray=`` ``"local"`` or a cluster address) every worker is an actor holding one model (one GPU
per worker where the cluster has GPUs, else ``cpus_per_worker`` CPUs). A worker validates its records
and stages them as Parquet files in the run folder (``probes.store.stage_shard``); the driver, the
run's only writer, verifies and commits them into the manifest as they arrive and shows the overall
progress. A worker that dies is restarted by Ray and its shard retried (``retries`` times); a staged
file nobody committed is never read and is removed, so nothing is lost and nothing is counted twice.
Workers and the driver must see the same run folder (one machine, or a shared file system).

Ray is an optional dependency: ``pip install "looplens[scale]"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
from tqdm import tqdm

from lens.errors import LooplensError
from probes.store import Run, StagedShard, stage_shard

__all__ = [
    "RayUnavailableError",
    "ShardFailedError",
    "ShardTask",
    "ShardWorker",
    "init_ray",
    "require_ray",
    "run_shards",
]

LOCAL = "local"


class RayUnavailableError(LooplensError, ImportError):
    """``--ray`` was asked for but Ray is not installed."""


class ShardFailedError(LooplensError, RuntimeError):
    """A shard kept failing on the cluster; what was committed stays, a re-run resumes."""


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: shard ``shard`` of every table in ``tables`` (each written, maybe empty)."""

    shard: str
    tables: tuple[str, ...]
    size: int = 1  # work units it counts for in the progress bar (prompts)
    payload: Any = None  # what the worker needs for it (small, picklable)


class ShardWorker(Protocol):
    """Computes a task's tables; built once per process by a factory ``factory(device) -> worker``."""

    def compute(self, task: ShardTask) -> Mapping[str, pd.DataFrame]: ...


WorkerFactory = Callable[[str], ShardWorker]


@dataclass
class ShardStats:
    """What ``run_shards`` did: shards computed now, shards the run already had, where they ran."""

    computed: int = 0
    skipped: int = 0
    workers: int = 1
    backend: str = "local"
    discarded: int = 0
    notes: list[str] = field(default_factory=list)


def _complete(run: Run, task: ShardTask) -> bool:
    return all(run.has_shard(table, task.shard) for table in task.tables)


def run_shards(
    run: Run,
    tasks: Sequence[ShardTask],
    factory: WorkerFactory,
    *,
    device: str = "cpu",
    ray: str | None = None,
    num_workers: int | None = None,
    cpus_per_worker: float = 1,
    retries: int = 3,
    local_worker: ShardWorker | None = None,
    progress: bool = True,
    desc: str = "probe",
    unit: str = "prompt",
) -> ShardStats:
    """Compute every task the run does not record yet and commit its shards.

    ``ray=None`` runs in this process (``local_worker`` if given, else ``factory(device)``);
    ``ray="local"`` starts a local Ray cluster, any other value is a cluster address (``"auto"``,
    ``"ray://host:10001"``). An already initialised Ray session is used as it is.
    """
    ids = [t.shard for t in tasks]
    if len(set(ids)) != len(ids):
        raise ValueError("shard ids of a job must be unique")
    pending = [t for t in tasks if not _complete(run, t)]
    done = sum(t.size for t in tasks if t not in pending)
    stats = ShardStats(skipped=len(tasks) - len(pending))
    bar = tqdm(
        total=sum(t.size for t in tasks),
        initial=done,
        desc=desc,
        unit=unit,
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    try:
        if not pending:
            return stats
        if ray is None:
            worker = local_worker if local_worker is not None else factory(device)
            for task in pending:
                frames = worker.compute(task)
                for table in task.tables:
                    run.write_shard(table, task.shard, _frame(frames, table), replace=True)
                stats.computed += 1
                bar.update(task.size)
            return stats
        _run_on_ray(run, pending, factory, ray, num_workers, cpus_per_worker, retries, bar, stats)
        return stats
    finally:
        bar.close()


def _frame(frames: Mapping[str, Any], table: str) -> Any:
    frame = frames.get(table)
    return frame if frame is not None else []


# ---------------------------------------------------------------------------------------------- Ray


def require_ray() -> None:
    """Raise :class:`RayUnavailableError` (naming the extra to install) unless Ray can be imported."""
    _import_ray()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError(
            'running on Ray needs the optional dependency: pip install "looplens[scale]"'
        ) from exc
    return ray


def _source_root() -> str:
    """The folder holding the ``probes`` package, so local workers import this very code."""
    return str(Path(__file__).resolve().parents[1])


def init_ray(address: str | None = LOCAL, num_cpus: int | None = None) -> Any:
    """Start (``"local"``) or join (an address) a Ray cluster unless this process already has one.

    A local cluster gets no dashboard and its workers import looplens from the same source folder as
    this process; returns the ``ray`` module.
    """
    ray = _import_ray()
    if ray.is_initialized():
        return ray
    env = {"PYTHONPATH": os.pathsep.join(p for p in (_source_root(), os.environ.get("PYTHONPATH")) if p)}
    if address in (None, LOCAL):
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env={"env_vars": env},
            log_to_driver=False,
            configure_logging=False,
        )
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return ray


class ShardActor:
    """A Ray actor: one model (built by the factory on its own device), computing and staging shards."""

    def __init__(self, factory: WorkerFactory, run_path: str, run_name: str, threads: int) -> None:
        import torch

        gpus = _assigned_gpus()
        if not gpus:
            torch.set_num_threads(max(1, threads))
        self.worker = factory("cuda" if gpus else "cpu")
        self.run_path = run_path
        self.run_name = run_name

    def compute(self, task: ShardTask) -> tuple[str, list[StagedShard]]:
        frames = self.worker.compute(task)
        return task.shard, [
            stage_shard(self.run_path, self.run_name, table, task.shard, _frame(frames, table))
            for table in task.tables
        ]

    def pid(self) -> int:
        return os.getpid()


def _assigned_gpus() -> list:
    try:
        import ray

        return list(ray.get_gpu_ids())
    except Exception:  # not inside a Ray worker
        return []


def _run_on_ray(
    run: Run,
    pending: list[ShardTask],
    factory: WorkerFactory,
    address: str,
    num_workers: int | None,
    cpus_per_worker: float,
    retries: int,
    bar: tqdm,
    stats: ShardStats,
) -> None:
    started_here = not _import_ray().is_initialized()
    ray = init_ray(address)
    from ray.util import ActorPool

    stats.backend = "ray"
    stats.discarded += run.discard_staged()  # left by a driver or worker that died before committing
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if num_workers is None:
        num_workers = gpus or max(1, int(cpus // max(cpus_per_worker, 1e-9)))
    if num_workers < 1:
        raise ValueError(f"the number of Ray workers must be >= 1, got {num_workers}")
    num_workers = min(num_workers, len(pending))
    stats.workers = num_workers
    options: dict[str, Any] = {"max_restarts": retries, "max_task_retries": retries}
    if gpus:
        options |= {"num_gpus": 1, "num_cpus": cpus_per_worker}
    else:
        options |= {"num_cpus": cpus_per_worker}
    actor_class = ray.remote(ShardActor).options(**options)
    threads = max(1, int(cpus_per_worker))
    actors = [actor_class.remote(factory, str(run.path), run.name, threads) for _ in range(num_workers)]
    pool = ActorPool(actors)
    try:
        for task in pending:
            pool.submit(lambda actor, t: actor.compute.remote(t), task)
        sizes = {t.shard: t.size for t in pending}
        while pool.has_next():
            try:
                shard, staged = pool.get_next_unordered()
            except ray.exceptions.RayError as exc:
                raise ShardFailedError(
                    f"a shard failed on the Ray cluster after {retries} retries ({exc}); the shards "
                    f"committed so far are kept in {run.path}: run the same command again to resume"
                ) from exc
            for item in staged:
                run.commit_shard(item, replace=True)
            stats.computed += 1
            bar.update(sizes[shard])
    finally:
        for actor in actors:
            ray.kill(actor)
        stats.discarded += run.discard_staged()
        if started_here:
            ray.shutdown()
