"""The explorer's reads: DuckDB queries over a run's Parquet tables, cached per run version.

Every query takes ``(path, mtime)``, the run directory and its manifest's modification time in
nanoseconds (``run_ref`` gives both; the reference study's released Huginn-3.5B results, which have
no folder, are ``app.reference.REFERENCE_KEY`` at mtime 0). A study adds shards by rewriting the manifest, so a run that
is still being written gets a new key, and fresh results, as soon as something new is recorded;
a finished run is read once per process. Each query exists twice: ``q_*`` (plain, used by the
benchmark for uncached timings) and the ``st.cache_data``-wrapped name without the prefix (used by
the pages). Reads go through ``probes.store.Run.query``, which checks every shard against its
manifest checksum and raises ``CorruptRunError`` naming the file when one does not match.

Example:
    >>> from app.reference import REFERENCE_KEY
    >>> path, mtime = run_ref(REFERENCE_KEY)
    >>> rows = q_rank_rows(path, mtime, ("logit",), ("final",))
    >>> int(rows["prompt_id"].nunique()), int(rows["unrolled_index"].max()) + 1
    (67, 68)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from app.reference import REFERENCE_KEY, ReferenceRun, is_reference
from lens.errors import LooplensError
from lens.layout import Unrolled, UnrolledLayout
from probes.dataset import last_position_sql
from probes.palette import lens_order, target_order
from probes.store import MANIFEST, Run, RunInfo, list_runs
from probes.trajectory import summarize_samples

__all__ = [
    "choices",
    "depth_accuracy",
    "dynamics_rows",
    "exit_gate_rows",
    "figure_files",
    "find_runs",
    "headline",
    "hover_aggregate",
    "intermediate_table",
    "numeric_table",
    "hover_per_prompt",
    "layout",
    "median_trajectories",
    "open_run",
    "prompt_ranks",
    "prompt_table",
    "prompt_topk",
    "rank_rows",
    "run_ref",
    "verdict_counts",
]

# A token as hover text: HTML-escaped, spaces and newlines made visible.
_TOKEN_SQL = (
    "replace(replace(replace(replace(replace(replace(token, '&', '&amp;'), '<', '&lt;'), '>', '&gt;'), "
    "' ', '␣'), chr(10), '↵'), chr(9), '⇥')"
)


def _cached(fn: Any) -> Any:
    """``st.cache_data`` with the explorer's settings (quiet, bounded)."""
    return st.cache_data(show_spinner=False, max_entries=256)(fn)


class _Params(list):
    """Values bound to a query's ``?`` placeholders: picked lenses, targets and prompt ids come from the
    run's data, so they are passed to DuckDB as parameters, never pasted into the SQL text."""

    def isin(self, column: str, values: Iterable[Any] | None, kind: type = str) -> str:
        """``AND column IN (?, …)`` with the values bound, or nothing when ``values`` is None."""
        if values is None:
            return ""
        vals = [kind(v) for v in values]
        if not vals:
            return " AND FALSE"
        self.extend(vals)
        return f" AND {column} IN ({', '.join('?' * len(vals))})"


# ---------------------------------------------------------------------------------------------- runs


def run_ref(path: str | os.PathLike[str]) -> tuple[str, int]:
    """``(resolved path, manifest mtime in ns)``: the cache key of a run's current contents."""
    if is_reference(path):
        return REFERENCE_KEY, 0
    resolved = Path(path).resolve()
    return str(resolved), (resolved / MANIFEST).stat().st_mtime_ns


def find_runs(root: str | os.PathLike[str]) -> list[RunInfo]:
    """Runs under ``root`` (corrupt manifests included, with status ``corrupt``); [] if none."""
    return list_runs(root)


@functools.lru_cache(maxsize=16)
def open_run(path: str, mtime: int) -> Run | ReferenceRun:
    """One read-only ``Run`` per run version, so shard checksums are verified once per process."""
    del mtime  # part of the cache key only
    if is_reference(path):
        return ReferenceRun.get()
    return Run.open(path)


def _query(path: str, mtime: int, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
    return open_run(path, mtime).query(sql, params)


def q_manifest(path: str, mtime: int) -> dict[str, Any]:
    """The run's manifest (a copy)."""
    return open_run(path, mtime).manifest


def q_layout(path: str, mtime: int) -> Unrolled | None:
    """The model's unrolled layout as the run recorded it (``model.layout``), at the run's depth
    (``settings.steps``); ``None`` for a run that records no layout or no depth (an evaluation run)."""
    manifest = open_run(path, mtime).manifest
    steps = (manifest.get("settings") or {}).get("steps")
    try:
        return UnrolledLayout.from_manifest(manifest).at(int(steps)) if steps else None
    except (LooplensError, TypeError, ValueError):
        return None


def q_exit_gate_rows(path: str, mtime: int, prompt_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """Exit-gate readings (λ_t, p_t, cumulative) at the recorded position, one row per prompt × iteration."""
    params = _Params()
    sql = f"""
    SELECT prompt_id, position, iteration, num_steps, gate_lambda, exit_prob, exit_cdf
    FROM exit_gate WHERE {last_position_sql("exit_gate")} {params.isin("prompt_id", prompt_ids, int)}
    ORDER BY prompt_id, iteration
    """
    return _query(path, mtime, sql, params)


def q_choices(path: str, mtime: int) -> dict[str, list]:
    """Lenses, target kinds and the unrolled layers a run recorded (for the pickers)."""
    pairs = _query(path, mtime, "SELECT DISTINCT lens, target_kind FROM ranks")
    lenses = lens_order(pairs["lens"])
    kinds = target_order(pairs["target_kind"])
    if not lenses:
        lenses = lens_order(_query(path, mtime, "SELECT DISTINCT lens FROM topk")["lens"])
    return {"lenses": list(lenses), "target_kinds": list(kinds)}


def q_prompt_table(path: str, mtime: int) -> pd.DataFrame:
    """One row per prompt: text, expected answer, intermediate, generated, correct, verdict, and the
    reason a ``looplens probe`` prompt was not probed (``error``)."""
    sql = f"""
    WITH ids AS (SELECT prompt_id FROM ranks UNION SELECT prompt_id FROM dynamics UNION SELECT prompt_id FROM topk
                 UNION SELECT prompt_id FROM prompts),
    a AS (SELECT prompt_id, any_value(prompt) AS prompt, any_value(expected) AS expected,
                 any_value(generated) AS generated, bool_and(correct) AS correct,
                 any_value(intermediate) AS intermediate
          FROM answers WHERE purpose = 'probe' GROUP BY prompt_id),
    v AS (SELECT prompt_id, any_value(verdict) AS verdict FROM verdicts WHERE {last_position_sql("verdicts")}
          GROUP BY prompt_id)
    SELECT ids.prompt_id, coalesce(p.prompt_text, a.prompt) AS prompt_text, p.context, p.task,
           coalesce(p.completion, a.expected) AS expected, coalesce(p.intermediate, a.intermediate) AS intermediate,
           a.generated, a.correct, v.verdict, m.error
    FROM ids LEFT JOIN prompts p USING (prompt_id) LEFT JOIN a USING (prompt_id) LEFT JOIN v USING (prompt_id)
         LEFT JOIN prompt_meta m USING (prompt_id)
    ORDER BY ids.prompt_id
    """
    frame = _query(path, mtime, sql)
    frame["label"] = [_prompt_label(row) for row in frame.itertuples()]
    return frame


def _prompt_label(row: Any) -> str:
    text = row.context if isinstance(row.context, str) and row.context else row.prompt_text
    text = " ".join(str(text).split()) if isinstance(text, str) else ""
    if len(text) > 60:
        text = "…" + text[-59:]
    mark = "" if row.correct is None or pd.isna(row.correct) else (" ✓" if row.correct else " ✗")
    return f"#{row.prompt_id} {text}{mark}".strip()


def q_rank_rows(
    path: str,
    mtime: int,
    lenses: Sequence[str],
    target_kinds: Sequence[str],
    prompt_ids: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Rank of each target at every unrolled block output (one row per prompt × layer × lens × target)."""
    params = _Params()
    sql = f"""
    SELECT prompt_id, lens, target_kind, unrolled_index, site, iteration, block, rank, logprob
    FROM ranks
    WHERE unrolled_index >= 0 AND {last_position_sql("ranks")}
      {params.isin("lens", lenses)}{params.isin("target_kind", target_kinds)}
      {params.isin("prompt_id", prompt_ids, int)}
    ORDER BY lens, target_kind, prompt_id, unrolled_index
    """
    return _query(path, mtime, sql, params)


def q_hover_per_prompt(
    path: str, mtime: int, lenses: Sequence[str], prompt_ids: Sequence[int] | None = None
) -> pd.DataFrame:
    """``lens, prompt_id, unrolled_index, top``: the decoded top-k tokens (with probabilities) as hover text."""
    params = _Params()
    sql = f"""
    SELECT lens, prompt_id, unrolled_index,
           string_agg(CASE WHEN logprob IS NULL THEN printf('%d. %s', k, {_TOKEN_SQL})
                           ELSE printf('%d. %s  p = %.3f', k, {_TOKEN_SQL}, exp(logprob)) END,
                      '<br>' ORDER BY k) AS top
    FROM topk
    WHERE unrolled_index >= 0 AND {last_position_sql("topk")}
      {params.isin("lens", lenses)}{params.isin("prompt_id", prompt_ids, int)}
    GROUP BY ALL
    """
    return _query(path, mtime, sql, params)


def q_hover_aggregate(
    path: str, mtime: int, lenses: Sequence[str], prompt_ids: Sequence[int] | None = None
) -> pd.DataFrame:
    """``lens, unrolled_index, top``: the most frequent top-1 tokens over the prompts, in words
    (``' 7'  top-1 in 15 of 20 prompts, mean p = 0.83``)."""
    params = _Params()
    sql = f"""
    WITH t AS (SELECT lens, unrolled_index, {_TOKEN_SQL} AS tok, count(*) AS n, avg(exp(logprob)) AS p
               FROM topk
               WHERE k = 1 AND unrolled_index >= 0 AND {last_position_sql("topk")}
                 {params.isin("lens", lenses)}{params.isin("prompt_id", prompt_ids, int)}
               GROUP BY ALL),
    r AS (SELECT *, row_number() OVER (PARTITION BY lens, unrolled_index ORDER BY n DESC, p DESC) AS i,
                 sum(n) OVER (PARTITION BY lens, unrolled_index) AS total FROM t)
    SELECT lens, unrolled_index,
           string_agg(printf('%s  top-1 in %d of %d prompts', tok, n, total)
                      || CASE WHEN p IS NULL THEN '' ELSE printf(', mean p = %.2f', p) END,
                      '<br>' ORDER BY i) AS top
    FROM r WHERE i <= 5 GROUP BY ALL
    """
    return _query(path, mtime, sql, params)


def q_median_trajectories(path: str, mtime: int) -> pd.DataFrame:
    """Median rank over all prompts with its 95 % bootstrap interval, per lens × target × unrolled layer.

    DuckDB only collects each layer's ranks; the summary is ``probes.trajectory.summarize_samples``,
    the one the study figures use, so the overview and ``figures/rank_trajectory.png`` agree exactly.
    """
    sql = f"""
    SELECT lens, target_kind, unrolled_index, any_value(site) AS site, any_value(iteration) AS iteration,
           any_value(block) AS block, list(rank) AS ranks
    FROM ranks WHERE unrolled_index >= 0 AND {last_position_sql("ranks")}
    GROUP BY lens, target_kind, unrolled_index
    ORDER BY lens, target_kind, unrolled_index
    """
    groups = _query(path, mtime, sql)
    summary = summarize_samples(list(groups.pop("ranks")))
    for name in ("median", "ci_low", "ci_high", "n"):
        groups[name] = summary[name]
    return groups


def q_dynamics_rows(path: str, mtime: int, prompt_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """Per-iteration latent rows (step norm, cosine to last, norm, PCs) with the trajectory's verdict."""
    params = _Params()
    sql = f"""
    SELECT d.prompt_id, d.position, d.site, d.iteration, d.step_norm, d.cos_to_last, d.norm,
           d.pc1, d.pc2, d.pc3, v.verdict
    FROM dynamics d LEFT JOIN verdicts v USING (prompt_id, position, site)
    WHERE TRUE {params.isin("d.prompt_id", prompt_ids, int)}
    ORDER BY d.prompt_id, d.position, d.site, d.iteration
    """
    return _query(path, mtime, sql, params)


def q_depth_accuracy(path: str, mtime: int) -> pd.DataFrame:
    """Accuracy per task and number of iterations: the answers generated to measure it (purpose
    ``depth`` in a study, ``eval`` in an evaluation run), not those of the probed prompts."""
    sql = """
    SELECT task, num_steps, count(*) AS n, avg(CAST(correct AS DOUBLE)) AS accuracy
    FROM answers WHERE purpose IN ('depth', 'eval') GROUP BY task, num_steps ORDER BY task, num_steps
    """
    return _query(path, mtime, sql)


def q_verdict_counts(path: str, mtime: int) -> pd.DataFrame:
    """How many latent trajectories end at a fixed point, in a cycle, or still drifting."""
    return _query(path, mtime, "SELECT verdict, count(*) AS n FROM verdicts GROUP BY verdict ORDER BY n DESC")


def q_headline(path: str, mtime: int) -> dict[str, Any]:
    """Headline numbers: prompts, accuracy on the probed prompts, rows, and per lens where the answer settles."""
    run = open_run(path, mtime)
    acc = _query(
        path,
        mtime,
        """
        SELECT count(*) AS n, avg(CAST(correct AS DOUBLE)) AS accuracy FROM answers WHERE purpose = 'probe'""",
    )
    n_prompts = _query(path, mtime, "SELECT count(DISTINCT prompt_id) AS n FROM ranks")["n"].item()
    medians = q_median_trajectories(path, mtime)
    settle: dict[str, dict[str, Any]] = {}
    for lens, group in medians.groupby("lens", sort=False):
        kinds = group["target_kind"].unique()
        kind = next((k for k in ("final", "predicted") if k in kinds), None)
        if kind is None:
            continue
        rows = group[group["target_kind"] == kind].sort_values("unrolled_index")
        top = rows[rows["median"] <= 1]
        first = top.iloc[0] if len(top) else None
        settle[str(lens)] = {
            "target_kind": kind,
            "final_median_rank": float(rows["median"].iloc[-1]),
            "first_top1_layer": None if first is None else int(first["unrolled_index"]),
            "first_top1_site": None
            if first is None
            else (
                f"{first['site']} · t={int(first['iteration'])}"
                if str(first["site"]).startswith("core")
                else str(first["site"])
            ),
            "layers": int(rows["unrolled_index"].max()) + 1,
        }
    n_acc = int(acc["n"].iloc[0]) if len(acc) else 0
    return {
        "prompts": int(n_prompts or 0),
        "accuracy": float(acc["accuracy"].iloc[0]) if n_acc else None,
        "answered": n_acc,
        "rows": run.rows(),
        "settle": settle,
    }


def q_prompt_topk(path: str, mtime: int, prompt_id: int, lenses: Sequence[str] | None = None) -> pd.DataFrame:
    """One prompt's decoded top-k tokens at every layer it recorded (block outputs, ``latent``,
    ``final``), at its last position: ``lens, unrolled_index, site, iteration, block, k, token, token_id,
    prob`` (``prob`` is NULL where a run recorded no probabilities, as in the reference study)."""
    params = _Params([int(prompt_id)])
    sql = f"""
    SELECT lens, unrolled_index, site, iteration, block, k, token, token_id, exp(logprob) AS prob
    FROM topk WHERE prompt_id = ? AND {last_position_sql("topk")} {params.isin("lens", lenses)}
    ORDER BY lens, unrolled_index, site, k
    """
    return _query(path, mtime, sql, params)


def q_prompt_ranks(path: str, mtime: int, prompt_id: int) -> pd.DataFrame:
    """Every lens and target of one prompt, at block outputs (its rank trajectories), with the target
    token and its probability."""
    params = _Params([int(prompt_id)])
    sql = f"""
    SELECT prompt_id, lens, target_kind, token, unrolled_index, site, iteration, block, rank,
           exp(logprob) AS prob, entropy
    FROM ranks WHERE prompt_id = ? AND unrolled_index >= 0 AND {last_position_sql("ranks")}
    ORDER BY lens, target_kind, unrolled_index
    """
    return _query(path, mtime, sql, params)


def q_intermediate_table(path: str, mtime: int) -> pd.DataFrame:
    """The study's intermediate-vs-final-vs-control table (``studies.figures.intermediate_vs_final``) of
    the run: median rank with its bootstrap interval per lens, core block, iteration and target, on the
    correctly answered problems. Empty when the run tracked no intermediate results."""
    from studies.figures import intermediate_vs_final

    layout = q_study_layout(path, mtime)
    if layout is None:
        return pd.DataFrame(columns=intermediate_vs_final.COLUMNS)
    ranks = _query(
        path,
        mtime,
        f"""SELECT prompt_id, position, site, iteration, block, unrolled_index, lens, target_kind, token_id, rank
        FROM ranks WHERE unrolled_index >= 0 AND {last_position_sql("ranks")}
          AND (target_kind IN ('final', 'intermediate', 'intermediate_alt', 'control')
               OR regexp_matches(target_kind, '^digit_[0-9]$'))""",
    )
    if not (ranks["target_kind"].isin(["intermediate", "intermediate_alt"])).any():
        return pd.DataFrame(columns=intermediate_vs_final.COLUMNS)
    answers = _query(
        path,
        mtime,
        "SELECT prompt_id, num_steps, correct, expected, intermediate FROM answers WHERE purpose = 'probe'",
    )
    return intermediate_vs_final.table({"ranks": ranks, "answers": answers}, layout)


def q_numeric_table(path: str, mtime: int) -> pd.DataFrame:
    """The study's numeric-prefix table (``studies.figures.numeric_prefix``): the share of top-5 decodings
    that are digits or a minus sign, per lens and unrolled layer."""
    from studies.figures import numeric_prefix

    layout = q_study_layout(path, mtime)
    if layout is None:
        return pd.DataFrame(columns=numeric_prefix.COLUMNS)
    topk = _query(
        path,
        mtime,
        f"""SELECT prompt_id, position, site, iteration, block, unrolled_index, lens, k, token
        FROM topk WHERE unrolled_index >= 0 AND k <= 5 AND {last_position_sql("topk")}""",
    )
    return numeric_prefix.table({"topk": topk}, layout)


def q_study_layout(path: str, mtime: int) -> Any:
    """``q_layout`` as the study figures take it (``studies.figures.Layout``), or ``None``."""
    from studies.figures.layout import Layout

    unrolled = q_layout(path, mtime)
    return None if unrolled is None else Layout(unrolled.layout, unrolled.steps)


def figure_files(path: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """The study's saved figures by kind (``png``, ``html``, ``parquet``), sorted by name (none for the
    reference study, which is not a folder).

    A ``.png`` that is not a readable PNG image (truncated, or another file under that name) is
    listed under ``damaged`` instead, so the page shows the other figures and names that one.
    """
    folder = Path(path) / "figures"
    out: dict[str, list[Path]] = {"png": [], "html": [], "parquet": [], "damaged": []}
    if not is_reference(path) and folder.is_dir():
        for kind in ("png", "html", "parquet"):
            out[kind] = sorted(p for p in folder.glob(f"*.{kind}") if p.is_file())
        out["damaged"] = [p for p in out["png"] if not _is_png(p)]
        out["png"] = [p for p in out["png"] if p not in out["damaged"]]
    return out


def _is_png(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return False
            image.verify()
        return True
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return False


# The cached versions the pages call.
manifest = _cached(q_manifest)
layout = _cached(q_layout)
exit_gate_rows = _cached(q_exit_gate_rows)
choices = _cached(q_choices)
prompt_table = _cached(q_prompt_table)
rank_rows = _cached(q_rank_rows)
hover_per_prompt = _cached(q_hover_per_prompt)
hover_aggregate = _cached(q_hover_aggregate)
median_trajectories = _cached(q_median_trajectories)
dynamics_rows = _cached(q_dynamics_rows)
depth_accuracy = _cached(q_depth_accuracy)
verdict_counts = _cached(q_verdict_counts)
headline = _cached(q_headline)
prompt_topk = _cached(q_prompt_topk)
prompt_ranks = _cached(q_prompt_ranks)
intermediate_table = _cached(q_intermediate_table)
numeric_table = _cached(q_numeric_table)

#: name → (uncached, cached) for the benchmark.
QUERIES = {
    "manifest": (q_manifest, manifest),
    "layout": (q_layout, layout),
    "exit_gate_rows": (q_exit_gate_rows, exit_gate_rows),
    "choices": (q_choices, choices),
    "prompt_table": (q_prompt_table, prompt_table),
    "rank_rows": (q_rank_rows, rank_rows),
    "hover_per_prompt": (q_hover_per_prompt, hover_per_prompt),
    "hover_aggregate": (q_hover_aggregate, hover_aggregate),
    "median_trajectories": (q_median_trajectories, median_trajectories),
    "dynamics_rows": (q_dynamics_rows, dynamics_rows),
    "depth_accuracy": (q_depth_accuracy, depth_accuracy),
    "verdict_counts": (q_verdict_counts, verdict_counts),
    "headline": (q_headline, headline),
    "prompt_topk": (q_prompt_topk, prompt_topk),
    "prompt_ranks": (q_prompt_ranks, prompt_ranks),
    "intermediate_table": (q_intermediate_table, intermediate_table),
    "numeric_table": (q_numeric_table, numeric_table),
}
