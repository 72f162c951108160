"""A learned exit gate (Ouro's): the exit distribution over iterations and the three ways to use it.

After iteration ``t`` the gate reads the latent and gives ``λ_t = sigmoid(gate(h_t))``, the chance
of stopping there given that no earlier step stopped. The exit distribution over ``T`` iterations is

    p_1 = λ_1,   p_t = λ_t · Π_{j<t} (1 − λ_j)  for t < T,   p_T = Π_{j<T} (1 − λ_j)

(the last gate is computed but its mass is whatever remains), so Σ_t p_t = 1. The model's output
can then be (:class:`GateExit`) the readout at the first step whose cumulative exit probability
reaches a threshold, per token; the readout at a forced step; or the p-weighted mix of every step's
logits. :class:`ExitTracker` builds the distribution step by step with the same arithmetic as the
authors' code, so a decision taken online (generation that really stops) equals one taken after all
steps ran.

Example:
    >>> import torch
    >>> pdf, cdf = exit_distribution(torch.tensor([[0.5, 0.5, 0.5]]))
    >>> pdf.tolist(), cdf[..., -1].item()
    ([[0.5, 0.25, 0.25]], 1.0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from lens.errors import InputError

__all__ = ["ExitTracker", "GateExit", "GateReadout", "exit_distribution"]


class ExitTracker:
    """The exit distribution built one iteration at a time: ``step(λ_t, last)`` returns ``(p_t, cdf_t)``."""

    def __init__(self) -> None:
        self.remaining: Tensor | None = None
        self.cdf: Tensor | None = None

    def step(self, lam: Tensor, last: bool = False) -> tuple[Tensor, Tensor]:
        """``lam`` (any shape) is this iteration's λ; ``last`` gives the remaining mass to this step."""
        if self.remaining is None or self.cdf is None:
            self.remaining = torch.ones_like(lam)
            self.cdf = torch.zeros_like(lam)
        if last:
            p = self.remaining
        else:
            p = lam * self.remaining
            self.remaining = self.remaining * (1.0 - lam)
        self.cdf = self.cdf + p
        return p, self.cdf


def exit_distribution(
    lambdas: Float[Tensor, "... T"],
) -> tuple[Float[Tensor, "... T"], Float[Tensor, "... T"]]:
    """``(pdf, cdf)`` over the last axis for gate values ``λ`` ``[..., T]`` (the last λ only marks the end)."""
    tracker, pdf, cdf = ExitTracker(), [], []
    T = lambdas.shape[-1]
    for t in range(T):
        p, c = tracker.step(lambdas[..., t], last=t == T - 1)
        pdf.append(p)
        cdf.append(c)
    return torch.stack(pdf, -1), torch.stack(cdf, -1)


@dataclass(frozen=True)
class GateExit:
    """Which readout an exit-gated model returns (the three exit modes of Ouro's code).

    - ``GateExit.at_threshold(q)``: per token, the first iteration whose cumulative exit probability
      is ``>= q`` (the last one if none is);
    - ``GateExit.at_step(t)``: the readout after iteration ``t`` (1-based: the authors' 0-based
      ``exit_at_step=k`` is ``at_step(k + 1)``; the same as running ``num_steps=t``);
    - ``GateExit.weighted()``: ``Σ_t p_t · logits_t``, the expected logits under the exit distribution.
    """

    mode: Literal["threshold", "step", "weighted"]
    threshold: float | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("threshold", "step", "weighted"):
            raise InputError(f"exit mode must be 'threshold', 'step' or 'weighted', got {self.mode!r}")
        if self.mode == "threshold" and (
            not isinstance(self.threshold, (int, float)) or not 0.0 <= float(self.threshold) <= 1.0
        ):
            raise InputError(f"an exit threshold must be a probability in [0, 1], got {self.threshold!r}")
        if self.mode == "step" and (
            not isinstance(self.step, int) or isinstance(self.step, bool) or self.step < 1
        ):
            raise InputError(f"an exit step must be an iteration >= 1, got {self.step!r}")

    @classmethod
    def at_threshold(cls, threshold: float) -> GateExit:
        return cls("threshold", threshold=threshold)

    @classmethod
    def at_step(cls, step: int) -> GateExit:
        return cls("step", step=step)

    @classmethod
    def weighted(cls) -> GateExit:
        return cls("weighted")


class GateReadout:
    """Combines per-iteration readouts into a :class:`GateExit`'s output while the loop runs.

    ``update(t, latent, lam)`` is called after every iteration with the latent ``[B, P, d]`` at the
    output positions and its λ ``[B, P]``; ``head`` turns latents into logits. Only the logits that
    the mode needs are computed: the threshold mode decodes each token once, at its exit step.
    """

    def __init__(self, mode: GateExit, num_steps: int, head: Callable[[Tensor], Tensor]) -> None:
        if mode.mode == "step" and mode.step is not None and mode.step > num_steps:
            raise InputError(f"exit step {mode.step} is beyond the {num_steps} iterations run (num_steps)")
        self.mode, self.num_steps, self.head = mode, num_steps, head
        self.tracker = ExitTracker()
        self.logits: Tensor | None = None
        self.exit_steps: Tensor | None = None

    def update(self, iteration: int, latent: Tensor, lam: Tensor) -> None:
        last = iteration == self.num_steps
        p, cdf = self.tracker.step(lam.float(), last=last)
        mode = self.mode.mode
        if self.exit_steps is None:
            self.exit_steps = torch.zeros(lam.shape, dtype=torch.long, device=lam.device)
        if mode == "weighted":
            step_logits = self.head(latent)
            mixed = p[..., None] * step_logits
            self.logits = mixed if self.logits is None else self.logits + mixed
            if last:
                self.exit_steps.fill_(self.num_steps)
            return
        if mode == "step":
            if iteration == self.mode.step:
                self.logits = self.head(latent)
                self.exit_steps.fill_(iteration)
            return
        newly = (self.exit_steps == 0) & ((cdf >= float(self.mode.threshold or 0.0)) | last)
        if bool(newly.any()):
            chosen = self.head(latent[newly])
            if self.logits is None:
                self.logits = torch.zeros(
                    *lam.shape, chosen.shape[-1], dtype=chosen.dtype, device=chosen.device
                )
            self.logits[newly] = chosen
            self.exit_steps[newly] = iteration
