"""Rank summaries: the median rank over prompts with its bootstrap interval, and rank trajectories.

Ranks span 1 … |V| with a long upper tail, so every rank figure, table and explorer page shows the
**median** over prompts with a percentile-bootstrap interval, plus the geometric mean and the share
of top-1. ``median_interval`` and ``summarize_ranks`` are the one implementation of that summary;
the study figures and the explorer call them.

The bootstrap is deterministic: a group of ``n`` values is resampled with the ``n_boot × n`` index
matrix drawn from ``numpy.random.default_rng(seed)``, applied to the group's values in sorted order.
So a group's interval depends only on its own values (not on which other groups are summarised with
it), and the median of a resample is read off two order statistics of its indices, which makes
thousands of groups cheap.

A ``RankTrajectory`` is built from a ``ranks`` table (see ``probes.records``) for one lens and one
target kind, checks its shapes on construction, and knows its summary statistics and how to draw
itself.

Example:
    >>> import numpy as np
    >>> traj = RankTrajectory(unrolled_index=np.arange(3), ranks=np.array([[9, 3, 1], [7, 2, 1]]))
    >>> traj.median().tolist()
    [8.0, 2.5, 1.0]
    >>> med, low, high = median_interval([np.array([1, 2, 3, 4, 100])])
    >>> float(med[0]), bool(low[0] <= med[0] <= high[0])
    (3.0, True)
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float, Int

__all__ = [
    "LEVEL",
    "N_BOOT",
    "SUMMARY_COLUMNS",
    "RankTrajectory",
    "median_interval",
    "summarize_ranks",
    "summarize_samples",
]

#: Bootstrap resamples and interval level of every rank summary.
N_BOOT = 1000
LEVEL = 0.95
#: Columns ``summarize_ranks`` adds to the group keys.
SUMMARY_COLUMNS = ("median", "ci_low", "ci_high", "geo_mean", "top1", "n")


@functools.lru_cache(maxsize=64)
def _resample_middles(n: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``n_boot`` resamples of ``n`` positions: its two middle order statistics."""
    rng = np.random.default_rng(seed)
    low_k, high_k = (n - 1) // 2, n // 2
    lows, highs = [], []
    chunk = max(1, 4_000_000 // n)
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        idx.partition(sorted({low_k, high_k}), axis=1)
        lows.append(idx[:, low_k])
        highs.append(idx[:, high_k])
    low, high = np.concatenate(lows), np.concatenate(highs)
    low.flags.writeable = high.flags.writeable = False
    return low, high


def _check_bootstrap(n_boot: int, level: float) -> None:
    if not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def _grouped_summary(
    values: np.ndarray, codes: np.ndarray, groups: int, n_boot: int, level: float, seed: int
) -> dict[str, np.ndarray]:
    """The rank summary of each group: ``values[i]`` belongs to group ``codes[i]`` (0 .. groups - 1).

    The one implementation behind ``median_interval``, ``summarize_ranks`` and ``summarize_samples``.
    Vectorised: values are sorted once by (group, value); groups of equal size share one resampling
    matrix (the same seed for every group), so the cost does not grow with a Python loop per group.
    """
    _check_bootstrap(n_boot, level)
    values = np.asarray(values, dtype=np.float64).ravel()
    codes = np.asarray(codes, dtype=np.int64).ravel()
    keep = np.isfinite(values)
    values, codes = values[keep], codes[keep]
    order = np.lexsort((values, codes))
    values, codes = values[order], codes[order]
    sizes = np.bincount(codes, minlength=groups)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = {name: np.full(groups, np.nan) for name in ("median", "ci_low", "ci_high", "geo_mean", "top1")}
    out["n"] = sizes
    alpha = (1.0 - level) / 2.0
    for n in np.unique(sizes[sizes > 0]).tolist():
        members = np.flatnonzero(sizes == n)
        grid = values[starts[members][:, None] + np.arange(n)]  # [G, n], each row ascending
        med = (grid[:, (n - 1) // 2] + grid[:, n // 2]) / 2.0
        if n == 1:
            lo = hi = med
        else:
            low_k, high_k = _resample_middles(n, int(n_boot), int(seed))
            boots = (grid[:, low_k] + grid[:, high_k]) / 2.0  # [G, n_boot]: each resample's median
            lo, hi = np.quantile(boots, [alpha, 1.0 - alpha], axis=1)
            lo, hi = np.minimum(lo, med), np.maximum(hi, med)
        out["median"][members], out["ci_low"][members], out["ci_high"][members] = med, lo, hi
        out["geo_mean"][members] = np.exp(np.log(np.maximum(grid, 1.0)).mean(axis=1))
        out["top1"][members] = (grid <= 1.0).mean(axis=1)
    return out


def median_interval(
    samples: Sequence[np.ndarray], n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(median, low, high)`` per sample: the median and its percentile-bootstrap interval.

    Non-finite values are ignored; an empty sample gives NaN, one value gives that value three times.
    The interval is widened, if ever needed, to contain the median (a percentile interval of a
    discrete statistic can miss it by a hair in ties).
    """
    summary = summarize_samples(samples, n_boot=n_boot, level=level, seed=seed)
    return summary["median"], summary["ci_low"], summary["ci_high"]


def summarize_samples(
    samples: Sequence[np.ndarray], *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0
) -> dict[str, np.ndarray]:
    """The rank summary (``SUMMARY_COLUMNS``, each an array over the samples) of each sample."""
    arrays = [np.asarray(x, dtype=np.float64).ravel() for x in samples]
    sizes = np.array([x.size for x in arrays], dtype=np.int64)
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    codes = np.repeat(np.arange(len(arrays)), sizes)
    return _grouped_summary(values, codes, len(arrays), n_boot, level, seed)


def summarize_ranks(
    frame: pd.DataFrame,
    keys: Sequence[str],
    value: str = "rank",
    *,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> pd.DataFrame:
    """Per group of ``keys`` (sorted): ``median``, bootstrap ``ci_low``/``ci_high``, ``geo_mean``,
    ``top1`` (share of rank 1) and ``n`` (finite values) of column ``value``."""
    keys = list(keys)
    columns = [*keys, *SUMMARY_COLUMNS]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    grouped = frame.groupby(keys, sort=True, dropna=False)[value]
    index = grouped.size().index
    codes = grouped.ngroup().to_numpy()
    summary = _grouped_summary(
        frame[value].to_numpy(dtype=np.float64), codes, len(index), n_boot, level, seed
    )
    out = index.to_frame(index=False) if isinstance(index, pd.MultiIndex) else pd.DataFrame({keys[0]: index})
    for name in SUMMARY_COLUMNS:
        out[name] = summary[name]
    return out[columns]


def _nanmedian(x: np.ndarray, axis: int) -> np.ndarray:
    """Median ignoring missing cells (NaN); an all-missing column gives NaN without a warning."""
    if not np.isnan(x).any():
        return np.median(x, axis=axis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(x, axis=axis)


@dataclass(frozen=True)
class RankTrajectory:
    """Ranks ``[P, L]`` of one target under one lens at the ``L`` unrolled block outputs.

    Rows are prompts, columns follow ``unrolled_index`` (strictly increasing). A missing
    measurement is NaN and is ignored by the statistics. ``sites``/``iterations`` label the columns.
    """

    unrolled_index: Int[np.ndarray, " L"]
    ranks: Float[np.ndarray, "P L"]
    prompt_ids: Int[np.ndarray, " P"] | None = None
    sites: tuple[str, ...] | None = None
    iterations: Int[np.ndarray, " L"] | None = None
    lens: str = ""
    target_kind: str = ""

    def __post_init__(self) -> None:
        index = np.asarray(self.unrolled_index)
        ranks = np.asarray(self.ranks, dtype=np.float64)
        if index.ndim != 1:
            raise ValueError(f"unrolled_index must be 1-D [L], got shape {index.shape}")
        if ranks.ndim != 2 or ranks.shape[1] != index.shape[0]:
            raise ValueError(
                f"ranks must be [P, L] with L = len(unrolled_index) = {index.shape[0]}, "
                f"got shape {ranks.shape}"
            )
        if ranks.shape[0] == 0:
            raise ValueError("ranks needs at least one prompt (P >= 1)")
        if index.size > 1 and not (np.diff(index) > 0).all():
            raise ValueError("unrolled_index must be strictly increasing")
        if (ranks[~np.isnan(ranks)] < 1).any():
            raise ValueError("ranks must be >= 1 (1 = top token)")
        object.__setattr__(self, "unrolled_index", index.astype(np.int64))
        object.__setattr__(self, "ranks", ranks)
        for name, size in (("prompt_ids", ranks.shape[0]), ("iterations", index.shape[0])):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value, dtype=np.int64)
                if value.shape != (size,):
                    raise ValueError(f"{name} must have shape ({size},), got {value.shape}")
                object.__setattr__(self, name, value)
        if self.sites is not None:
            if len(self.sites) != index.shape[0]:
                raise ValueError(f"sites must have {index.shape[0]} labels, got {len(self.sites)}")
            object.__setattr__(self, "sites", tuple(self.sites))

    @property
    def num_prompts(self) -> int:
        return self.ranks.shape[0]

    @classmethod
    def from_frame(
        cls, ranks: pd.DataFrame, lens: str, target_kind: str, *, position: int | None = None
    ) -> RankTrajectory:
        """Pivot the block-output rows (``unrolled_index >= 0``) of a ``ranks`` table.

        Exactly one row per (prompt, unrolled index) must remain after filtering by ``lens``,
        ``target_kind`` and ``position`` (needed when the table holds several positions); a missing
        cell becomes NaN.
        """
        df = ranks[(ranks["lens"] == lens) & (ranks["target_kind"] == target_kind)]
        df = df[df["unrolled_index"] >= 0]
        if position is not None:
            df = df[df["position"] == position]
        if df.empty:
            raise ValueError(
                f"no block-output rows for lens={lens!r}, target_kind={target_kind!r}"
                + (f", position={position}" if position is not None else "")
            )
        for col in ("run", "position"):
            if col in df and df[col].nunique() > 1:
                raise ValueError(
                    f"rows span several {col} values {sorted(df[col].unique())[:5]}; "
                    f"filter the frame{' or pass position=' if col == 'position' else ''} first"
                )
        if df.duplicated(["prompt_id", "unrolled_index"]).any():
            raise ValueError("several rows per (prompt_id, unrolled_index): filter by token_id first")
        grid = df.pivot(index="prompt_id", columns="unrolled_index", values="rank").sort_index()
        grid = grid.reindex(sorted(grid.columns), axis=1)
        labels = df.drop_duplicates("unrolled_index").set_index("unrolled_index").loc[grid.columns]
        return cls(
            unrolled_index=grid.columns.to_numpy(),
            ranks=grid.to_numpy(dtype=np.float64),
            prompt_ids=grid.index.to_numpy(),
            sites=tuple(labels["site"].astype(str)) if "site" in labels else None,
            iterations=labels["iteration"].to_numpy() if "iteration" in labels else None,
            lens=lens,
            target_kind=target_kind,
        )

    def median(self) -> Float[np.ndarray, " L"]:
        """Median rank over prompts at each unrolled index."""
        return _nanmedian(self.ranks, axis=0)

    def geometric_mean(self) -> Float[np.ndarray, " L"]:
        """exp(mean(log rank)): ranks span orders of magnitude, so average them on a log scale."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.exp(np.nanmean(np.log(self.ranks), axis=0))

    def bootstrap_ci(
        self, n: int = N_BOOT, alpha: float = 1 - LEVEL, seed: int = 0
    ) -> tuple[Float[np.ndarray, " L"], Float[np.ndarray, " L"]]:
        """Percentile bootstrap ``(low, high)`` of the median over prompts at each unrolled index
        (``median_interval`` with ``n`` resamples at level ``1 - alpha``; deterministic per ``seed``)."""
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        _, low, high = median_interval(list(self.ranks.T), n_boot=n, level=1 - alpha, seed=seed)
        return low, high

    def summary(self, n: int = N_BOOT, alpha: float = 1 - LEVEL, seed: int = 0) -> pd.DataFrame:
        """One row per unrolled index: median, CI, geometric mean (ready for plotly / Streamlit)."""
        low, high = self.bootstrap_ci(n=n, alpha=alpha, seed=seed)
        frame = pd.DataFrame(
            {
                "unrolled_index": self.unrolled_index,
                "median": self.median(),
                "ci_low": low,
                "ci_high": high,
                "geometric_mean": self.geometric_mean(),
            }
        )
        if self.sites is not None:
            frame.insert(1, "site", list(self.sites))
        if self.iterations is not None:
            frame.insert(1, "iteration", self.iterations)
        return frame

    def plot(self, ax: Any = None, label: str | None = None, ci: bool = True) -> Any:
        """Draw the median rank (log scale) with its bootstrap band; returns the matplotlib Axes."""
        if ax is None:
            from matplotlib.figure import Figure

            ax = Figure(figsize=(8, 3.5)).add_subplot()
        label = label or f"{self.lens} lens, {self.target_kind} token".strip()
        x = self.unrolled_index
        (line,) = ax.plot(x, self.median(), label=label)
        if ci:
            low, high = self.bootstrap_ci()
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_yscale("log")
        ax.set_xlabel("unrolled layer")
        ax.set_ylabel(f"median rank (P = {self.num_prompts})")
        ax.legend(loc="best")
        return ax
