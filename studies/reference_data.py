"""The reference study's released Huginn-3.5B results, in looplens table shapes.

"Latent Chain-of-Thought? Decoding the Depth-Recurrent Transformer" (wenquanlu/huginn-latent-cot,
Apache-2.0) released its per-layer ranks and top-5 decodings as pickles; ``studies/reference/
huginn-latent-cot/`` holds them converted to JSON, numbers unchanged (see ``SOURCE.md`` there).
This module reads them into the tables the figures take (``ranks``, ``topk``, ``answers``), so
figures 1–3 can be drawn for Huginn-3.5B exactly as for our runs, and side by side with them.

Two prompt sets, two id ranges:

- ids ``0..99``: the 100 one-digit composite problems whose ``predicted`` target (the model's own
  first answer token) was ranked (logit lens: 68 layers = prelude, 16 × 4 core, coda; coda lens:
  66 = prelude + core) and top-5 decoded (logit 68 layers, coda lens 64 core layers only);
- ids ``100..166``: the 67 filtered, correctly answered problems whose ``final``,
  ``intermediate`` (already the min over "d" and " d") and ``control`` ("the", no space) targets were
  ranked (logit lens 68 layers, coda lens 64 core layers). Their answers are in
  :func:`load_reference_answers` (all correct). The reference recorded no digit baseline.

Example:
    >>> ranks = load_reference_ranks()
    >>> int(ranks[(ranks.lens == "logit") & (ranks.target_kind == "predicted")].prompt_id.nunique())
    100
    >>> HUGINN_LAYOUT.n_unrolled
    68
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from lens.config import RecurrentDepthConfig
from lens.families.huginn import huginn_layout
from studies.figures.layout import Layout

__all__ = [
    "FILTERED_ID_OFFSET",
    "HUGINN_LAYOUT",
    "REFERENCE_DIR",
    "REFERENCE_NAME",
    "load_reference_answers",
    "load_reference_ranks",
    "load_reference_topk",
    "reference_tables",
]

REFERENCE_DIR = Path(__file__).resolve().parent / "reference" / "huginn-latent-cot"
REFERENCE_NAME = "Huginn-3.5B (reference study)"
#: Huginn-3.5B (the packaged config, prelude 2 · core 4 · coda 2) at the study's 16 iterations.
HUGINN_LAYOUT = Layout(
    huginn_layout(RecurrentDepthConfig.from_name("huginn-0125")),
    steps=16,
)
FILTERED_ID_OFFSET = 100
N_FEWSHOT = 4

# (file, lens, target_kind, which layers the entries cover)
_RANK_FILES = [
    ("arithmetic_rank_results_16.json", "logit", "predicted", "all"),
    ("coda_arithmetic_rank_16_with_prelude.json", "coda", "predicted", "prelude+core"),
    ("arithmetic_correct_rank_results_16.json", "logit", "final", "all"),
    ("arithmetic_inter_rank_results_16.json", "logit", "intermediate", "all"),
    ("arithmetic_the_rank_results_16.json", "logit", "control", "all"),
    ("coda_arithmetic_correct_rank_16.json", "coda", "final", "core"),
    ("coda_arithmetic_inter_rank_16.json", "coda", "intermediate", "core"),
    ("coda_arithmetic_the_rank_16.json", "coda", "control", "core"),
]
_TOPK_FILES = [
    ("arithmetic_results_top5_16.json", "logit", "all"),
    # named "with_prelude" in the release, yet it holds 64 entries: the core layers only
    ("coda_arithmetic_results_top5_16_with_prelude.json", "coda", "core"),
]


def _read(name: str) -> list:
    path = REFERENCE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"reference file {path} is missing (copy it from shared/reference/huginn-latent-cot/)"
        )
    with path.open() as f:
        return json.load(f)


def _layers(span: str, layout: Layout = HUGINN_LAYOUT) -> pd.DataFrame:
    frame = layout.frame()
    keep = {"all": ("prelude", "core", "coda"), "prelude+core": ("prelude", "core"), "core": ("core",)}[span]
    return frame[frame["stage"].isin(keep)].reset_index(drop=True)


def _long(values: np.ndarray, span: str, lens: str, id_offset: int) -> pd.DataFrame:
    """``[prompts, layers]`` (or ``[prompts, layers, k]``) → tidy rows with site/iteration/block."""
    layers = _layers(span)
    if values.shape[1] != len(layers):
        raise ValueError(
            f"{lens} lens: {values.shape[1]} entries per prompt, expected {len(layers)} for {span}"
        )
    n_prompts, n_layers = values.shape[:2]
    rest = values.shape[2:]
    reps = int(np.prod(rest)) if rest else 1
    layer_idx = np.tile(np.repeat(np.arange(n_layers), reps), n_prompts)
    out = pd.DataFrame(
        {
            "prompt_id": np.repeat(np.arange(n_prompts) + id_offset, n_layers * reps).astype(np.int64),
            "position": np.int64(-1),
            **{c: layers[c].to_numpy()[layer_idx] for c in ("site", "iteration", "block", "unrolled_index")},
            "lens": lens,
        }
    )
    if rest:
        out["k"] = np.tile(np.arange(1, reps + 1), n_prompts * n_layers).astype(np.int64)
    return out.assign(_value=values.reshape(-1))


@lru_cache(maxsize=1)
def _ranks() -> pd.DataFrame:
    frames = []
    for name, lens, kind, span in _RANK_FILES:
        values = np.asarray(_read(name), dtype=np.int64)
        offset = 0 if kind == "predicted" else FILTERED_ID_OFFSET
        frames.append(
            _long(values, span, lens, offset).assign(target_kind=kind).rename(columns={"_value": "rank"})
        )
    out = pd.concat(frames, ignore_index=True)
    columns = [
        "prompt_id",
        "position",
        "site",
        "iteration",
        "block",
        "unrolled_index",
        "lens",
        "target_kind",
        "rank",
    ]
    return out[columns]


def load_reference_ranks() -> pd.DataFrame:
    """Ranks-shaped table of every released rank (1-based), Huginn-3.5B at 16 iterations.

    Columns: prompt_id, position (-1: the last prompt token), site, iteration, block,
    unrolled_index (in :data:`HUGINN_LAYOUT`), lens (logit / coda), target_kind (predicted, final,
    intermediate, control), rank.
    """
    return _ranks().copy()


@lru_cache(maxsize=1)
def _topk() -> pd.DataFrame:
    frames = []
    for name, lens, span in _TOPK_FILES:
        values = np.asarray(_read(name), dtype=object)
        frames.append(_long(values, span, lens, 0).rename(columns={"_value": "token"}))
    out = pd.concat(frames, ignore_index=True)
    out["token"] = out["token"].astype(str)
    return out[
        ["prompt_id", "position", "site", "iteration", "block", "unrolled_index", "lens", "k", "token"]
    ]


def load_reference_topk() -> pd.DataFrame:
    """Topk-shaped table of the released top-5 decoded strings (no token ids were released)."""
    return _topk().copy()


def load_reference_answers() -> pd.DataFrame:
    """Answers-shaped rows of the 67 filtered problems (ids 100..166; all answered correctly)."""
    rows = _read("filtered_arithmetic_dataset.json")[N_FEWSHOT:]
    return pd.DataFrame(
        {
            "prompt_id": np.arange(len(rows), dtype=np.int64) + FILTERED_ID_OFFSET,
            "task": "arithmetic_1dc",
            "num_steps": HUGINN_LAYOUT.steps,
            "prompt": [r["context"] for r in rows],
            "expected": [r["completion"].strip() for r in rows],
            "generated": [r["completion"].strip() for r in rows],
            "correct": True,
            "first_token_id": np.int64(-1),
            "intermediate": [r.get("intermediate") for r in rows],
        }
    )


def reference_tables() -> dict[str, pd.DataFrame]:
    """``{"ranks", "topk", "answers"}`` for :func:`studies.figures.render_all` with :data:`HUGINN_LAYOUT`."""
    return {
        "ranks": load_reference_ranks(),
        "topk": load_reference_topk(),
        "answers": load_reference_answers(),
    }
