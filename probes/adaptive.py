"""What an adaptive-depth exit criterion sees: its value at every iteration, and where it would stop.

Huginn's adaptive exit stops iterating a token once, say, the KL divergence between the output
distributions of two successive iterations falls below a threshold (``lens.exit_criteria``). A
researcher asking *why* a token exits at iteration 7 wants that curve: :func:`exit_trace` runs the
forward pass once with the criterion attached (recording, never stopping) and returns the value it
read after each iteration at the prompt's last position, with the threshold and the first iteration
where the criterion would have let the token stop.

Example:
    >>> import lens
    >>> model = lens.load_model("tiny-arith")
    >>> trace = exit_trace(model, model.tokenizer.encode("Question: What is (2 * 3) + 1?\\nAnswer:"), 8)
    >>> list(trace.columns), len(trace), float(trace["threshold"].iloc[0])
    (['iteration', 'value', 'threshold', 'exits'], 8, 0.001)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor

from lens.errors import InputError
from lens.exit_criteria import ExitCriterion
from lens.model import LoopedLM

__all__ = ["exit_trace"]


@dataclass
class _Recording(ExitCriterion):
    """The criterion's own update, recorded per iteration; it never stops the pass."""

    values: list[float] = field(default_factory=list, init=False)
    stops: list[bool] = field(default_factory=list, init=False)

    def update(
        self, latent: Tensor, logits: Tensor | None, gate: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        value, stop = super().update(latent, logits, gate, mask)
        self.values.append(float(value[0]))
        self.stops.append(bool(stop[0]))
        return value, torch.zeros_like(stop)


def exit_trace(
    model: LoopedLM,
    token_ids: Sequence[int],
    num_steps: int,
    criterion: str = "kl",
    threshold: float | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per iteration: ``iteration``, the criterion's ``value`` at the last position (at t = 1 the
    KL criterion compares with a uniform distribution, as Huginn's code does), the ``threshold`` and ``exits`` (whether the criterion
    would let the token stop there). The initial state is drawn as ``probes.probe_prompts`` draws it for
    the same ``seed``, so the curve belongs to the probed pass."""
    if not token_ids:
        raise InputError("the prompt has no tokens")
    recorder = _Recording(criterion, threshold)
    if recorder.needs_gate and not model.layout.exit_gate:
        raise InputError(f"the 'gate' criterion needs an exit gate; {model.layout.family} models have none")
    ids = torch.tensor([list(token_ids)], dtype=torch.long, device=model.device)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        model(ids, num_steps=int(num_steps), logits="none", exit_criterion=recorder, generator=generator)
    assert recorder.threshold is not None  # ExitCriterion.__post_init__ fills in the default
    return pd.DataFrame(
        {
            "iteration": range(1, len(recorder.values) + 1),
            "value": recorder.values,
            "threshold": float(recorder.threshold),
            "exits": recorder.stops,
        }
    )
