"""Statistics the figures share besides the rank summary: Wilson intervals, the last position.

The median rank with its bootstrap interval is ``probes.trajectory.summarize_ranks``: one
implementation for the figures, the explorer and ``RankTrajectory``.

Example:
    >>> import numpy as np
    >>> low, high = wilson_interval(np.array([0, 5]), np.array([10, 10]))
    >>> float(low[0]), round(float(high[1]), 3)
    (0.0, 0.763)
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["last_position", "wilson_interval"]


def wilson_interval(
    successes: np.ndarray, n: np.ndarray, z: float = 1.959964
) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion (well-behaved at 0 and 1 and for small n)."""
    k = np.asarray(successes, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def last_position(df: pd.DataFrame) -> pd.DataFrame:
    """Keep each prompt's last position (the answer is predicted there) if several were recorded.

    Position ``-1`` means "the last token" in the record schema; otherwise the largest position per
    prompt is taken. Tables without a ``position`` column are returned unchanged.
    """
    if "position" not in df.columns or df.empty:
        return df
    per_prompt = df.groupby("prompt_id")["position"].nunique()
    if (per_prompt <= 1).all():
        return df
    has_last = df.groupby("prompt_id")["position"].transform(lambda p: (p == -1).any())
    best = df.groupby("prompt_id")["position"].transform("max")
    keep = np.where(has_last, df["position"] == -1, df["position"] == best)
    return df[keep]
