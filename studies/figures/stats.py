"""Summary statistics the figures share: bootstrap medians of heavy-tailed ranks, Wilson intervals.

Ranks span 1 … |V| with a long upper tail, so every rank figure shows the **median** over prompts
with a percentile-bootstrap 95 % interval (resampling prompts), plus the geometric mean in the
tables. Bootstraps use a fixed seed so a table is reproducible bit for bit.

Example:
    >>> import numpy as np
    >>> med, lo, hi = bootstrap_median(np.array([1, 2, 3, 4, 100]), seed=0)
    >>> med, lo <= med <= hi
    (3.0, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["N_BOOT", "bootstrap_median", "last_position", "summarize_ranks", "wilson_interval"]

N_BOOT = 1000
LEVEL = 0.95


def bootstrap_median(
    values: np.ndarray, n_boot: int = N_BOOT, level: float = LEVEL, seed: int | np.random.Generator = 0
) -> tuple[float, float, float]:
    """``(median, ci_low, ci_high)``: percentile bootstrap over the values (prompts).

    The interval is widened, if ever needed, to contain the sample median (a percentile interval
    of a discrete statistic can in rare ties miss it by a hair).
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    med = float(np.median(x))
    if x.size == 1:
        return med, med, med
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    boots = np.median(x[rng.integers(0, x.size, size=(n_boot, x.size))], axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return med, float(min(lo, med)), float(max(hi, med))


def summarize_ranks(
    df: pd.DataFrame, keys: Sequence[str], value: str = "rank", seed: int = 0, n_boot: int = N_BOOT
) -> pd.DataFrame:
    """Per group of ``keys``: median, bootstrap ci_low/ci_high, geo_mean, top1 share and n."""
    rng = np.random.default_rng(seed)
    rows = []
    for key, group in df.groupby(list(keys), sort=True, dropna=False):
        x = group[value].to_numpy(dtype=float)
        x = x[np.isfinite(x)]
        med, lo, hi = bootstrap_median(x, n_boot=n_boot, seed=rng)
        key = key if isinstance(key, tuple) else (key,)
        rows.append(
            {
                **dict(zip(keys, key, strict=True)),
                "median": med,
                "ci_low": lo,
                "ci_high": hi,
                "geo_mean": float(np.exp(np.mean(np.log(np.maximum(x, 1.0))))) if x.size else float("nan"),
                "top1": float(np.mean(x <= 1.0)) if x.size else float("nan"),
                "n": int(x.size),
            }
        )
    columns = [*keys, "median", "ci_low", "ci_high", "geo_mean", "top1", "n"]
    return pd.DataFrame(rows, columns=columns)


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
