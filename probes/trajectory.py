"""Plot-ready rank trajectories: the rank of one target token along the unrolled depth, per prompt.

A ``RankTrajectory`` is built from a ``ranks`` table (see ``probes.records``) for one lens and one
target kind, checks its shapes on construction, and knows its summary statistics (median over
prompts with a bootstrap confidence interval, geometric mean) and how to draw itself.

Example:
    >>> import numpy as np
    >>> traj = RankTrajectory(unrolled_index=np.arange(3), ranks=np.array([[9, 3, 1], [7, 2, 1]]))
    >>> traj.median().tolist()
    [8.0, 2.5, 1.0]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float, Int

__all__ = ["RankTrajectory"]


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
        self, n: int = 1000, alpha: float = 0.05, seed: int = 0
    ) -> tuple[Float[np.ndarray, " L"], Float[np.ndarray, " L"]]:
        """Percentile bootstrap ``(low, high)`` of the median over prompts, resampling prompts.

        Deterministic for a given ``seed``; resamples are drawn in chunks so memory stays bounded.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        rng = np.random.default_rng(seed)
        P, L = self.ranks.shape
        chunk = max(1, min(n, 4_000_000 // max(1, P * L)))
        medians = []
        for start in range(0, n, chunk):
            idx = rng.integers(0, P, size=(min(chunk, n - start), P))
            medians.append(_nanmedian(self.ranks[idx], axis=1))
        boot = np.concatenate(medians)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanquantile(boot, [alpha / 2, 1 - alpha / 2], axis=0)
        return low, high

    def summary(self, n: int = 1000, alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
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
