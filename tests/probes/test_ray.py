"""Probes and studies on a local 2-worker Ray cluster: the same tables, a killed worker, a resumed run.

One local cluster (2 CPUs, no dashboard) serves the whole module: starting Ray costs seconds.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from typer.testing import CliRunner

import probes
from looplens.cli import app
from probes.dataset import ProbeWorker
from probes.scale import RayUnavailableError, init_ray
from probes.store import Run
from studies.arithmetic import run_arithmetic_study
from tests.conftest import save_arith_model
from tests.probes.test_probe_dataset import FAST, KEY, ROWS, sorted_tables

SUMS = [
    {"prompt": f"Question: What is {a} plus {b}?\nAnswer:", "target": f" {a + b}"}
    for a in range(5)
    for b in range(4)
]
SLOW = dict(num_steps=12, shard_size=1, batch_size=1, progress=False)


@pytest.fixture(scope="module")
def cluster():
    ray = init_ray("local", num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_arith_model(tmp_path_factory.mktemp("model") / "tiny-random", block_size=64)


@pytest.fixture(scope="module")
def sums_reference(model_dir, tmp_path_factory) -> dict[str, pd.DataFrame]:
    run = probes.probe_dataset(SUMS, str(model_dir), out=tmp_path_factory.mktemp("ref"), **SLOW)
    return sorted_tables(run)


def assert_same_tables(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    for name in KEY:
        assert len(a[name]) and not a[name].duplicated(KEY[name]).any(), name
        pd.testing.assert_frame_equal(a[name], b[name], obj=name)


def test_ray_probe_gives_the_single_process_tables(cluster, model_dir, tmp_path):
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    local = probes.probe_dataset(data, str(model_dir), out=tmp_path / "local", **FAST)
    result = CliRunner().invoke(
        app,
        [
            "probe",
            str(data),
            "--model",
            str(model_dir),
            "--steps",
            "3",
            "--shard-size",
            "2",
            "--batch-size",
            "2",
            "--no-figures",
            "--out",
            str(tmp_path / "ray"),
            "--ray",
            "--workers",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 worker(s) (ray)" in result.output
    on_ray = Run.open(next((tmp_path / "ray").iterdir()))
    assert on_ray.status == "complete"
    assert_same_tables(sorted_tables(on_ray), sorted_tables(local))
    assert not any((on_ray.path / ".staging").iterdir())  # every staged file committed or removed


def _shard_actors() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or []) or (proc.info["name"] or "")
        if title.startswith("ray::ShardActor"):
            found.append(proc)
    return found


def test_a_killed_worker_has_its_shard_retried(cluster, model_dir, sums_reference, tmp_path):
    out = tmp_path / "runs"
    failure: list[BaseException] = []

    def job():
        try:
            probes.probe_dataset(
                SUMS, str(model_dir), out=out, name="killed", ray="local", num_workers=2, **SLOW
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)

    thread = threading.Thread(target=job)
    thread.start()
    manifest = out / "killed" / "manifest.json"
    deadline = time.monotonic() + 300
    victim, committed = None, 0
    while time.monotonic() < deadline and thread.is_alive():
        if manifest.is_file():
            try:
                committed = len(json.loads(manifest.read_text())["shards"].get("ranks", {}))
            except (json.JSONDecodeError, OSError):
                committed = 0
        actors = _shard_actors()
        if committed >= 1 and actors:
            victim = actors[0]
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    thread.join(600)
    assert not failure, failure
    assert victim is not None and 1 <= committed < len(SUMS), "the worker was not killed mid-run"
    try:
        assert victim.status() == psutil.STATUS_ZOMBIE  # killed, not yet reaped
    except psutil.NoSuchProcess:
        pass  # killed and reaped
    run = Run.open(out / "killed")
    assert run.status == "complete" and len(run.shards("ranks")) == len(SUMS)
    assert_same_tables(sorted_tables(run), sums_reference)
    assert not any((run.path / ".staging").iterdir())


def test_a_stopped_run_resumes_on_the_cluster(cluster, model_dir, sums_reference, tmp_path, monkeypatch):
    real = ProbeWorker.compute
    calls = {"n": 0}

    def stopping(self, task):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("the cluster went away")
        return real(self, task)

    monkeypatch.setattr(ProbeWorker, "compute", stopping)
    with pytest.raises(KeyboardInterrupt):
        probes.probe_dataset(SUMS, str(model_dir), out=tmp_path, name="r", **SLOW)
    monkeypatch.setattr(ProbeWorker, "compute", real)
    stopped = Run.open(tmp_path / "r")
    assert stopped.status == "failed" and len(stopped.shards("ranks")) == 3
    kept = (tmp_path / "r" / "ranks" / "shard-00000.parquet").stat().st_mtime_ns
    run = probes.probe_dataset(
        SUMS, str(model_dir), out=tmp_path, name="r", ray="local", num_workers=2, **SLOW
    )
    assert run.status == "complete"
    assert (tmp_path / "r" / "ranks" / "shard-00000.parquet").stat().st_mtime_ns == kept
    assert json.loads((run.path / "summary.json").read_text())["shards"]["resumed"] == 3
    assert_same_tables(sorted_tables(run), sums_reference)


def test_the_arithmetic_study_on_ray(cluster, model_dir, tmp_path):
    settings = dict(n=8, steps=2, batch_size=4, depths=(1, 2), depth_n=3, seed=0, tuned_lens=True)
    local = run_arithmetic_study(model=str(model_dir), out=tmp_path, name="local", **settings)
    on_ray = run_arithmetic_study(
        model=str(model_dir), out=tmp_path, name="ray", ray="local", num_workers=2, **settings
    )
    assert on_ray.status == "complete" and on_ray.tables() == local.tables()
    for table in local.tables():
        a, b = (r.table(table).drop(columns="run") for r in (local, on_ray))
        cols = list(a.columns)
        pd.testing.assert_frame_equal(
            a.sort_values(cols).reset_index(drop=True), b.sort_values(cols).reset_index(drop=True), obj=table
        )


def test_without_ray_the_error_names_the_extra(model_dir, tmp_path, monkeypatch):
    import probes.scale

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayUnavailableError, match=r'pip install "looplens\[scale\]"'):
        probes.scale._import_ray()
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Question: What is 1 plus 1?\nAnswer:"}) + "\n")
    result = CliRunner().invoke(
        app, ["probe", str(data), "--model", str(model_dir), "--out", str(tmp_path), "--ray"]
    )
    assert result.exit_code == 2 and "looplens[scale]" in result.output, result.output
    assert not any(tmp_path.glob("*/manifest.json"))
