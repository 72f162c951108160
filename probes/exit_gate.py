"""Exit-gate readings as a recorded statistic: λ_t, p_t and the cumulative exit probability per
(prompt, position, iteration), for families with a learned exit gate (Ouro).

The model puts each iteration's ``λ_t`` on the stream beside its ``latent``
(:attr:`lens.State.exit_lambda`), so the recorder sees exactly what the model used (a hook that
patches the gate is seen too). The exit distribution is built with the model's own arithmetic
(:func:`lens.exit_gate.exit_distribution`): the last iteration run holds the remaining mass.

Example:
    >>> import torch, lens
    >>> model = lens.load_model("tests/data/fixtures/ouro-tiny/checkpoint")  # a tiny random Ouro
    >>> rec = ExitGateRecorder(model, positions="last")
    >>> out = model(torch.tensor([[5, 9, 100, 3]]), num_steps=4, consumers=[rec])
    >>> rows = rec.finalize()
    >>> len(rows), round(float(rows["exit_prob"].sum()), 5)  # 4 iterations; p_t sums to 1
    (4, 1.0)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from lens.exit_gate import exit_distribution
from lens.model import LoopedLM
from lens.stream import Positions, State
from probes.batching import PositionSelection, select_positions
from probes.lenses.base import LensNotApplicableError

COLUMNS = ["prompt_index", "position", "iteration", "num_steps", "gate_lambda", "exit_prob", "exit_cdf"]


class ExitGateRecorder:
    """Stream consumer of the gate's readings at ``latent``; ``finalize()`` gives tidy ``exit_gate`` rows."""

    def __init__(
        self, model: LoopedLM, positions: Positions = "last", attention_mask: torch.Tensor | None = None
    ) -> None:
        if not model.layout.exit_gate:
            raise LensNotApplicableError(f"{model.layout.family} models have no exit gate to record")
        self.sites = ["latent"]
        self.wanted_positions = positions
        self.positions: Positions = "all"  # λ is [B, S]: select each prompt's own positions here
        self.attention_mask = attention_mask
        self._lambdas: list[torch.Tensor] = []
        self._iterations: list[int] = []
        self._selection: PositionSelection | None = None
        self._num_steps = 0

    def __call__(self, state: State) -> None:
        if state.exit_lambda is None:
            return
        lam = state.exit_lambda.detach().float()
        if self._selection is None:
            self._selection = select_positions(self.wanted_positions, self.attention_mask, *lam.shape[:2])
        self._lambdas.append(self._selection.gather(lam).cpu())
        self._iterations.append(state.iteration)
        self._num_steps = state.num_steps

    def finalize(self) -> pd.DataFrame:
        """One row per prompt × position × iteration (``prompt_index`` is the row in the batch; positions
        count within each prompt's own tokens, ``-1`` = its last)."""
        if not self._lambdas or self._selection is None:
            return pd.DataFrame(columns=COLUMNS)
        lam = torch.stack(self._lambdas, -1)  # [B, P, T]
        pdf, cdf = exit_distribution(lam)
        B, P, T = lam.shape
        keep = self._selection.valid.cpu().repeat_interleave(T, dim=1).reshape(-1).numpy()
        frame = pd.DataFrame(
            {
                "prompt_index": np.repeat(np.arange(B), P * T),
                "position": self._selection.own.cpu().repeat_interleave(T, dim=1).reshape(-1).numpy(),
                "iteration": np.tile(self._iterations, B * P),
                "num_steps": np.full(B * P * T, self._num_steps),
                "gate_lambda": lam.reshape(-1).numpy(),
                "exit_prob": pdf.reshape(-1).numpy(),
                "exit_cdf": cdf.reshape(-1).numpy(),
            }
        )
        frame = frame[keep].reset_index(drop=True)
        return frame.astype({"position": np.int32, "iteration": np.int32, "num_steps": np.int32})
