"""The record schema, the run store (write, resume, corruption) and rank trajectories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from probes.records import SCHEMAS, to_table
from probes.store import CorruptRunError, Run, RunMismatchError, ShardExistsError, list_runs
from probes.trajectory import RankTrajectory

REPO = Path(__file__).resolve().parents[2]
MANIFEST = {
    "model": {"name": "tiny-arith", "n_embd": 64, "dtype": "float32"},
    "config": {"mean_recurrence": 4},
    "prompt_template": {"format": "Question: {q}\nAnswer:"},
    "settings": {"num_steps": 8, "lenses": ["logit", "coda"], "seed": 0},
}


def rank_rows(batch: int, prompts: int = 2, layers: int = 3) -> list[dict]:
    """Deterministic ranks records for one batch of prompts (what a study would compute)."""
    return [
        {
            "prompt_id": batch * prompts + p,
            "position": -1,
            "site": f"core.{u % 2}",
            "iteration": 1 + u // 2,
            "block": u % 2,
            "unrolled_index": u,
            "lens": "logit",
            "target_kind": "final",
            "token_id": 7,
            "token": "7",
            "rank": 1 + (p + u) % 5,
            "logprob": -0.5 * u,
            "entropy": 1.25,
            "kl_to_final": None if u == 0 else 0.1 * u,
        }
        for p in range(prompts)
        for u in range(layers)
    ]


# --------------------------------------------------------------------------------------------- records


def test_schemas_name_the_tables_and_nullable_columns():
    assert set(SCHEMAS) == {
        "ranks", "topk", "answers", "dynamics", "prompts", "verdicts", "exit_gate", "prompt_meta", "patching",
        "patch_pairs", "wavefront", "sampler", "linear_probes",
    }  # fmt: skip
    nullable = {name: sorted(f.name for f in s if f.nullable) for name, s in SCHEMAS.items()}
    assert nullable == {
        "ranks": ["kl_to_final"],
        "topk": [],
        "answers": ["intermediate"],
        "dynamics": ["pc1", "pc2", "pc3", "step_norm"],
        "prompts": ["intermediate"],
        "verdicts": [],
        "linear_probes": [],
        "exit_gate": [],
        "prompt_meta": ["error", "metadata", "steps_used", "targets"],
        "patching": [
            "clean_prob", "clean_rank", "corrupt_prob", "corrupt_rank", "effect", "exit_step", "follow_prob",
            "follow_rank", "outcome", "positions", "top_prob", "top_token_id", "top_tokens",
        ],
        "patch_pairs": ["clean_exit_step", "corrupt_exit_step", "follow_answer_id", "group"],
        "wavefront": ["guess", "token"],
        "sampler": ["stopped"],
    }  # fmt: skip
    assert SCHEMAS["topk"].field("k").type == pa.int8()
    assert SCHEMAS["ranks"].field("position").type == pa.int32()


def test_to_table_casts_compatible_types_and_fills_nullable_columns():
    df = pd.DataFrame(rank_rows(0)).drop(columns=["kl_to_final"])
    df["site"] = df["site"].astype("category")
    df["run"] = "r"
    table = to_table("ranks", df)
    assert table.schema.equals(SCHEMAS["ranks"])
    assert table.column("kl_to_final").null_count == table.num_rows
    assert table.column("site").to_pylist()[:2] == ["core.0", "core.1"]
    assert to_table("ranks", table).equals(table)  # an Arrow table passes through


@pytest.mark.parametrize(
    ("change", "column", "words"),
    [
        (lambda r: r.pop("rank"), "rank", "missing required column"),
        (lambda r: r.update(token_id="seven"), "token_id", "expected int64"),
        (lambda r: r.update(logprob=None), "logprob", "null"),
        (lambda r: r.update(surprise=1), "surprise", "unknown column"),
        (lambda r: r.update(rank=0), "rank", ">= 1"),
        (lambda r: r.update(rank=2.5), "rank", "cannot cast"),
        (lambda r: r.update(position=2**40), "position", "cannot cast"),
        (lambda r: r.update(site="core"), "site", "site must match"),
    ],
)
def test_schema_errors_name_table_and_column(change, column, words):
    rows = rank_rows(0)
    for row in rows:
        change(row)
    with pytest.raises(ValueError, match="ranks") as info:
        to_table("ranks", rows, run="r")
    assert repr(column) in str(info.value) or column in str(info.value)
    assert words in str(info.value)


def test_topk_k_overflow_and_unknown_table():
    row = {
        "run": "r",
        "prompt_id": 0,
        "position": 0,
        "site": "latent",
        "iteration": 4,
        "block": -1,
        "unrolled_index": -1,
        "lens": "logit",
        "k": 300,
        "token_id": 1,
        "token": "a",
        "logprob": -1.0,
    }
    with pytest.raises(ValueError, match="'k'.*int8"):
        to_table("topk", [row])
    with pytest.raises(ValueError, match="unknown table 'rankz'"):
        to_table("rankz", [row])


# --------------------------------------------------------------------------------------------- store


def test_round_trip_through_duckdb(tmp_path):
    run = Run.create(tmp_path, "arith-tiny", MANIFEST)
    run.write_shard("ranks", 0, pd.DataFrame(rank_rows(0)))
    run.write_shard("ranks", 1, rank_rows(1))
    run.write_shard("ranks", "2", to_table("ranks", rank_rows(2), run="arith-tiny"))

    df = run.table("ranks")
    assert len(df) == 18 and set(df["run"]) == {"arith-tiny"}
    assert df["position"].dtype == np.int32 and df["logprob"].dtype == np.float32
    assert df["kl_to_final"].isna().sum() == 6
    assert sorted(df["prompt_id"].unique()) == list(range(6))
    best = run.query("SELECT unrolled_index, min(rank) AS best FROM ranks GROUP BY 1 ORDER BY 1")
    assert best["best"].tolist() == [1, 2, 3]
    assert run.query("SELECT count(*) AS n FROM answers")["n"].item() == 0  # empty tables are views too
    assert run.table("answers").columns.tolist() == SCHEMAS["answers"].names

    doc = json.loads((tmp_path / "arith-tiny" / "manifest.json").read_text())
    assert doc["status"] == "running" and doc["settings"] == MANIFEST["settings"]
    assert doc["model"] == MANIFEST["model"] and doc["prompt_template"] == MANIFEST["prompt_template"]
    assert {"looplens", "torch", "pyarrow", "duckdb", "python"} <= set(doc["versions"])
    assert sorted(doc["shards"]["ranks"]) == ["shard-00000", "shard-00001", "shard-00002"]
    assert doc["shards"]["ranks"]["shard-00001"]["rows"] == 6
    assert len(doc["shards"]["ranks"]["shard-00001"]["sha256"]) == 64
    assert run.verify() == {"ranks": 18}

    run.mark_complete()
    reopened = Run.open(tmp_path / "arith-tiny")
    assert reopened.status == "complete" and reopened.read_only
    assert reopened.table("ranks").equals(df)
    with pytest.raises(PermissionError):
        reopened.write_shard("ranks", 3, rank_rows(3))


def test_resume_with_equal_settings_keeps_shards(tmp_path):
    run = Run.create(tmp_path, "r", MANIFEST)
    run.write_shard("ranks", 0, rank_rows(0))
    run.mark_failed("interrupted")
    same = {**MANIFEST, "settings": {"seed": np.int64(0), "lenses": ("logit", "coda"), "num_steps": 8}}
    again = Run.create(tmp_path, "r", same, resume=True)
    assert again.has_shard("ranks", 0) and not again.has_shard("ranks", 1)
    assert again.status == "running" and "error" not in again.manifest
    assert [e["event"] for e in again.manifest["history"]] == ["created", "failed", "resumed"]
    assert len(again.table("ranks")) == 6


@pytest.mark.parametrize(
    ("section", "change", "key"),
    [
        ("settings", {"num_steps": 16}, "settings.num_steps"),
        ("model", {"name": "huginn-0125"}, "model.name"),
        ("settings", {"extra": True}, "settings.extra"),
    ],
)
def test_resume_with_other_model_or_settings_names_the_key(tmp_path, section, change, key):
    Run.create(tmp_path, "r", MANIFEST).write_shard("ranks", 0, rank_rows(0))
    other = {**MANIFEST, section: {**MANIFEST[section], **change}}
    with pytest.raises(RunMismatchError, match=key.replace(".", r"\.")) as info:
        Run.create(tmp_path, "r", other, resume=True)
    assert isinstance(info.value, ValueError) and info.value.keys == [key]
    assert Run.open(tmp_path / "r").has_shard("ranks", 0)  # nothing was touched


def test_existing_run_without_resume_needs_overwrite(tmp_path):
    Run.create(tmp_path, "r", MANIFEST).write_shard("ranks", 0, rank_rows(0))
    with pytest.raises(FileExistsError, match="resume=True"):
        Run.create(tmp_path, "r", MANIFEST, resume=False)
    fresh = Run.create(tmp_path, "r", {**MANIFEST, "settings": {}}, resume=False, overwrite=True)
    assert fresh.shards("ranks") == [] and not (tmp_path / "r" / "ranks").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a looplens run"):
        Run.create(tmp_path, "notes", MANIFEST, overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").exists()


def test_duplicate_shard_raises_unless_replace(tmp_path):
    run = Run.create(tmp_path, "r", MANIFEST)
    first = run.write_shard("ranks", 3, rank_rows(3))
    for same in (3, "3", "shard-00003"):
        with pytest.raises(ShardExistsError, match="shard-00003"):
            run.write_shard("ranks", same, rank_rows(3))
    second = run.write_shard("ranks", 3, rank_rows(3, layers=1), replace=True)
    assert second["sha256"] != first["sha256"]
    assert run.shards("ranks") == ["shard-00003"] and len(run.table("ranks")) == 2
    with pytest.raises(ValueError, match="belong to run"):
        run.write_shard("ranks", 4, [{**r, "run": "other"} for r in rank_rows(4)])
    assert not run.has_shard("ranks", 4)  # a rejected shard leaves nothing behind
    run.write_shard("ranks", 5, [])  # a batch without records still counts as done
    assert run.has_shard("ranks", 5) and len(run.table("ranks")) == 2 and run.verify() == {"ranks": 2}


STUDY = """
import os, sys
import probes.store as store
from test_store import MANIFEST, rank_rows

root, crash_at = sys.argv[1], int(sys.argv[2])
run = store.Run.create(root, "study", MANIFEST, resume=True)
for batch in range(6):
    if run.has_shard("ranks", batch):
        continue
    if batch == crash_at:  # die after the temp file is written, before it is renamed
        store.os.replace = lambda *args: os._exit(1)
    run.write_shard("ranks", batch, rank_rows(batch))
    print(batch, flush=True)
run.mark_complete()
"""


def run_study(root: Path, crash_at: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(STUDY), str(root), str(crash_at)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_killed_study_resumes_without_recomputing_or_duplicating(tmp_path):
    crashed = run_study(tmp_path, crash_at=3)
    assert crashed.returncode == 1, crashed.stderr
    assert crashed.stdout.split() == ["0", "1", "2"]
    ranks_dir = tmp_path / "study" / "ranks"
    leftovers = [p.name for p in ranks_dir.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".shard-00003.parquet.")
    half = Run.open(tmp_path / "study")
    assert half.status == "running" and half.shards("ranks") == [f"shard-{i:05d}" for i in range(3)]
    assert len(half.table("ranks")) == 18  # the temp file is not read
    mtimes = {p.name: p.stat().st_mtime_ns for p in ranks_dir.glob("*.parquet")}

    resumed = run_study(tmp_path, crash_at=-1)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.split() == ["3", "4", "5"]  # only what was missing was computed
    assert not [p for p in ranks_dir.iterdir() if p.name.endswith(".tmp")]  # cleaned on reopen
    assert {p: ranks_dir.joinpath(p).stat().st_mtime_ns for p in mtimes} == mtimes  # not rewritten
    done = Run.open(tmp_path / "study")
    df = done.table("ranks")
    assert done.status == "complete" and len(df) == 36
    assert not df.duplicated(["prompt_id", "unrolled_index"]).any()
    assert done.verify() == {"ranks": 36}


def test_stray_and_leftover_files_are_never_read(tmp_path):
    run = Run.create(tmp_path, "r", MANIFEST)
    run.write_shard("ranks", 0, rank_rows(0))
    stray = tmp_path / "r" / "ranks" / "shard-00099.parquet"  # renamed but never recorded
    stray.write_bytes((tmp_path / "r" / "ranks" / "shard-00000.parquet").read_bytes())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    temp = tmp_path / "r" / "ranks" / f".shard-00001.parquet.{dead.pid}.tmp"
    temp.write_bytes(b"PAR1 half a file")
    assert len(Run.open(tmp_path / "r").table("ranks")) == 6
    assert Run.open(tmp_path / "r").query("SELECT count(*) AS n FROM ranks")["n"].item() == 6
    Run.create(tmp_path, "r", MANIFEST)  # reopening to write cleans the dead writer's temp file
    assert not temp.exists()


def test_truncated_shard_is_corrupt_and_named(tmp_path):
    run = Run.create(tmp_path, "r", MANIFEST)
    for batch in range(2):
        run.write_shard("ranks", batch, rank_rows(batch))
    shard = tmp_path / "r" / "ranks" / "shard-00001.parquet"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    for read in (lambda r: r.table("ranks"), lambda r: r.query("SELECT * FROM ranks"), lambda r: r.verify()):
        with pytest.raises(CorruptRunError, match="shard-00001.parquet"):
            read(Run.open(tmp_path / "r"))
    shard.unlink()
    with pytest.raises(CorruptRunError, match="shard-00001.parquet.*missing"):
        Run.open(tmp_path / "r").table("ranks")


def test_bad_manifest_json_is_corrupt(tmp_path):
    Run.create(tmp_path, "r", MANIFEST).write_shard("ranks", 0, rank_rows(0))
    (tmp_path / "r" / "manifest.json").write_text('{"name": "r", "shards": {')
    with pytest.raises(CorruptRunError, match="manifest.json"):
        Run.open(tmp_path / "r")
    with pytest.raises(CorruptRunError, match="manifest.json"):
        Run.create(tmp_path, "r", MANIFEST)
    assert [(i.name, i.status) for i in list_runs(tmp_path)] == [("r", "corrupt")]


def test_open_without_manifest_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        Run.open(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        Run.open(tmp_path / "missing")


def test_list_runs_and_status(tmp_path):
    with Run.create(tmp_path, "b-done", MANIFEST) as done:
        done.write_shard("ranks", 0, rank_rows(0))
        done.write_shard(
            "answers",
            0,
            [
                {
                    "prompt_id": 0,
                    "task": "add",
                    "purpose": "eval",
                    "num_steps": 8,
                    "prompt": "1+1=",
                    "expected": "2",
                    "generated": "2",
                    "correct": True,
                    "first_token_id": 17,
                }
            ],
        )
        done.mark_complete()
    with pytest.raises(RuntimeError), Run.create(tmp_path, "a-broken", MANIFEST):
        raise RuntimeError("out of memory")
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "stray.txt").write_text("x")
    assert done.figures_dir == tmp_path / "b-done" / "figures" and done.figures_dir.is_dir()

    infos = list_runs(tmp_path)
    assert [(i.name, i.status) for i in infos] == [("a-broken", "failed"), ("b-done", "complete")]
    assert "out of memory" in infos[0].error
    assert infos[1].rows == {"ranks": 6, "answers": 1} and infos[1].created
    assert list_runs(tmp_path / "nowhere") == []


# --------------------------------------------------------------------------------------------- trajectory


def test_rank_trajectory_shape_check():
    with pytest.raises(ValueError, match=r"\[P, L\]"):
        RankTrajectory(unrolled_index=np.arange(4), ranks=np.ones((3, 5)))
    with pytest.raises(ValueError, match="1-D"):
        RankTrajectory(unrolled_index=np.zeros((2, 2)), ranks=np.ones((3, 4)))
    with pytest.raises(ValueError, match=">= 1"):
        RankTrajectory(unrolled_index=np.arange(2), ranks=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="prompt_ids"):
        RankTrajectory(unrolled_index=np.arange(2), ranks=np.ones((3, 2)), prompt_ids=[0, 1])


def test_rank_trajectory_statistics_from_a_run(tmp_path):
    run = Run.create(tmp_path, "r", MANIFEST)
    for batch in range(10):
        run.write_shard("ranks", batch, rank_rows(batch, prompts=3, layers=6))
    traj = RankTrajectory.from_frame(run.table("ranks"), lens="logit", target_kind="final")
    assert traj.ranks.shape == (30, 6) and traj.unrolled_index.tolist() == list(range(6))
    assert traj.sites == ("core.0", "core.1") * 3 and traj.iterations.tolist() == [1, 1, 2, 2, 3, 3]

    median = traj.median()
    np.testing.assert_array_equal(median, np.median(traj.ranks, axis=0))
    low, high = traj.bootstrap_ci(n=500, seed=1)
    assert low.shape == high.shape == (6,)
    assert (low <= median).all() and (median <= high).all()
    again = traj.bootstrap_ci(n=500, seed=1)
    np.testing.assert_array_equal(low, again[0])
    np.testing.assert_array_equal(high, again[1])
    gm = traj.geometric_mean()
    np.testing.assert_allclose(gm, np.exp(np.log(traj.ranks).mean(axis=0)))
    assert (gm <= traj.ranks.mean(axis=0) + 1e-12).all()  # AM-GM
    assert traj.summary(n=100).columns.tolist()[:3] == ["unrolled_index", "iteration", "site"]

    with pytest.raises(ValueError, match="no block-output rows"):
        RankTrajectory.from_frame(run.table("ranks"), lens="tuned", target_kind="final")


def test_rank_trajectory_bootstrap_ci_is_narrow_for_constant_ranks():
    traj = RankTrajectory(unrolled_index=np.array([0, 2, 5]), ranks=np.tile([40.0, 4.0, 1.0], (7, 1)))
    low, high = traj.bootstrap_ci()
    np.testing.assert_array_equal(low, [40, 4, 1])
    np.testing.assert_array_equal(high, [40, 4, 1])


# --------------------------------------------------------------------------------------------- hostile runs


@pytest.mark.parametrize(
    ("section", "value", "key"),
    [
        ("prompt_template", {"format": "Q: {q}\nA:"}, "prompt_template.format"),
        ("config", {"mean_recurrence": 8}, "config.mean_recurrence"),
        ("model", {**MANIFEST["model"], "weights": "0123abcd"}, "model.weights"),
        ("targets", {"control": "the"}, "targets"),
    ],
)
def test_resume_compares_every_entry_of_the_manifest(tmp_path, section, value, key):
    """Not only model and settings: a template, config or any other entry that differs is refused."""
    Run.create(tmp_path, "r", MANIFEST).write_shard("ranks", 0, rank_rows(0))
    with pytest.raises(RunMismatchError) as info:
        Run.create(tmp_path, "r", {**MANIFEST, section: value}, resume=True)
    assert info.value.keys == [key] and key in str(info.value)
    assert Run.open(tmp_path / "r").manifest["prompt_template"] == MANIFEST["prompt_template"]


class _SpyConnection:
    """A DuckDB connection that records every SQL text it is given."""

    def __init__(self, con, log: list[str]) -> None:
        self._con, self._log = con, log

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._con.close()

    def execute(self, sql, *args, **kwargs):
        self._log.append(sql)
        return self._con.execute(sql, *args, **kwargs)

    def sql(self, sql, *args, **kwargs):
        self._log.append(sql)
        return self._con.sql(sql, *args, **kwargs)

    query = sql

    def __getattr__(self, name):
        return getattr(self._con, name)


@pytest.fixture
def sql_log(monkeypatch) -> list[str]:
    import duckdb

    log: list[str] = []
    real = duckdb.connect
    monkeypatch.setattr("probes.store.duckdb.connect", lambda *a, **k: _SpyConnection(real(*a, **k), log))
    return log


def _prompt_rows() -> list[dict]:
    return [{"prompt_id": 0, "task": "add", "context": "1+1", "completion": "2", "prompt_text": "1+1="}]


def test_crafted_table_name_runs_no_sql_and_writes_no_file(tmp_path, sql_log):
    """A table name in the manifest that closes the view's quotes and appends a COPY statement."""
    run = Run.create(tmp_path, "r", MANIFEST)
    run.write_shard("prompts", 0, _prompt_rows())
    assert run.query("SELECT count(*) AS n FROM prompts")["n"].item() == 1
    assert sql_log == ["SELECT count(*) AS n FROM prompts"]  # the views are not SQL text
    sql_log.clear()

    pwned = tmp_path / "pwned.csv"
    doc = json.loads((tmp_path / "r" / "manifest.json").read_text())
    evil = f"ranks\" AS SELECT 1; COPY (SELECT 42 AS x) TO '{pwned}'; CREATE VIEW \"z"
    doc["shards"][evil] = {"shard-00000": doc["shards"]["prompts"]["shard-00000"]}
    (tmp_path / "r" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptRunError, match="unknown table"):
        Run.open(tmp_path / "r").query("SELECT count(*) AS n FROM prompts")
    [info] = list_runs(tmp_path)
    assert info.status == "corrupt" and "unknown table" in info.error
    assert sql_log == [] and not pwned.exists()


@pytest.mark.parametrize(
    "shard_id", ["../../x", "/etc/passwd", "shard-00000/../../../x", "..", "shard-0.tmp"]
)
def test_shard_ids_that_leave_the_run_are_refused(tmp_path, shard_id):
    run = Run.create(tmp_path / "runs", "r", MANIFEST)
    run.write_shard("prompts", 0, _prompt_rows())
    outside = tmp_path / "x"
    outside.write_bytes((tmp_path / "runs" / "r" / "prompts" / "shard-00000.parquet").read_bytes())
    doc = json.loads((tmp_path / "runs" / "r" / "manifest.json").read_text())
    doc["shards"]["prompts"] = {shard_id: doc["shards"]["prompts"]["shard-00000"]}
    (tmp_path / "runs" / "r" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptRunError, match="shard id"):
        Run.open(tmp_path / "runs" / "r")
    assert list_runs(tmp_path / "runs")[0].status == "corrupt"


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda d: d["shards"]["ranks"]["shard-00000"].update(rows="abc"), "rows of ranks/shard-00000"),
        (lambda d: d["shards"].update(ranks=[1, 2]), "shards of 'ranks' must be an object"),
        (lambda d: d.update(model=["tiny-arith"]), "'model' must be an object"),
        (lambda d: d.update(settings="fast"), "'settings' must be an object"),
        (lambda d: d.update(status=7), "status 7"),
        (lambda d: d.update(name="../other"), "run name"),
        (lambda d: d["shards"]["ranks"]["shard-00000"].update(sha256="../x"), "sha256"),
        (lambda d: d.update(history={"a": 1}), "'history' must be a list"),
    ],
)
def test_damaged_manifest_fields_make_the_run_corrupt_not_the_listing(tmp_path, damage, words):
    Run.create(tmp_path, "a-good", MANIFEST).write_shard("ranks", 0, rank_rows(0))
    Run.create(tmp_path, "b-bad", MANIFEST).write_shard("ranks", 0, rank_rows(0))
    doc = json.loads((tmp_path / "b-bad" / "manifest.json").read_text())
    damage(doc)
    (tmp_path / "b-bad" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptRunError, match=words.replace("(", r"\(")):
        Run.open(tmp_path / "b-bad")
    good, bad = list_runs(tmp_path)
    assert (good.name, good.status, good.rows) == ("a-good", "running", {"ranks": 6})
    assert (bad.name, bad.status) == ("b-bad", "corrupt") and words in bad.error


def test_runs_are_named_by_their_folder(tmp_path):
    """A copied run keeps the original's manifest name; listing by folder keeps the two apart."""
    import shutil

    Run.create(tmp_path, "r", MANIFEST).write_shard("ranks", 0, rank_rows(0))
    shutil.copytree(tmp_path / "r", tmp_path / "r-copy")
    infos = list_runs(tmp_path)
    assert [(i.name, i.path.name, i.manifest_name) for i in infos] == [
        ("r", "r", "r"),
        ("r-copy", "r-copy", "r"),
    ]


def test_atomic_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    import errno

    from probes.store import atomic_write

    target = tmp_path / "table.bin"
    atomic_write(target, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("probes.store.os.fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, b"new and longer")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["table.bin"]


# --------------------------------------------------------------------------------------------- rank summary


def _naive_median_interval(values, n_boot, level, seed):
    """The definition spelled out: resample positions of the sorted finite values, median per resample."""
    x = np.sort(np.asarray(values, dtype=float)[np.isfinite(values)])
    med = float(np.median(x))
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    boots = np.median(x[idx], axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return med, min(lo, med), max(hi, med)


def test_median_interval_is_the_naive_bootstrap_and_contains_the_median():
    from probes.trajectory import median_interval

    rng = np.random.default_rng(1)
    samples = [np.exp(rng.normal(3, 2, size=n)).round() + 1 for n in (2, 3, 10, 67, 10, 101)]
    samples.append(np.array([4.0, np.nan, 9.0, np.inf, 1.0]))  # missing cells are ignored
    med, lo, hi = median_interval(samples, n_boot=400, level=0.9, seed=3)
    for i, x in enumerate(samples):
        expected = _naive_median_interval(x, 400, 0.9, 3)
        np.testing.assert_allclose([med[i], lo[i], hi[i]], expected, rtol=0, atol=1e-12)
        finite = x[np.isfinite(x)]
        assert finite.min() <= lo[i] <= med[i] <= hi[i] <= finite.max()
    med, lo, hi = median_interval([np.array([7.0]), np.array([np.nan])])
    assert med[0] == lo[0] == hi[0] == 7.0 and np.isnan([med[1], lo[1], hi[1]]).all()


def test_summarize_ranks_groups_do_not_depend_on_each_other():
    """The explorer summarises a selection, the study everything: a group's numbers are the same."""
    from probes.trajectory import summarize_ranks

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "lens": np.repeat(["logit", "coda"], 60),
            "unrolled_index": np.tile(np.repeat([0, 1, 2], 20), 2),
            "rank": rng.integers(1, 500, size=120),
        }
    )
    everything = summarize_ranks(frame, ["lens", "unrolled_index"])
    assert everything.columns.tolist() == [
        "lens",
        "unrolled_index",
        "median",
        "ci_low",
        "ci_high",
        "geo_mean",
        "top1",
        "n",
    ]
    assert everything["lens"].tolist() == ["coda"] * 3 + ["logit"] * 3 and (everything["n"] == 20).all()
    alone = summarize_ranks(frame[frame["lens"] == "logit"], ["lens", "unrolled_index"])
    pd.testing.assert_frame_equal(everything.iloc[3:].reset_index(drop=True), alone)
    group = frame[(frame["lens"] == "coda") & (frame["unrolled_index"] == 1)]["rank"]
    row = everything.iloc[1]
    assert row["median"] == np.median(group) and row["top1"] == np.mean(group == 1)
    np.testing.assert_allclose(row["geo_mean"], np.exp(np.log(group).mean()))
    assert summarize_ranks(frame.iloc[:0], ["lens"]).columns.tolist()[0] == "lens"
