"""The reference study's released Huginn-3.5B results, opened in the explorer like any run.

``studies.reference_data`` reads the released ranks and top-5 decodings (numbers unchanged) into
run-table shapes; :class:`ReferenceRun` serves them through the same ``query(sql, params)`` as
``probes.store.Run`` (DuckDB, the tables registered in memory, nothing written anywhere), with a
manifest that records Huginn-3.5B's layout at the study's 16 iterations. Columns the release does not
have (probabilities, token ids, entropies, generated answers of the 100 unfiltered problems) read as
NULL, as in a run written by an older version.

Two prompt sets live in it: ids ``0..99`` (the model's own first answer token, ``predicted``) and
``100..166`` (67 correctly answered problems with ``final``, ``intermediate`` and ``control`` targets;
their texts and answers were released).

Example:
    >>> run = ReferenceRun.get()
    >>> run.query("SELECT count(DISTINCT prompt_id) AS n FROM ranks")["n"].item()
    167
    >>> run.manifest["model"]["layout"]["core"], run.manifest["settings"]["steps"]
    (4, 16)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from probes.records import SCHEMAS
from probes.store import RunInfo

__all__ = ["REFERENCE_KEY", "REFERENCE_NAME", "ReferenceRun", "is_reference", "reference_info"]

#: Where the data layer finds the reference run (it has no folder: this key stands for its path).
REFERENCE_KEY = "reference:huginn-latent-cot"
#: Its name in the run pickers.
REFERENCE_NAME = "Huginn-3.5B · reference study (released)"
_CREATED = "2025-07-01"  # when the reference study released its results (for ordering only)


def is_reference(path: str | Path | None) -> bool:
    return path is not None and str(path) == REFERENCE_KEY


def _nullable(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_nullable(True) for f in schema])


def _as_table(name: str, frame: pd.DataFrame) -> pa.Table:
    """``frame`` with exactly the columns of ``SCHEMAS[name]`` (those it lacks as NULL)."""
    schema = _nullable(SCHEMAS[name])
    columns = {}
    for f in schema:
        if f.name == "run":
            columns[f.name] = pa.array([REFERENCE_NAME] * len(frame), type=f.type)
        elif f.name in frame.columns:
            columns[f.name] = pa.Array.from_pandas(frame[f.name], type=f.type)
        else:
            columns[f.name] = pa.nulls(len(frame), type=f.type)
    return pa.table(columns, schema=schema)


class ReferenceRun:
    """A read-only, in-memory run of the reference study's released results (see the module doc)."""

    def __init__(self, tables: dict[str, pa.Table], manifest: dict[str, Any]) -> None:
        self._tables = tables
        self._manifest = manifest
        self.path = REFERENCE_KEY
        self.name = REFERENCE_NAME

    @classmethod
    @functools.cache
    def get(cls) -> ReferenceRun:
        """The reference run, built once per process from ``studies/reference/huginn-latent-cot``."""
        from studies.reference_data import (
            FILTERED_ID_OFFSET,
            HUGINN_LAYOUT,
            load_reference_answers,
            load_reference_ranks,
            load_reference_topk,
        )

        answers = load_reference_answers().assign(purpose="probe")
        prompts = pd.DataFrame(
            {
                "prompt_id": answers["prompt_id"],
                "task": answers["task"],
                "context": answers["prompt"],
                "completion": " " + answers["expected"].astype(str),
                "intermediate": answers["intermediate"],
                "prompt_text": answers["prompt"],
            }
        )
        tables = {
            "ranks": _as_table("ranks", load_reference_ranks()),
            "topk": _as_table("topk", load_reference_topk()),
            "answers": _as_table("answers", answers),
            "prompts": _as_table("prompts", prompts),
        }
        manifest = {
            "format": "looplens-run/1",
            "name": REFERENCE_NAME,
            "created": _CREATED,
            "status": "complete",
            "model": {
                "name": "Huginn-3.5B (huginn-0125)",
                "config_name": "huginn-0125",
                "parameters": None,
                "dtype": "bfloat16",
                "device": "cuda",
                "family": HUGINN_LAYOUT.layout.family,
                "layout": HUGINN_LAYOUT.layout.to_dict(),
            },
            "prompt_template": {"name": "4-shot chat", "kind": "chat", "shots": [None] * 4},
            "settings": {
                "study": "reference",
                "task": "arithmetic_1dc",
                "steps": HUGINN_LAYOUT.steps,
                "lenses": ["logit", "coda"],
                "n": 100 + len(answers),
                "answers_selected": True,  # the filtered problems are those the model answered correctly
            },
            "source": (
                "Released results of 'Latent Chain-of-Thought? Decoding the Depth-Recurrent Transformer' "
                "(wenquanlu/huginn-latent-cot, Apache-2.0), converted to JSON with the numbers unchanged: "
                f"ids 0..{FILTERED_ID_OFFSET - 1} rank the model's own first answer token, ids "
                f"{FILTERED_ID_OFFSET}..{FILTERED_ID_OFFSET + len(answers) - 1} the final answer, the "
                "intermediate result and a control token on problems it answered correctly."
            ),
            "shards": {},
        }
        return cls(tables, manifest)

    @property
    def manifest(self) -> dict[str, Any]:
        return dict(self._manifest)

    @property
    def status(self) -> str:
        return "complete"

    def tables(self) -> list[str]:
        return sorted(self._tables)

    def rows(self) -> dict[str, int]:
        return {name: table.num_rows for name, table in self._tables.items()}

    def table(self, name: str) -> pd.DataFrame:
        table = self._tables.get(name)
        return (table if table is not None else _nullable(SCHEMAS[name]).empty_table()).to_pandas()

    def query(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        """DuckDB ``sql`` over the tables it names (a table the release lacks is empty), like ``Run.query``."""
        with duckdb.connect() as con:
            for name in sorted(SCHEMAS):
                if re.search(rf"\b{re.escape(name)}\b", sql, flags=re.IGNORECASE) is None:
                    continue
                con.register(name, self._tables.get(name, _nullable(SCHEMAS[name]).empty_table()))
            return con.execute(sql, list(params)).df()


def reference_info() -> RunInfo:
    """The reference run as the run pickers list it."""
    run = ReferenceRun.get()
    return RunInfo(
        name=REFERENCE_NAME,
        path=Path(REFERENCE_KEY),
        status="complete",
        created=_CREATED,
        rows=run.rows(),
        manifest_name=REFERENCE_NAME,
    )
