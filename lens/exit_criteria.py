"""Adaptive-depth exit criteria: when may a token stop iterating?

Huginn's criteria, computed as the authors' ``generate_with_adaptive_compute`` computes them (a
token exits after iteration ``c`` when the value falls below the threshold; ``argmax-stability``
when its count reaches it):

``kl``               KL(q_{c-1} ‖ q_c) of the last position's next-token distributions; q_0 is uniform.
``minp-kl``          the same KL after a min-p filter: every probability below 0.1 × the largest is
                     replaced by 1/V and the distribution renormalised.
``entropy-diff``     |H_c − H_{c-1}| of the last position's entropy (``−Σ p log(p + 1e-10)``); H_0 = 100.
``latent-diff``      ‖s_c − s_{c-1}‖ / ‖s_c‖ of the raw latent state, averaged over the positions of the
                     forward pass (the whole prompt in prefill); s_0 is the start state.
``cosine``           1 − cos(s_c, s_{c-1}), averaged over positions (NaN against a zero start: no exit).
``argmax-stability`` how many checks in a row the last position's argmax has not changed.
``gate``             a learned exit gate (Ouro's, :mod:`lens.exit_gate`): the cumulative exit
                     probability reaches the threshold.
``none``             never.

Thresholds default to the authors' ``"auto"`` values (``gate``: 0.5, the point where stopping has
become the likelier outcome). Each criterion keeps, per forward pass, the values it computed
(``history``), which is what the authors' evaluator checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lens.errors import InputError
from lens.exit_gate import ExitTracker

DEFAULT_THRESHOLDS = {
    "kl": 1e-3,
    "minp-kl": 1e-5,
    "entropy-diff": 1e-3,
    "latent-diff": 0.03,
    "argmax-stability": 5,
    "cosine": 1e-3,
    "gate": 0.5,
    "none": float("inf"),
}
LOGIT_CRITERIA = ("kl", "minp-kl", "entropy-diff", "argmax-stability")


def _position_mean(value: Tensor, mask: Tensor | None) -> Tensor:
    """``[B, S] -> [B]``: the mean over the positions ``mask`` keeps (all without a mask)."""
    if mask is None:
        return value.mean(-1)
    keep = mask.to(value.device).bool()
    return (value * keep).sum(-1) / keep.sum(-1).clamp(min=1)


@dataclass
class ExitCriterion:
    """Stateful per-token check: ``reset`` at the start of a forward pass, ``update`` after each iteration.

    Example:
        >>> import torch
        >>> crit = ExitCriterion("latent-diff", 0.1)
        >>> crit.reset(torch.zeros(1, 2, 4))
        >>> value, stop = crit.update(torch.ones(1, 2, 4), None)
        >>> value.tolist(), stop.tolist()  # the first step from a zero start moves by 100 %
        ([1.0], [False])
    """

    name: str = "kl"
    threshold: float | None = None
    needs_logits: bool = field(init=False)
    needs_gate: bool = field(init=False)
    history: list[list[Tensor]] = field(default_factory=list, init=False, repr=False)
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
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise InputError(f"exit_threshold must be a number, got {self.threshold!r}")
        if not self.threshold > 0 and self.name != "none":
            raise InputError(f"exit_threshold must be > 0, got {self.threshold}")
        self.needs_logits = self.name in LOGIT_CRITERIA
        self.needs_gate = self.name == "gate"

    def reset(self, start: Tensor | None = None, mask: Tensor | None = None) -> None:
        """Begin a forward pass whose recurrence starts from ``start`` ``[B, S, d]`` (``mask`` [B, S]: real tokens)."""
        self._prev, self._count, self._tracker = None, None, None
        if self.name in ("latent-diff", "cosine") and start is not None:
            self._prev = start.float()
        self.history.append([])

    def update(
        self,
        latent: Tensor,
        logits: Tensor | None,
        gate: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``latent`` ``[B, S, d]`` (the state after this iteration, every position of the pass), ``logits``
        ``[B, V]`` (the last position's readout, for the logit criteria), ``gate`` ``[B]`` (this iteration's
        exit-gate λ), ``mask`` ``[B, S]`` (real tokens). Returns the value and the exit decision per row."""
        value, stop = self._value(latent, logits, gate, mask)
        if not self.history:
            self.history.append([])
        self.history[-1].append(value.detach())
        return value, stop

    def _value(
        self, latent: Tensor, logits: Tensor | None, gate: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        name, thr = self.name, self.threshold
        assert thr is not None  # __post_init__ fills in the default threshold
        if latent.dim() == 2:
            latent = latent[:, None]
        B = latent.shape[0]
        if name == "gate":
            if gate is None:
                raise InputError("the 'gate' exit criterion needs a model with an exit gate (Ouro)")
            self._tracker = self._tracker or ExitTracker()
            _, cdf = self._tracker.step(gate.float())
            return cdf, cdf >= thr
        if name == "none":  # the authors' evaluator reports 0 and never exits
            value = torch.zeros(B, device=latent.device)
            return value, torch.zeros_like(value, dtype=torch.bool)
        if name in ("latent-diff", "cosine"):
            cur = latent.float()
            prev = self._prev if self._prev is not None else torch.zeros_like(cur)
            self._prev = cur
            if name == "latent-diff":
                value = _position_mean((cur - prev).norm(dim=-1) / cur.norm(dim=-1), mask)
            else:  # no eps: a zero state has no direction (NaN never exits)
                cos = (cur * prev).sum(-1) / (cur.norm(dim=-1) * prev.norm(dim=-1))
                value = 1 - _position_mean(cos, mask)
            return value, value < thr
        if logits is None:
            raise InputError(f"the {name!r} exit criterion needs logits")
        logits = logits.float()
        V = logits.shape[-1]
        if name == "argmax-stability":
            top = logits.argmax(-1)
            if self._prev is None:
                count = torch.zeros_like(top)
            else:
                assert self._count is not None  # this criterion sets _count whenever it sets _prev
                count = torch.where(top == self._prev, self._count + 1, torch.zeros_like(self._count))
            self._count = count
            self._prev = top
            return count.float(), count >= thr
        if name == "entropy-diff":
            probs = logits.softmax(-1)
            entropy = -(probs * (probs + 1e-10).log()).sum(-1)
            prev = self._prev if self._prev is not None else torch.full_like(entropy, 100.0)
            self._prev = entropy
            value = (entropy - prev).abs()
            return value, value < thr
        if name == "kl":
            logp = F.log_softmax(logits, dim=-1)
        else:  # minp-kl: drop what falls below a tenth of the top probability to the uniform floor
            probs = logits.softmax(-1)
            probs = torch.where(probs < 0.1 * probs.amax(-1, keepdim=True), 1.0 / V, probs)
            logp = (probs / probs.sum(-1, keepdim=True)).log()
        prev = self._prev if self._prev is not None else torch.full_like(logp, -math.log(V))
        self._prev = logp
        value = F.kl_div(logp, prev, reduction="none", log_target=True).sum(-1)
        return value, value < thr
