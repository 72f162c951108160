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

from lens.errors import InputError
from lens.model import LoopedLM
from lens.stream import Positions, State
from probes.batching import PositionSelection, select_positions


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
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        layout = model.layout
        fed_back = "latent" if layout.latent_per_iteration else f"core.{layout.core - 1}"
        self.sites = list(sites) if sites is not None else [fed_back]
        for site in self.sites:
            if not layout.is_recurrent(site):
                raise InputError(
                    f"dynamics follow recurrent sites (emitted every iteration: core.j, adapter), not {site!r}"
                )
        self.wanted_positions = positions
        # "last" is the same padded index for every row: let the stream cut it; else select per prompt
        self.positions: Positions = "last" if positions == "last" else "all"
        self.attention_mask = attention_mask
        self.n_components = n_components
        self._states: dict[str, list[torch.Tensor]] = {}
        self._selection: PositionSelection | None = None

    def __call__(self, state: State) -> None:
        tensor = state.tensor.detach()
        if self.positions == "all":
            if self._selection is None:
                self._selection = select_positions(
                    self.wanted_positions, self.attention_mask, tensor.shape[0], tensor.shape[1]
                )
            tensor = self._selection.gather(tensor)
        elif self._selection is None:
            self._selection = select_positions("last", None, tensor.shape[0], 1)
        self._states.setdefault(state.site, []).append(tensor.float().cpu())

    def trajectories(self, site: str) -> torch.Tensor:
        """``[T, B, P, d]`` for one site."""
        return torch.stack(self._states[site])

    def finalize(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(dynamics, verdicts)``: per-iteration rows and one classification per trajectory."""
        frames, verdicts = [], []
        selection = self._selection
        for site, states in self._states.items():
            assert selection is not None  # set by the first state
            traj = torch.stack(states)  # [T, B, P, d]
            T, B, P, _ = traj.shape
            norms = traj.norm(dim=-1)
            step = torch.full_like(norms, float("nan"))
            step[1:] = (traj[1:] - traj[:-1]).norm(dim=-1) / norms[1:].clamp_min(1e-12)
            cos = torch.nn.functional.cosine_similarity(traj, traj[-1:].expand_as(traj), dim=-1)
            keep = selection.valid.reshape(-1).numpy()  # trajectories ordered prompt-major
            own = selection.own.reshape(-1).numpy()[keep]
            paths = traj.permute(1, 2, 0, 3).reshape(B * P, T, -1)[torch.from_numpy(keep)]  # [N, T, d]
            n = paths.shape[0]
            pcs = principal_components(paths, self.n_components)  # [N, T, 3]
            mask = torch.from_numpy(keep)
            index = np.repeat(np.arange(B * P)[keep] // P, T)
            frames.append(
                pd.DataFrame(
                    {
                        "prompt_index": index,
                        "position": np.repeat(own, T),
                        "site": site,
                        "iteration": np.tile(np.arange(1, T + 1), n),
                        "step_norm": _per_trajectory(step, mask),
                        "cos_to_last": _per_trajectory(cos, mask),
                        "norm": _per_trajectory(norms, mask),
                        "pc1": pcs[:, :, 0].reshape(-1),
                        "pc2": pcs[:, :, 1].reshape(-1),
                        "pc3": pcs[:, :, 2].reshape(-1),
                    }
                )
            )
            verdicts.append(
                pd.DataFrame(
                    {
                        "prompt_index": np.arange(B * P)[keep] // P,
                        "position": own,
                        "site": site,
                        "verdict": [classify_trajectory(path.numpy()) for path in paths],
                    }
                )
            )
        if not frames:
            return pd.DataFrame(), pd.DataFrame()
        return pd.concat(frames, ignore_index=True), pd.concat(verdicts, ignore_index=True)


def _per_trajectory(x: torch.Tensor, keep: torch.Tensor) -> np.ndarray:
    """``[T, B, P]`` → ``[N * T]`` for the kept trajectories, trajectory-major (prompt, position, t)."""
    T = x.shape[0]
    return x.permute(1, 2, 0).reshape(-1, T)[keep].reshape(-1).numpy()


def principal_components(paths: torch.Tensor, n_components: int = 3) -> np.ndarray:
    """Each trajectory ``[T, d]`` of ``paths`` ``[N, T, d]`` projected on its own first principal axes.

    ``[N, T, 3]`` float32, NaN beyond ``min(n_components, T, d)`` components (all NaN when T < 2). The
    same numbers as scikit-learn's ``PCA(n_components).fit_transform`` per trajectory (centred SVD,
    each axis signed so that its largest loading is positive), in one batched SVD.
    """
    N, T, d = paths.shape
    out = np.full((N, T, 3), np.nan, dtype=np.float32)
    k = min(n_components, T, d, 3)
    if T < 2 or N == 0:
        return out
    x = paths.double()
    x = x - x.mean(dim=1, keepdim=True)
    u, s, vt = torch.linalg.svd(x, full_matrices=False)  # [N, T, r], [N, r], [N, r, d]
    rows = torch.arange(N)[:, None]
    biggest = vt[:, :k].abs().argmax(dim=-1)  # [N, k]
    signs = torch.sign(vt[rows, torch.arange(k)[None, :], biggest])
    signs[signs == 0] = 1
    out[:, :, :k] = (u[:, :, :k] * s[:, None, :k] * signs[:, None, :]).float().numpy()
    return out
