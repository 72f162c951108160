"""Linear probes: does a latent encode a quantity (say, the intermediate result) even where no lens decodes it?

``LatentCollector`` keeps one position's state per (site, iteration) for every prompt,
``collect_at_positions`` each prompt's states at positions of its own (say, where a variable is
assigned, which differs from prompt to prompt); ``linear_probe``
fits a logistic-regression probe per (site, iteration) on a training split and reports held-out
accuracy next to the majority-class baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from lens.errors import InputError
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


class PositionsCollector:
    """Keeps, per (site, iteration), each prompt's state at named positions of its own (a consumer of
    whole sequences: ``select(rows, columns)`` per name is set for each batch before the forward pass)."""

    positions = "all"

    def __init__(self, names: Sequence[str], sites: Sequence[str] | None = None) -> None:
        self.sites = list(sites) if sites is not None else None
        self.names = list(names)
        self.columns: dict[str, torch.Tensor] = {}
        self._store: dict[str, dict[tuple[str, int], list[np.ndarray]]] = {n: {} for n in self.names}

    def __call__(self, state: State) -> None:
        rows = torch.arange(state.tensor.shape[0], device=state.tensor.device)
        for name in self.names:
            picked = state.tensor[rows, self.columns[name].to(state.tensor.device)]
            self._store[name].setdefault((state.site, state.iteration), []).append(
                picked.detach().float().cpu().numpy()
            )

    def features(self) -> dict[str, dict[tuple[str, int], np.ndarray]]:
        return {n: {k: np.concatenate(v) for k, v in store.items()} for n, store in self._store.items()}


def collect_at_positions(
    model,
    prompts: Sequence[Sequence[int]],
    positions: Mapping[str, Sequence[int]],
    num_steps: int,
    sites: Sequence[str] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    init_state: InitState = None,
) -> dict[str, dict[tuple[str, int], np.ndarray]]:
    """Features at named positions, one forward pass per batch (:func:`~probes.batching.forward_batches`):
    ``positions[name][i]`` indexes prompt ``i``'s own tokens (negative from its end, so ``-1`` is its last
    token whatever the padding).

    Returns ``{name: {(site, iteration): [n_prompts, d]}}`` for :func:`linear_probe`.
    """
    lengths = [len(p) for p in prompts]
    for name, where in positions.items():
        if len(where) != len(prompts):
            raise InputError(f"positions {name!r}: {len(where)} positions for {len(prompts)} prompts")
        bad = [i for i, (p, n) in enumerate(zip(where, lengths, strict=True)) if not -n <= p < n]
        if bad:
            raise InputError(f"positions {name!r}: prompt {bad[0]} has no position {where[bad[0]]}")
    collector = PositionsCollector(list(positions), sites)

    def consumers(batch: Batch) -> list:
        width = batch.input_ids.shape[1]
        length = torch.tensor(batch.lengths)
        for name, where in positions.items():
            own = torch.tensor([where[i] for i in batch.indices])
            collector.columns[name] = width - length + own % length  # left padding shifts each prompt
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
