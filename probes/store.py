"""The run store: a study's records on disk, written shard by shard so that it can resume.

Layout of a run::

    runs/NAME/manifest.json          name, created, model, config, prompt template, settings,
                                     package versions, status, and every shard written
    runs/NAME/TABLE/shard-00000.parquet
    runs/NAME/figures/

Why shards: a study computes shard ids deterministically (say, the batch index), asks
``has_shard`` and skips what is already there, so a study killed midway finishes on re-run
without recomputing and without duplicating rows. Every file is written atomically (temp file
in the same directory, fsync, ``os.replace``) and a shard only exists once the manifest records
it, together with its row count and SHA-256. Readers go through the manifest, never a directory
listing, so a half-written or stray file is never read. Everything is JSON and Parquet, never
pickle. One writer per run at a time.

What a run was made with is what it is: every entry the study passes to ``Run.create`` (model and
weights, config, prompt template, settings, ...) is compared when the run is resumed, and any
difference is one ``RunMismatchError`` naming the keys, so a run never mixes results of two setups.

A run folder is untrusted input (it may come from anyone): a manifest is validated when it is read
(table names against ``probes.records.SCHEMAS``, shard ids against the shard grammar, record fields by
type), so a crafted manifest is a ``CorruptRunError``, never a path outside the run or a piece of SQL.
Tables are registered with DuckDB through its relation API, so no SQL is ever built from file contents.

Example:
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> run = Run.create(root, "demo", {"model": {"name": "tiny"}, "settings": {"num_steps": 4}})
    >>> for batch in range(2):
    ...     if not run.has_shard("prompts", batch):
    ...         _ = run.write_shard("prompts", batch, [{"prompt_id": batch, "task": "add", "context": "1+1",
    ...                                                 "completion": "2", "prompt_text": "1+1="}])
    >>> run.query("SELECT count(*) AS n FROM prompts")["n"].item()
    2
    >>> run.mark_complete()
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lens.errors import LooplensError
from probes.records import SCHEMAS, to_table

__all__ = [
    "CorruptRunError",
    "Run",
    "RunInfo",
    "RunMismatchError",
    "ShardExistsError",
    "StagedShard",
    "atomic_write",
    "list_runs",
    "stage_shard",
]

MANIFEST = "manifest.json"
FORMAT = "looplens-run/1"
_RESERVED = {"format", "name", "created", "status", "finished", "error", "versions", "history", "shards"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")
_TMP_RE = re.compile(r"^\..+\.(\d+)\.tmp$")  # ".<final name>.<pid>.tmp"
_SHARD_RE = re.compile(r"^shard-[A-Za-z0-9_.=+-]+$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_STATUSES = ("running", "complete", "failed")


class RunMismatchError(LooplensError, ValueError):
    """An existing run was made with a different model or settings than the ones asked for."""

    def __init__(self, message: str, keys: list[str]) -> None:
        super().__init__(message)
        self.keys = keys


class CorruptRunError(LooplensError, ValueError):
    """A manifest or shard on disk is unreadable or does not match what the manifest recorded."""


class ShardExistsError(LooplensError, FileExistsError):
    """The shard is already recorded; pass ``replace=True`` to overwrite it on purpose."""


@dataclass(frozen=True)
class RunInfo:
    """What ``list_runs`` knows about a run from its manifest alone (no Parquet is read).

    ``name`` is the run's folder name, unique under its root (a copied folder keeps the manifest's
    name of the original: that one is ``manifest_name``).
    """

    name: str
    path: Path
    status: str
    created: str
    rows: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    manifest_name: str | None = None


# ---------------------------------------------------------------------------------------------- helpers


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _looplens_version() -> str | None:
    try:
        return importlib.metadata.version("looplens")
    except importlib.metadata.PackageNotFoundError:  # a source checkout: read pyproject.toml
        try:
            import tomllib

            pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except Exception:
            return None


def _versions() -> dict[str, str | None]:
    """Versions that can change a run's numbers; read from metadata so torch is not imported."""
    out: dict[str, str | None] = {"looplens": _looplens_version(), "python": platform.python_version()}
    for package in ("torch", "numpy", "pyarrow", "duckdb", "pandas"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def _canonical(value: Any, where: str) -> Any:
    """The value as it will read back from JSON, so a resumed run compares equal to the stored one."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if not np.isfinite(value):
            raise ValueError(f"manifest value at {where!r} is {value}: not representable in JSON")
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"manifest key {key!r} under {where!r} must be a string")
            out[key] = _canonical(item, f"{where}.{key}" if where else key)
        return out
    if isinstance(value, list | tuple):
        return [_canonical(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(
        f"manifest value at {where!r} is a {type(value).__name__}, not JSON; "
        "convert it first (e.g. str(dtype))"
    )


def _diff(stored: Any, new: Any, where: str) -> list[str]:
    """Dotted keys at which two JSON values differ (a missing key counts as a difference)."""
    if isinstance(stored, dict) and isinstance(new, dict):
        keys: list[str] = []
        for key in sorted(set(stored) | set(new)):
            sub = f"{where}.{key}" if where else key
            if key not in stored or key not in new:
                keys.append(sub)
            else:
                keys.extend(_diff(stored[key], new[key], sub))
        return keys
    return [] if stored == new else [where]


def _lookup(doc: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return "<missing>"
        doc = doc[part]
    return doc


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    A failed write (a full disk, an interrupt) removes its temp file and leaves ``path`` as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shard_id(shard: str | int) -> str:
    """``3`` → ``"shard-00003"``; a string is kept (prefixed with ``shard-`` if needed)."""
    if isinstance(shard, bool) or not isinstance(shard, int | str | np.integer):
        raise TypeError(f"shard must be an int or a str, got {type(shard).__name__}")
    if isinstance(shard, int | np.integer):
        if shard < 0:
            raise ValueError(f"shard index must be >= 0, got {shard}")
        return f"shard-{int(shard):05d}"
    if shard.isdigit():
        return f"shard-{int(shard):05d}"
    if not _NAME_RE.match(shard) or shard.endswith(".tmp"):
        raise ValueError(f"shard name {shard!r} must be letters, digits and _.=+- (no leading dot)")
    return shard if shard.startswith("shard-") else f"shard-{shard}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parquet_payload(table: str, data: Any, run_name: str) -> tuple[pa.Table, bytes]:
    """Validate ``data`` as ``table`` and serialise it as one zstd Parquet file."""
    arrow = to_table(table, data, run=run_name)
    sink = pa.BufferOutputStream()
    pq.write_table(arrow, sink, compression="zstd")
    return arrow, sink.getvalue().to_pybytes()


def _load_manifest(path: Path) -> dict[str, Any]:
    """Read and validate ``path/manifest.json``; a missing one is FileNotFoundError, a broken or
    crafted one CorruptRunError naming what is wrong."""
    file = path / MANIFEST
    if not path.is_dir():
        raise FileNotFoundError(f"run directory not found: {path}")
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {MANIFEST}: not a looplens run (runs are made by Run.create)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptRunError(f"{file}: {MANIFEST} is not valid JSON ({exc})") from exc
    except OSError as exc:
        raise CorruptRunError(f"{file}: {MANIFEST} cannot be read ({exc})") from exc
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise CorruptRunError(f"{file}: {problem}")
    return manifest


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _manifest_problem(doc: Any) -> str | None:
    """What makes ``doc`` not a manifest this store wrote, or None.

    Every name that later becomes a path or a DuckDB view is checked here: tables must be in
    ``SCHEMAS``, shard ids must follow the shard grammar (one path component, no ``..``), and the
    fields read by ``list_runs`` and the explorer must have their types.
    """
    if not isinstance(doc, dict):
        return f"{MANIFEST} holds a {type(doc).__name__}, not the object of a looplens run"
    if "name" not in doc or not isinstance(doc.get("shards"), dict):
        return f"{MANIFEST} lacks the 'name' and 'shards' entries of a looplens run"
    if not isinstance(doc["name"], str) or not _NAME_RE.match(doc["name"]):
        return f"run name {_short(doc['name'])} is not a run name (letters, digits and _.=+-)"
    if "status" in doc and doc["status"] not in _STATUSES:
        return f"status {_short(doc['status'])} is none of {list(_STATUSES)}"
    for key in ("created", "finished", "format"):
        if key in doc and not isinstance(doc[key], str):
            return f"{key!r} must be a string, not {_short(doc[key])}"
    if doc.get("error") is not None and not isinstance(doc["error"], str):
        return f"'error' must be a string, not {_short(doc['error'])}"
    for key in ("model", "config", "settings", "versions"):
        if key in doc and not isinstance(doc[key], dict):
            return f"{key!r} must be an object, not a {type(doc[key]).__name__}"
    if "prompt_template" in doc and not isinstance(doc["prompt_template"], dict | str | type(None)):
        return f"'prompt_template' must be an object, not a {type(doc['prompt_template']).__name__}"
    if "history" in doc and not isinstance(doc["history"], list):
        return f"'history' must be a list, not a {type(doc['history']).__name__}"
    for table, shards in doc["shards"].items():
        if table not in SCHEMAS:
            return f"unknown table {_short(table)} in 'shards' (tables are {sorted(SCHEMAS)})"
        if not isinstance(shards, dict):
            return f"shards of {table!r} must be an object, not a {type(shards).__name__}"
        for shard_id, record in shards.items():
            if not _SHARD_RE.match(shard_id) or shard_id.endswith(".tmp"):
                return f"shard id {_short(shard_id)} of {table!r} is not a shard id (shard-<letters, digits, _.=+->)"
            if not isinstance(record, dict):
                return f"record of {table}/{shard_id} must be an object, not a {type(record).__name__}"
            rows = record.get("rows")
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
                return f"rows of {table}/{shard_id} must be a count, not {_short(rows)}"
            sha = record.get("sha256")
            if not isinstance(sha, str) or not _SHA256_RE.match(sha):
                return f"sha256 of {table}/{shard_id} must be 64 hex digits, not {_short(sha)}"
            size = record.get("bytes", 0)
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                return f"bytes of {table}/{shard_id} must be a count, not {_short(size)}"
    return None


# ---------------------------------------------------------------------------------------------- the run


class Run:
    """One run directory: its manifest, Parquet shards per table, and figures.

    Make one with ``Run.create`` (writable) or ``Run.open`` (read-only); the constructor is internal.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], *, read_only: bool) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._manifest = manifest
        self._checked: dict[Path, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, sha256) verified

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: str | os.PathLike[str],
        name: str,
        manifest: Mapping[str, Any] | None = None,
        *,
        resume: bool = True,
        overwrite: bool = False,
    ) -> Run:
        """Start run ``root/name``, or reopen it to resume an interrupted study.

        ``manifest`` holds ``model``, ``settings``, ``prompt_template``, ``config`` and any other
        JSON-able description of what the results depend on. An existing run is reopened when
        ``resume`` is true and **every** one of these entries equals the stored one (else
        ``RunMismatchError`` names each key that differs, nothing on disk changes); so a study records
        every setting that changes its numbers here, once, and resuming checks them all. With
        ``resume=False`` an existing non-empty run raises ``FileExistsError``. ``overwrite=True``
        discards an existing run and starts afresh. A folder that is not a run is never deleted.
        """
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"run name {name!r} must be letters, digits and _.=+- (one path component)")
        user = _canonical(dict(manifest or {}), "")
        reserved = sorted(_RESERVED & set(user))
        if reserved:
            raise ValueError(f"manifest keys {reserved} are set by the store; rename them")
        for key in ("model", "config", "settings"):
            user.setdefault(key, {})
        user.setdefault("prompt_template", None)

        path = Path(root) / name
        if path.exists():
            if not path.is_dir():
                raise FileExistsError(f"{path} exists and is not a directory")
            is_run = (path / MANIFEST).is_file()
            if not is_run and _has_content(path):
                raise FileExistsError(
                    f"{path} exists and is not a looplens run (no {MANIFEST}); choose another name or root"
                )
            if is_run and overwrite:
                shutil.rmtree(path)
            elif is_run:
                stored = _load_manifest(path)
                if resume:
                    return cls._reopen(path, stored, user)
                if _run_has_content(path, stored):
                    raise FileExistsError(
                        f"run {path} already exists and holds data; pass resume=True to "
                        "continue it or overwrite=True to start over"
                    )
                shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        _clean_temp_files(path)
        now = _now()
        doc = {
            "format": FORMAT,
            "name": name,
            "created": now,
            "status": "running",
            **{k: user.pop(k) for k in ("model", "config", "prompt_template", "settings")},
            **user,
            "versions": _versions(),
            "history": [{"event": "created", "time": now}],
            "shards": {},
        }
        run = cls(path, doc, read_only=False)
        run._save()
        return run

    @classmethod
    def _reopen(cls, path: Path, stored: dict[str, Any], user: dict[str, Any]) -> Run:
        recorded = {k: v for k, v in stored.items() if k not in _RESERVED}
        keys = _diff(recorded, user, "")
        if keys:
            details = "; ".join(
                f"{k}: stored {_short(_lookup(stored, k), 80)}, new {_short(_lookup(user, k), 80)}"
                for k in keys
            )
            raise RunMismatchError(
                f"run {path} was made with a different {' / '.join(sorted({k.split('.')[0] for k in keys}))}"
                f" ({details}); choose another run name (--name), or start over with overwrite=True (--overwrite)",
                keys,
            )
        run = cls(path, stored, read_only=False)
        _clean_temp_files(path)
        stored["status"] = "running"
        stored.pop("error", None)
        stored.pop("finished", None)
        stored.setdefault("history", []).append({"event": "resumed", "time": _now(), "versions": _versions()})
        run._save()
        return run

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Run:
        """Open an existing run read-only (for the explorer and figures); nothing on disk changes."""
        path = Path(path)
        if path.name == MANIFEST and path.is_file():
            path = path.parent
        return cls(path, _load_manifest(path), read_only=True)

    # -- description -----------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._manifest["name"]

    @property
    def status(self) -> str:
        return self._manifest.get("status", "running")

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest as stored (edits to it change nothing)."""
        return copy.deepcopy(self._manifest)

    @property
    def figures_dir(self) -> Path:
        """``NAME/figures/``, where studies save PNG and HTML figures (created for a writable run)."""
        path = self.path / "figures"
        if not self.read_only:
            path.mkdir(exist_ok=True)
        return path

    def tables(self) -> list[str]:
        """Tables with at least one recorded shard."""
        return sorted(t for t, shards in self._manifest["shards"].items() if shards)

    def shards(self, table: str) -> list[str]:
        """Recorded shard ids of ``table``, sorted."""
        return sorted(self._manifest["shards"].get(table, {}))

    def has_shard(self, table: str, shard: str | int) -> bool:
        """Whether the shard is recorded (its file complete and checksummed): skip recomputing it."""
        return _shard_id(shard) in self._manifest["shards"].get(table, {})

    def rows(self) -> dict[str, int]:
        """Row count per table, from the manifest."""
        return {t: sum(s["rows"] for s in shards.values()) for t, shards in self._manifest["shards"].items()}

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "writable"
        return (
            f"Run({self.name!r}, path={str(self.path)!r}, status={self.status!r}, {mode}, rows={self.rows()})"
        )

    # -- writing ---------------------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.read_only:
            raise PermissionError(
                f"run {self.path} is open read-only; use Run.create(..., resume=True) to write"
            )

    def _save(self) -> None:
        data = json.dumps(self._manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        atomic_write(self.path / MANIFEST, data.encode("utf-8"))

    def _shard_path(self, table: str, shard_id: str) -> Path:
        return self.path / table / f"{shard_id}.parquet"

    def write_shard(
        self,
        table: str,
        shard: str | int,
        data: pa.Table | pd.DataFrame | list[dict[str, Any]],
        *,
        replace: bool = False,
    ) -> dict[str, Any]:
        """Validate ``data`` against ``SCHEMAS[table]`` and store it as one shard; returns its record.

        A missing ``run`` column is filled with this run's name. The shard counts as written only
        once the manifest records it, so a crash at any point leaves it either absent (recomputed on
        resume) or complete. Writing a recorded shard raises ``ShardExistsError`` unless ``replace``.
        """
        self._writable()
        shard_id = _shard_id(shard)
        recorded = self._manifest["shards"].get(table, {})
        if shard_id in recorded and not replace:
            raise ShardExistsError(
                f"{table}/{shard_id} is already written in run {self.name!r}; "
                "check has_shard() first, or pass replace=True"
            )
        arrow, payload = _parquet_payload(table, data, self.name)

        if shard_id in recorded:  # forget the old shard first: a crash now means "not written"
            del recorded[shard_id]
            self._save()
        path = self._shard_path(table, shard_id)
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, payload)
        stat = path.stat()
        record = {
            "rows": arrow.num_rows,
            "bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "written": _now(),
        }
        self._manifest["shards"].setdefault(table, {})[shard_id] = record
        self._save()
        self._checked[path] = (stat.st_size, stat.st_mtime_ns, record["sha256"])
        return dict(record)

    # -- shards written by other processes (workers of a cluster) ---------------------------------------
    #
    # A worker cannot write the manifest (one writer per run), so it stages its shard file with
    # ``stage_shard`` and hands the returned ``StagedShard`` to the driver, which commits it here: the
    # checksum is verified, the file moved into place and recorded. A staged file nobody commits (a
    # worker that died, a duplicate of a retried task) is never read and ``discard_staged`` removes it.

    def commit_shard(self, staged: StagedShard, *, replace: bool = False) -> dict[str, Any]:
        """Record a shard a worker staged; returns its record (as ``write_shard`` does)."""
        self._writable()
        if staged.table not in SCHEMAS:
            raise ValueError(f"unknown table {staged.table!r}; tables are {sorted(SCHEMAS)}")
        shard_id = _shard_id(staged.shard_id)
        source = self._staged_path(staged)
        recorded = self._manifest["shards"].get(staged.table, {})
        if shard_id in recorded and not replace:
            raise ShardExistsError(
                f"{staged.table}/{shard_id} is already written in run {self.name!r}; "
                "check has_shard() first, or pass replace=True"
            )
        try:
            actual = _sha256(source)
        except FileNotFoundError:
            raise CorruptRunError(f"staged shard {source} is missing") from None
        if actual != staged.sha256:
            raise CorruptRunError(f"staged shard {source}: checksum mismatch (incomplete copy?)")
        if shard_id in recorded:  # forget the old shard first: a crash now means "not written"
            del recorded[shard_id]
            self._save()
        path = self._shard_path(staged.table, shard_id)
        path.parent.mkdir(exist_ok=True)
        os.replace(source, path)
        _fsync_dir(path.parent)
        stat = path.stat()
        record = {"rows": staged.rows, "bytes": staged.bytes, "sha256": staged.sha256, "written": _now()}
        self._manifest["shards"].setdefault(staged.table, {})[shard_id] = record
        self._save()
        self._checked[path] = (stat.st_size, stat.st_mtime_ns, staged.sha256)
        return dict(record)

    def write_file(self, name: str, data: bytes) -> Path:
        """Write a run-level file (``summary.json``, …) atomically; ``name`` is one plain file name."""
        self._writable()
        if not _NAME_RE.match(name) or name == MANIFEST or name.endswith(".tmp"):
            raise ValueError(
                f"file name {name!r} must be one plain name (letters, digits, _.=+-), not the manifest"
            )
        path = self.path / name
        atomic_write(path, data)
        return path

    def _staged_path(self, staged: StagedShard) -> Path:
        """Where ``stage_shard`` put it; anything else (a crafted name or token) is refused."""
        name = _staged_name(staged.table, _shard_id(staged.shard_id), staged.token)
        if (
            staged.table not in SCHEMAS
            or not re.fullmatch(r"[0-9a-f]{32}", staged.token)
            or staged.file != name
        ):
            raise CorruptRunError(f"staged shard file name {staged.file!r} is not one stage_shard writes")
        return self.path / STAGING / name

    def discard_staged(self, staged: StagedShard | None = None) -> int:
        """Delete one staged file, or every staged file when no worker is running; returns how many."""
        self._writable()
        folder = self.path / STAGING
        if staged is not None:
            files = [self._staged_path(staged)]
        else:
            files = list(folder.iterdir()) if folder.is_dir() else []
        removed = 0
        for file in files:
            if file.is_file():
                file.unlink(missing_ok=True)
                removed += 1
        return removed

    def _set_status(self, status: str, **extra: Any) -> None:
        self._writable()
        self._manifest["status"] = status
        self._manifest.pop("error", None)
        self._manifest.update(extra)
        self._manifest.setdefault("history", []).append(
            {"event": status, "time": extra.get("finished", _now())}
        )
        self._save()

    def mark_complete(self) -> None:
        """Record that the study finished; the explorer lists the run as complete."""
        self._set_status("complete", finished=_now())

    def mark_failed(self, message: str) -> None:
        """Record that the study stopped with an error (kept in the manifest as ``error``)."""
        self._set_status("failed", finished=_now(), error=str(message))

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Leaving a ``with`` block on an exception marks a writable, running run as failed."""
        if exc is not None and not self.read_only and self.status == "running":
            self.mark_failed(f"{exc_type.__name__ if exc_type else 'Error'}: {exc}")

    # -- reading ---------------------------------------------------------------------------------------

    def _files(self, table: str) -> list[Path]:
        """Recorded shard files of ``table``, each checked against its manifest checksum."""
        if table not in SCHEMAS:
            raise ValueError(f"unknown table {table!r}; tables are {sorted(SCHEMAS)}")
        shards = self._manifest["shards"].get(table, {})
        paths = [self._shard_path(table, s) for s in sorted(shards)]
        for path, shard_id in zip(paths, sorted(shards), strict=True):
            self._check_file(path, shards[shard_id]["sha256"])
        return paths

    def _check_file(self, path: Path, sha256: str, *, force: bool = False) -> None:
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise CorruptRunError(f"{path}: shard file is missing (recorded in {MANIFEST})") from None
        key = (stat.st_size, stat.st_mtime_ns, sha256)
        if not force and self._checked.get(path) == key:
            return
        actual = _sha256(path)
        if actual != sha256:
            raise CorruptRunError(
                f"{path}: checksum mismatch (manifest {sha256[:12]}…, file {actual[:12]}…, "
                f"{stat.st_size} bytes): the shard is truncated or was modified"
            )
        self._checked[path] = key

    def table(self, name: str) -> pd.DataFrame:
        """All recorded shards of table ``name`` as one DataFrame (an empty one if none)."""
        paths = self._files(name)
        if not paths:
            return SCHEMAS[name].empty_table().to_pandas()
        with duckdb.connect() as con:
            try:
                return _relation(con, name, paths).df()
            except duckdb.Error as exc:
                raise CorruptRunError(f"cannot read table {name!r} of run {self.path}: {exc}") from exc

    def query(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        """Run DuckDB ``sql`` (``?`` placeholders bound to ``params``) with every table it names
        registered as a view over its recorded shards.

        Only the tables ``sql`` names are registered (their shards verified against the manifest). Each
        view has exactly the columns of ``SCHEMAS[table]`` (a column a run from an older version lacks
        reads as NULL). The views are made with DuckDB's relation API: ``sql`` is the only statement
        this runs.
        """
        with duckdb.connect() as con:
            for table in sorted(SCHEMAS):
                if re.search(rf"\b{re.escape(table)}\b", sql, flags=re.IGNORECASE) is None:
                    continue  # a table the query does not name is neither read nor verified
                paths = self._files(table)
                if not paths:
                    con.register(table, SCHEMAS[table].empty_table())
                    continue
                try:
                    _relation(con, table, paths).create_view(table)
                except duckdb.Error as exc:
                    raise CorruptRunError(f"cannot read table {table!r} of run {self.path}: {exc}") from exc
            return con.execute(sql, list(params)).df()

    def verify(self) -> dict[str, int]:
        """Re-hash and re-read every recorded shard; returns rows per table or raises ``CorruptRunError``.

        Checks presence, checksum, Parquet footer, row count and schema, and names every bad file.
        """
        problems: list[str] = []
        for table, shards in sorted(self._manifest["shards"].items()):
            for shard_id, record in sorted(shards.items()):
                path = self._shard_path(table, shard_id)
                try:
                    self._check_file(path, record["sha256"], force=True)
                    meta = pq.ParquetFile(path)
                    if meta.metadata.num_rows != record["rows"]:
                        raise CorruptRunError(
                            f"{path}: {meta.metadata.num_rows} rows, manifest says {record['rows']}"
                        )
                    if table in SCHEMAS and not meta.schema_arrow.equals(
                        SCHEMAS[table], check_metadata=False
                    ):
                        raise CorruptRunError(f"{path}: schema differs from SCHEMAS[{table!r}]")
                except CorruptRunError as exc:
                    problems.append(str(exc))
                except (OSError, pa.ArrowException) as exc:
                    problems.append(f"{path}: not a readable Parquet file ({exc})")
        if problems:
            raise CorruptRunError(
                f"run {self.path} has {len(problems)} bad shard(s):\n  " + "\n  ".join(problems)
            )
        return self.rows()


_DUCKDB_TYPES = {
    pa.string(): "VARCHAR",
    pa.int8(): "TINYINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
}


def _relation(con: duckdb.DuckDBPyConnection, table: str, paths: list[Path]) -> duckdb.DuckDBPyRelation:
    """The shards of ``table`` as one relation with exactly the columns of ``SCHEMAS[table]``.

    Built with DuckDB's relation and expression API from file paths and schema names only (no SQL
    text); a column that older shards lack reads as NULL of its type.
    """
    rel = con.read_parquet([str(p) for p in paths], union_by_name=len(paths) > 1)
    present = set(rel.columns)
    columns = [
        duckdb.ColumnExpression(f.name)
        if f.name in present
        else duckdb.ConstantExpression(None).cast(duckdb.sqltype(_DUCKDB_TYPES[f.type])).alias(f.name)
        for f in SCHEMAS[table]
    ]
    return rel.select(*columns)


STAGING = ".staging"


def _staged_name(table: str, shard_id: str, token: str) -> str:
    return f"{table}.{shard_id}.{token}.parquet"


@dataclass(frozen=True)
class StagedShard:
    """A validated shard file a worker wrote into ``RUN/.staging/``, waiting for ``Run.commit_shard``."""

    table: str
    shard_id: str
    token: str
    file: str
    rows: int
    bytes: int
    sha256: str


def stage_shard(
    run_path: str | os.PathLike[str], run_name: str, table: str, shard: str | int, data: Any
) -> StagedShard:
    """Validate ``data`` as ``table`` and write it into the run's staging folder (from any process).

    The file is written atomically under a unique name, so two attempts at the same shard never
    collide; only the driver's ``Run.commit_shard`` makes it part of the run.
    """
    shard_id = _shard_id(shard)
    arrow, payload = _parquet_payload(table, data, run_name)
    folder = Path(run_path) / STAGING
    folder.mkdir(exist_ok=True)
    token = uuid.uuid4().hex
    name = _staged_name(table, shard_id, token)
    atomic_write(folder / name, payload)
    return StagedShard(
        table, shard_id, token, name, arrow.num_rows, len(payload), hashlib.sha256(payload).hexdigest()
    )


def _is_temp(name: str) -> bool:
    return _TMP_RE.match(name) is not None


def _has_content(path: Path) -> bool:
    """Anything in the folder besides our own temp files."""
    return any(not _is_temp(entry.name) for entry in path.iterdir())


def _run_has_content(path: Path, manifest: dict[str, Any]) -> bool:
    """A run holds data once a shard is recorded or a figure saved."""
    figures = path / "figures"
    return any(manifest["shards"].values()) or (figures.is_dir() and any(figures.iterdir()))


def _clean_temp_files(path: Path) -> None:
    """Remove temp files left by a writer that died mid-write (never those of a live process)."""
    for folder in [path, *(p for p in path.iterdir() if p.is_dir())]:
        for entry in folder.iterdir():
            match = _TMP_RE.match(entry.name)
            if match and entry.is_file():
                pid = int(match.group(1))
                if pid == os.getpid() or not _pid_alive(pid):
                    entry.unlink(missing_ok=True)


def list_runs(root: str | os.PathLike[str]) -> list[RunInfo]:
    """Runs under ``root`` sorted by folder name, from their manifests; folders without one are skipped.

    A run whose manifest is unreadable, damaged or crafted is listed with status ``"corrupt"`` and the
    reason, so that an explorer can show it as damaged and keep every other run usable. Each run is
    named by its folder (unique under ``root``), even when a copied manifest names another run.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    infos: list[RunInfo] = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (path / MANIFEST).is_file():
            continue
        try:
            manifest = _load_manifest(path)
        except (CorruptRunError, OSError) as exc:
            infos.append(RunInfo(name=path.name, path=path, status="corrupt", created="", error=str(exc)))
            continue
        rows = {t: sum(s["rows"] for s in shards.values()) for t, shards in manifest["shards"].items()}
        infos.append(
            RunInfo(
                name=path.name,
                path=path,
                status=manifest.get("status", "running"),
                created=manifest.get("created", ""),
                rows=rows,
                error=manifest.get("error"),
                manifest_name=manifest["name"],
            )
        )
    return infos
