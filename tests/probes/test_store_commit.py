"""Shards staged by workers and committed by the run's one writer (the Ray driver's store API)."""

from __future__ import annotations

import dataclasses

import pytest

from probes.store import CorruptRunError, Run, ShardExistsError, stage_shard

ROW = {"prompt_id": 0, "task": "t", "context": "1+1", "completion": "2", "prompt_text": "1+1="}


def test_a_staged_shard_counts_only_once_committed(tmp_path):
    run = Run.create(tmp_path, "r", {"settings": {"a": 1}})
    staged = stage_shard(run.path, run.name, "prompts", 3, [ROW])
    assert not run.has_shard("prompts", 3) and run.query("SELECT count(*) AS n FROM prompts")["n"].item() == 0
    record = run.commit_shard(staged)
    assert run.has_shard("prompts", 3) and record["rows"] == 1 and record["sha256"] == staged.sha256
    assert not any((run.path / ".staging").iterdir())  # moved into place, not copied
    assert Run.open(run.path).table("prompts")["context"].tolist() == ["1+1"]
    again = stage_shard(run.path, run.name, "prompts", 3, [ROW])  # a retried task: same shard, new file
    assert again.file != staged.file
    with pytest.raises(ShardExistsError):
        run.commit_shard(again)
    assert run.discard_staged() == 1 and run.rows() == {"prompts": 1}


def test_a_damaged_or_foreign_staged_file_is_refused(tmp_path):
    run = Run.create(tmp_path, "r", {})
    staged = stage_shard(run.path, run.name, "prompts", 0, [ROW])
    (run.path / ".staging" / staged.file).write_bytes(b"PAR1 truncated")
    with pytest.raises(CorruptRunError, match="checksum mismatch"):
        run.commit_shard(staged)
    with pytest.raises(CorruptRunError, match="not one stage_shard writes"):
        run.commit_shard(dataclasses.replace(staged, file="../manifest.json"))
    with pytest.raises(ValueError, match="unknown table"):
        run.commit_shard(dataclasses.replace(staged, table="../x"))
    with pytest.raises(ValueError, match="belong to run"):
        stage_shard(run.path, "r", "prompts", 1, [{**ROW, "run": "other"}])
    assert run.rows() == {}


def test_run_level_files_are_written_atomically_by_plain_name(tmp_path):
    run = Run.create(tmp_path, "r", {})
    assert run.write_file("summary.json", b"{}").read_bytes() == b"{}"
    for bad in ("manifest.json", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            run.write_file(bad, b"")
    with pytest.raises(PermissionError):
        Run.open(run.path).write_file("summary.json", b"")
