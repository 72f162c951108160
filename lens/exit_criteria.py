"""Adaptive-depth exit criteria: when may a token stop iterating?

Huginn's criteria ask whether the latent (or the readout) has stopped changing enough; ``"gate"``
asks a learned exit gate (Ouro's): stop once the cumulative exit probability reaches the threshold
(:mod:`lens.exit_gate`). Each criterion sees the per-iteration output at the position being generated
and returns, per sequence, whether it may stop. Thresholds default to the values the authors use
(``gate``: 0.5, the point where stopping has become the likelier outcome).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lens.errors import InputError
from lens.exit_gate import ExitTracker

DEFAULT_THRESHOLDS = {
    "kl": 5e-4,
    "entropy-diff": 1e-3,
    "latent-diff": 0.03,
    "argmax-stability": 5,
    "cosine": 0.999,
    "gate": 0.5,
    "none": float("inf"),
}


@dataclass
class ExitCriterion:
    """Stateful per-token check; ``update`` returns the exit value and the exit decision per row."""

    name: str = "kl"
    threshold: float | None = None
    needs_logits: bool = field(init=False)
    needs_gate: bool = field(init=False)
    _prev: Tensor | None = field(default=None, init=False, repr=False)
    _count: Tensor | None = field(default=None, init=False, repr=False)
    _tracker: ExitTracker | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.name not in DEFAULT_THRESHOLDS:
            raise InputError(
                f"unknown exit criterion {self.name!r}; choose from {sorted(DEFAULT_THRESHOLDS)}"
            )
        if self.threshold is None:
            self.threshold = DEFAULT_THRESHOLDS[self.name]
        self.needs_logits = self.name in ("kl", "entropy-diff", "argmax-stability")
        self.needs_gate = self.name == "gate"

    def reset(self) -> None:
        self._prev, self._count, self._tracker = None, None, None

    def update(
        self, latent: Tensor, logits: Tensor | None, gate: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``latent`` ``[B, d]`` (the state at the position), ``logits`` ``[B, V]`` or None, ``gate``
        ``[B]`` (this iteration's exit-gate λ, for the ``gate`` criterion)."""
        name, thr = self.name, self.threshold
        if name == "gate":
            if gate is None:
                raise InputError("the 'gate' exit criterion needs a model with an exit gate (Ouro)")
            self._tracker = self._tracker or ExitTracker()
            _, cdf = self._tracker.step(gate.float())
            return cdf, cdf >= thr
        if name == "none":
            value = torch.full((latent.shape[0],), float("nan"), device=latent.device)
            return value, torch.zeros_like(value, dtype=torch.bool)
        if name == "latent-diff":
            cur = latent.float()
            value = (cur - self._prev).norm(dim=-1) / cur.norm(dim=-1) if self._prev is not None else None
            self._prev = cur
        elif name == "cosine":
            cur = latent.float()
            value = F.cosine_similarity(cur, self._prev, dim=-1) if self._prev is not None else None
            self._prev = cur
            if value is not None:
                return value, value > thr
        elif name == "kl":
            logp = F.log_softmax(logits.float(), dim=-1)
            value = (
                F.kl_div(logp, self._prev, reduction="none", log_target=True).sum(-1)
                if self._prev is not None
                else None
            )
            self._prev = logp
        elif name == "entropy-diff":
            logp = F.log_softmax(logits.float(), dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)
            value = (entropy - self._prev).abs() if self._prev is not None else None
            self._prev = entropy
        else:  # argmax-stability: exit once the argmax has stayed the same for `threshold` steps
            top = logits.argmax(-1)
            if self._prev is None:
                self._count = torch.zeros_like(top)
            else:
                self._count = torch.where(top == self._prev, self._count + 1, torch.zeros_like(self._count))
            self._prev = top
            return self._count.float(), self._count >= thr
        if value is None:  # first iteration: nothing to compare with yet
            value = torch.full((latent.shape[0],), float("nan"), device=latent.device)
            return value, torch.zeros_like(value, dtype=torch.bool)
        return value, value < thr
