"""Latent dynamics across iterations: step norms, convergence, PCA trajectories, and a verdict.

The recurrent state (by default the tensor fed back into the next iteration: the last core block's
output, or the normalised ``latent`` where the family feeds that back, Ouro) is kept only at the
chosen positions, ``[T, B, P, d]``: small enough to keep whole, which
the cosine-to-last and the PCA need.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA

from lens.errors import InputError
from lens.model import LoopedLM
from lens.stream import Positions, State


def classify_trajectory(
    states: np.ndarray, fixed_tol: float = 1e-3, cycle_tol: float = 0.02, max_period: int = 8
) -> str:
    """``"fixed-point"``, ``"cycle-k"`` or ``"drift"`` for one trajectory ``[T, d]``.

    Fixed point: the last relative step ``‖h_T − h_{T−1}‖ / ‖h_T‖`` is below ``fixed_tol``.
    Cycle of period k: not a fixed point, but ``‖h_T − h_{T−k}‖ / ‖h_T‖`` is below ``cycle_tol``.
    Otherwise the latent is still drifting.
    """
    T = states.shape[0]
    if T < 2:
        return "drift"
    last = states[-1]
    scale = max(float(np.linalg.norm(last)), 1e-12)
    if np.linalg.norm(last - states[-2]) / scale < fixed_tol:
        return "fixed-point"
    for k in range(2, min(max_period, T - 1) + 1):
        if np.linalg.norm(last - states[-1 - k]) / scale < cycle_tol:
            return f"cycle-{k}"
    return "drift"


class DynamicsRecorder:
    """Stream consumer for the latent trajectory; ``finalize()`` gives tidy per-iteration rows."""

    def __init__(
        self,
        model: LoopedLM,
        sites: Sequence[str] | None = None,
        positions: Positions = "last",
        n_components: int = 3,
    ) -> None:
        layout = model.layout
        fed_back = "latent" if layout.latent_per_iteration else f"core.{layout.core - 1}"
        self.sites = list(sites) if sites is not None else [fed_back]
        for site in self.sites:
            if not layout.is_recurrent(site):
                raise InputError(
                    f"dynamics follow recurrent sites (emitted every iteration: core.j, adapter), not {site!r}"
                )
        self.positions = positions
        self.n_components = n_components
        self._states: dict[str, list[torch.Tensor]] = {}
        self._positions: torch.Tensor | None = None

    def __call__(self, state: State) -> None:
        self._states.setdefault(state.site, []).append(state.tensor.detach().float().cpu())
        if state.positions is not None:
            self._positions = state.positions

    def trajectories(self, site: str) -> torch.Tensor:
        """``[T, B, P, d]`` for one site."""
        return torch.stack(self._states[site])

    def finalize(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(dynamics, verdicts)``: per-iteration rows and one classification per trajectory."""
        rows, verdicts = [], []
        for site, states in self._states.items():
            traj = torch.stack(states)  # [T, B, P, d]
            T, B, P, _ = traj.shape
            norms = traj.norm(dim=-1)
            step = torch.full_like(norms, float("nan"))
            step[1:] = (traj[1:] - traj[:-1]).norm(dim=-1) / norms[1:].clamp_min(1e-12)
            cos = torch.nn.functional.cosine_similarity(traj, traj[-1:].expand_as(traj), dim=-1)
            positions = self._positions.tolist() if self._positions is not None else list(range(P))
            for b in range(B):
                for p in range(P):
                    path = traj[:, b, p].numpy()
                    k = min(self.n_components, T, path.shape[1])
                    pcs = np.full((T, 3), np.nan, dtype=np.float32)
                    if T >= 2:
                        pcs[:, :k] = PCA(n_components=k).fit_transform(path)[:, :k]
                    for t in range(T):
                        rows.append(
                            {
                                "prompt_index": b,
                                "position": positions[p],
                                "site": site,
                                "iteration": t + 1,
                                "step_norm": float(step[t, b, p]),
                                "cos_to_last": float(cos[t, b, p]),
                                "norm": float(norms[t, b, p]),
                                "pc1": pcs[t, 0],
                                "pc2": pcs[t, 1],
                                "pc3": pcs[t, 2],
                            }
                        )
                    verdicts.append(
                        {
                            "prompt_index": b,
                            "position": positions[p],
                            "site": site,
                            "verdict": classify_trajectory(path),
                        }
                    )
        return pd.DataFrame(rows), pd.DataFrame(verdicts)
