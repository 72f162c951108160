"""Linear probes: does a latent encode a quantity (say, the intermediate result) even where no lens decodes it?

``LatentCollector`` keeps one position's state per (site, iteration) for every prompt; ``linear_probe``
fits a logistic-regression probe per (site, iteration) on a training split and reports held-out
accuracy next to the majority-class baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from lens.model import InitState
from lens.stream import Positions, State
from probes.batching import Batch, forward_batches, select_positions


class LatentCollector:
    """Keeps ``[B, d]`` at one position per (site, iteration); call ``features()`` after the runs.

    ``position`` counts within each prompt's own tokens (``0`` its first, ``-1`` its last); set
    ``attention_mask`` to the batch's mask before a padded batch (``collect_for_probe`` does).
    """

    def __init__(self, sites: Sequence[str] | None = None, position: int = -1) -> None:
        self.sites = list(sites) if sites is not None else None
        self.position = int(position)
        self.positions: Positions = "last" if self.position == -1 else "all"
        self.attention_mask: Tensor | None = None
        self._store: dict[tuple[str, int], list[np.ndarray]] = {}

    def __call__(self, state: State) -> None:
        tensor = state.tensor
        if self.positions == "all":
            selection = select_positions([self.position], self.attention_mask, *tensor.shape[:2])
            tensor = selection.gather(tensor)
        self._store.setdefault((state.site, state.iteration), []).append(
            tensor[:, 0].detach().float().cpu().numpy()
        )

    def features(self) -> dict[tuple[str, int], np.ndarray]:
        return {k: np.concatenate(v) for k, v in self._store.items()}


def linear_probe(
    features: dict[tuple[str, int], np.ndarray],
    labels: Sequence[object],
    test_fraction: float = 0.25,
    seed: int = 0,
    C: float = 1.0,
) -> pd.DataFrame:
    """Held-out accuracy of a linear probe per (site, iteration)."""
    y = np.asarray(labels)
    if not features:
        raise ValueError("no features collected")
    if len(set(y.tolist())) < 2:
        raise ValueError("a linear probe needs at least two distinct labels")
    counts = pd.Series(y).value_counts()
    stratify = y if counts.min() >= 2 else None
    index = np.arange(len(y))
    train_idx, test_idx = train_test_split(
        index, test_size=test_fraction, random_state=seed, stratify=stratify
    )
    majority = counts.index[0]
    rows = []
    for (site, iteration), X in sorted(features.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if X.shape[0] != len(y):
            raise ValueError(f"{site}@{iteration}: {X.shape[0]} feature rows for {len(y)} labels")
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
        probe.fit(X[train_idx], y[train_idx])
        rows.append(
            {
                "site": site,
                "iteration": iteration,
                "train_accuracy": float(probe.score(X[train_idx], y[train_idx])),
                "test_accuracy": float(probe.score(X[test_idx], y[test_idx])),
                "majority_baseline": float(np.mean(y[test_idx] == majority)),
                "n_train": len(train_idx),
                "n_test": len(test_idx),
            }
        )
    return pd.DataFrame(rows)


def collect_for_probe(
    model,
    prompts: Sequence[Sequence[int]],
    num_steps: int,
    sites: Sequence[str] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    position: int = -1,
    init_state: InitState = None,
) -> dict[tuple[str, int], np.ndarray]:
    """Run prompts and collect features at ``position`` of each prompt's own tokens (-1: its last)."""
    collector = LatentCollector(sites, position)

    def consumers(batch: Batch) -> list:
        collector.attention_mask = batch.attention_mask
        return [collector]

    for _ in forward_batches(
        model,
        prompts,
        consumers,
        num_steps=num_steps,
        batch_size=batch_size,
        init_state=init_state,
        seed=seed,
        logits="none",
    ):
        pass
    return collector.features()
