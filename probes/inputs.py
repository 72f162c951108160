"""Prompts from a researcher's own files: JSONL, JSON, CSV, Parquet, or a Hugging Face dataset on disk.

Each row needs a ``prompt`` (text; another column name can be chosen). Optional targets:

- ``target``: one target, tracked as target kind ``"target"``;
- ``targets``: several, as a list (kinds ``target_0``, ``target_1``, …) or as an object naming each
  kind (``{"correct": " Paris", "distractor": " Rome"}``).

A target is text (its first token is tracked) or an integer token id. CSV cells are always text, so
a ``targets`` cell in a CSV holds a JSON list or object, and an empty cell means no target. Every other column is carried through as
metadata (stored as JSON with the prompt). Reading checks everything that can be checked without a
model and raises one :class:`~lens.errors.InputError` naming the file, row and column at fault.

Example:
    >>> rows = read_prompts([{"prompt": "Question: What is 2 plus 3?\\nAnswer:", "target": " 5", "id": "a"}])
    >>> rows.texts[0][-7:], rows.targets[0], rows.metadata[0]
    ('Answer:', {'target': ' 5'}, {'id': 'a'})
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lens.errors import InputError

__all__ = ["PromptSet", "TargetValue", "read_prompts"]

TargetValue = str | int
_KIND_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_RESERVED_KINDS = {"predicted"}  # the model's own prediction is always tracked under this kind
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class PromptSet:
    """Prompts with their targets (kind → text or token id) and metadata, row by row."""

    texts: list[str]
    targets: list[dict[str, TargetValue]] = field(default_factory=list)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    source: str = "prompts"
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def target_kinds(self) -> list[str]:
        """Every target kind any row names, in order of first appearance."""
        kinds: dict[str, None] = {}
        for row in self.targets:
            kinds.update(dict.fromkeys(row))
        return list(kinds)


def read_prompts(
    source: str | Path | Sequence[str] | Sequence[Mapping[str, Any]] | pd.DataFrame,
    prompt_column: str = "prompt",
    split: str | None = None,
) -> PromptSet:
    """Read prompts from a file, a dataset folder, a DataFrame or a list of texts or row dicts.

    ``split`` picks the split of a saved ``datasets.DatasetDict`` (needed when it has several).
    """
    name = "prompts"
    if isinstance(source, str | Path):
        path = Path(source)
        name = path.stem or path.name
        rows = _read_path(path, prompt_column, split)
        where = str(path)
    elif isinstance(source, pd.DataFrame):
        rows, where = _frame_rows(source), "the DataFrame"
    elif isinstance(source, Sequence) and not isinstance(source, bytes):
        where = "the prompt list"
        rows = [{prompt_column: r} if isinstance(r, str) else r for r in source]
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise InputError(f"{where}, row {i}: expected a text or a mapping, got {type(row).__name__}")
    else:
        raise InputError(
            f"prompts must be a file path, a DataFrame or a list of texts or rows, not {type(source).__name__}"
        )
    return _build(rows, prompt_column, where, name, from_csv=where.endswith(".csv"))


# ---------------------------------------------------------------------------------------------- reading


def _read_path(path: Path, prompt_column: str, split: str | None) -> Sequence[Mapping[str, Any]]:
    if not path.exists():
        raise InputError(f"prompt file not found: {path}")
    if path.is_dir():
        return _read_dataset_dir(path, split)
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise InputError(
            f"cannot read prompts from {path}: unknown file type {path.suffix or '(none)'}; "
            f"use {', '.join(sorted(_SUFFIXES))} or a Hugging Face dataset folder"
        )
    try:
        if kind == "jsonl":
            return _read_jsonl(path)
        if kind == "json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise InputError(f"{path}: a JSON prompt file must hold a list of objects")
            return data
        if kind == "csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
            return _frame_rows(frame)
        import pyarrow.parquet as pq

        return _frame_rows(pq.read_table(path).to_pandas())
    except InputError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(f"cannot read prompts from {path}: {exc}") from exc
    except Exception as exc:  # pyarrow raises its own error types for a damaged Parquet file
        if type(exc).__module__.startswith("pyarrow"):
            raise InputError(f"cannot read prompts from {path}: {exc}") from exc
        raise


def _read_jsonl(path: Path) -> Sequence[Mapping[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}, line {number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise InputError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_dataset_dir(path: Path, split: str | None) -> Sequence[Mapping[str, Any]]:
    """A dataset saved with ``datasets``' ``save_to_disk`` (``Dataset`` or ``DatasetDict``)."""
    if not any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        raise InputError(
            f"{path} is a folder but not a saved Hugging Face dataset (no dataset_info.json or "
            "dataset_dict.json); pass a .jsonl, .csv or .parquet file"
        )
    try:
        import datasets
    except ImportError as exc:
        raise InputError(
            f"{path} is a Hugging Face dataset; reading it needs the datasets package: "
            'pip install "looplens[datasets]"'
        ) from exc
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise InputError(f"cannot read the dataset at {path}: {exc}") from exc
    if isinstance(data, datasets.DatasetDict):
        names = list(data)
        if split is None and len(names) == 1:
            split = names[0]
        if split not in data:
            raise InputError(f"{path} holds the splits {names}; choose one with --split")
        data = data[split]
    elif split is not None:
        raise InputError(f"{path} holds a single dataset without splits; drop --split {split}")
    return _frame_rows(data.to_pandas())


def _frame_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    frame.columns = [str(c) for c in frame.columns]
    return frame.to_dict("records")


# ---------------------------------------------------------------------------------------------- checking


def _plain(value: Any) -> Any:
    """numpy / pandas values → JSON-able Python values (``None`` for missing)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NaT:
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _target_value(value: Any, where: str) -> TargetValue | None:
    value = _plain(value)
    if value is None:
        return None
    if isinstance(value, bool):
        raise InputError(f"{where}: a target is text or a token id, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        if value == "":
            raise InputError(f"{where}: the target is empty text, which tokenises to nothing")
        return value
    raise InputError(f"{where}: a target is text or a token id, not {type(value).__name__} {value!r}")


def _targets_of(row: Mapping[str, Any], where: str, from_csv: bool) -> dict[str, TargetValue]:
    out: dict[str, TargetValue] = {}
    if "target" in row and not (from_csv and row["target"] == ""):  # an empty CSV cell: no target
        value = _target_value(row["target"], f"{where}, column 'target'")
        if value is not None:
            out["target"] = value
    if "targets" in row:
        many = _plain(row["targets"])
        if from_csv and isinstance(many, str):
            if not many.strip():
                many = None
            else:
                try:
                    many = json.loads(many)
                except json.JSONDecodeError as exc:
                    raise InputError(
                        f"{where}, column 'targets': a CSV cell must hold a JSON list or object ({exc.msg})"
                    ) from exc
        if isinstance(many, list):
            many = {f"target_{i}": v for i, v in enumerate(many)}
        if many is None:
            return out
        if not isinstance(many, Mapping):
            raise InputError(
                f"{where}, column 'targets': expected a list or an object of targets, got {type(many).__name__}"
            )
        for kind, value in many.items():
            if not isinstance(kind, str) or not _KIND_RE.match(kind) or kind in _RESERVED_KINDS:
                raise InputError(
                    f"{where}, column 'targets': target kind {kind!r} must be letters, digits, _ or - "
                    f"starting with a letter, and not {sorted(_RESERVED_KINDS)}"
                )
            if kind in out:
                raise InputError(f"{where}: target kind {kind!r} is given twice")
            checked = _target_value(value, f"{where}, target {kind!r}")
            if checked is not None:
                out[kind] = checked
    return out


def _build(
    rows: Sequence[Mapping[str, Any]], prompt_column: str, where: str, name: str, from_csv: bool
) -> PromptSet:
    if not rows:
        raise InputError(f"{where} holds no prompts")
    columns: dict[str, None] = {}
    for row in rows[:1000]:
        columns.update(dict.fromkeys(str(k) for k in row))
    if prompt_column not in columns:
        raise InputError(
            f"{where} has no {prompt_column!r} column (columns: {', '.join(columns) or 'none'}); "
            "name the prompt column with --prompt-column"
        )
    texts, targets, metadata = [], [], []
    digest = hashlib.sha256()
    for i, row in enumerate(rows):
        at = f"{where}, row {i}"
        text = _plain(row.get(prompt_column))
        if not isinstance(text, str):
            raise InputError(f"{at}: the {prompt_column!r} value must be text, got {text!r}")
        if not text.strip():
            raise InputError(f"{at}: the prompt is empty")
        tgt = _targets_of(row, at, from_csv)
        meta = {str(k): _plain(v) for k, v in row.items() if k not in (prompt_column, "target", "targets")}
        try:
            meta_json = json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str)
        except ValueError as exc:
            raise InputError(f"{at}: metadata cannot be written as JSON ({exc})") from exc
        texts.append(text)
        targets.append(tgt)
        metadata.append(json.loads(meta_json))
        digest.update(json.dumps([text, tgt, meta_json], ensure_ascii=False, sort_keys=True).encode())
        digest.update(b"\n")
    return PromptSet(texts, targets, metadata, name, digest.hexdigest()[:16])
