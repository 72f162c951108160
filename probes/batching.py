"""The one batch driver: token lists → left-padded batches → forward passes with stream consumers.

``probe_prompts``, ``probe_dataset``, the Tuned Lens trainer and the linear probes all run prompts
through :func:`forward_batches`, so padding, the attention mask, the random initial state and the
progress bar behave the same everywhere. Prompts are left-padded: position ``-1`` is every prompt's
last token. :func:`select_positions` turns a ``positions`` request into per-prompt indices into the
padded batch, relative to each prompt's own tokens (position 0 is a prompt's first token, never
padding).

Example:
    >>> import torch, lens
    >>> model = lens.RecurrentDepthLM(lens.RecurrentDepthConfig(n_embd=32, n_heads=2, vocab_size=50))
    >>> for batch, out, _ in forward_batches(model, [[1, 2, 3], [4, 5]], num_steps=2, batch_size=2):
    ...     print(batch.lengths, tuple(out.logits.shape))
    [3, 2] (2, 1, 50)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm import tqdm

from lens.errors import InputError
from lens.exit_criteria import ExitCriterion
from lens.generation import pad_left
from lens.model import InitState, LoopedLM, RecurrentDepthOutput, Steps
from lens.stream import Positions

__all__ = ["Batch", "PositionSelection", "batches", "forward_batches", "select_positions"]


@dataclass
class Batch:
    """Prompts ``start … start + len(lengths) - 1`` of the input, left-padded on the model's device."""

    start: int
    lengths: list[int]
    input_ids: Tensor  # [B, S]
    mask: Tensor  # [B, S], 1 = token, 0 = left padding

    @property
    def padded(self) -> bool:
        return min(self.lengths) < self.input_ids.shape[1]

    @property
    def attention_mask(self) -> Tensor | None:
        """The mask to pass to the model: ``None`` when nothing is padded (the unmasked fast path)."""
        return self.mask if self.padded else None

    @property
    def indices(self) -> range:
        """Indices of this batch's prompts in the input list."""
        return range(self.start, self.start + len(self.lengths))


def batches(model: LoopedLM, prompts: Sequence[Sequence[int]], batch_size: int) -> Iterator[Batch]:
    """Consecutive slices of ``prompts`` (token-id lists), left-padded with the model's pad id."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    pad = model.config.pad_token_id or 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = pad_left(chunk, pad)
        yield Batch(start, [len(p) for p in chunk], ids.to(model.device), mask.to(model.device))


def forward_batches(
    model: LoopedLM,
    prompts: Sequence[Sequence[int]],
    consumers: Callable[[Batch], list[Any]] | None = None,
    *,
    num_steps: Steps | None = None,
    batch_size: int = 16,
    init_state: InitState = None,
    seed: int = 0,
    logits: Literal["all", "last", "none"] = "last",
    exit_criterion: str | ExitCriterion | None = None,
    progress: bool = False,
    desc: str = "batches",
) -> Iterator[tuple[Batch, RecurrentDepthOutput, list[Any]]]:
    """Run every batch of ``prompts`` without gradients; yields ``(batch, output, consumers)``.

    ``consumers(batch)`` builds the stream consumers of one batch (recorders, collectors). One
    generator seeded with ``seed`` draws the random initial states of all batches in turn, so the
    same prompts in the same batches give the same numbers. ``exit_criterion`` (a name or an
    :class:`~lens.exit_criteria.ExitCriterion`) stops each prompt once its last position converged
    (``output.steps_used``); a fresh criterion state is used per batch.
    """
    if not prompts:
        raise InputError("no prompts to run")
    gen = torch.Generator(device=model.device).manual_seed(seed)
    total = -(-len(prompts) // batch_size) if isinstance(batch_size, int) and batch_size > 0 else None
    for batch in tqdm(
        batches(model, prompts, batch_size), total=total, desc=desc, disable=not progress, unit="batch"
    ):
        criterion = exit_criterion
        if isinstance(criterion, str):
            criterion = ExitCriterion(criterion)
        built = consumers(batch) if consumers is not None else []
        with torch.no_grad():
            out = model(
                batch.input_ids,
                num_steps,
                init_state,
                batch.attention_mask,
                consumers=built,
                logits=logits,
                generator=gen,
                exit_criterion=criterion,
            )
        yield batch, out, built


# ---------------------------------------------------------------------------------------------- positions


@dataclass(frozen=True)
class PositionSelection:
    """Where the requested positions sit in a left-padded batch.

    ``index[b, p]`` indexes the padded sequence axis; ``own[b, p]`` is the position as recorded (the
    token's index within prompt ``b``, or ``-1`` for ``positions="last"``); ``valid[b, p]`` is False
    where prompt ``b`` has no such token (a shorter prompt under ``positions="all"``).
    """

    index: Tensor
    own: Tensor
    valid: Tensor

    def gather(self, tensor: Tensor) -> Tensor:
        """``[B, S, …]`` → ``[B, P, …]`` at the selected positions of each row."""
        B = tensor.shape[0]
        if self.index.shape[0] != B:  # iterations stacked on the batch axis (the Coda Lens)
            reps = B // self.index.shape[0]
            index = self.index.repeat(reps, 1)
        else:
            index = self.index
        rows = torch.arange(B, device=tensor.device)[:, None]
        return tensor[rows, index.to(tensor.device)]


def select_positions(
    positions: Positions, mask: Tensor | None, batch: int, seq_len: int
) -> PositionSelection:
    """Per-prompt indices of ``positions`` (``"last"``, ``"all"`` or a list of ints) in a padded batch.

    Explicit positions count within each prompt's own tokens (``0`` = its first token, ``-1`` = its
    last); a position a prompt does not have is refused with an error naming the prompt, never read
    from padding. ``mask`` ``[B, S]`` marks real tokens (``None``: no padding).
    """
    if mask is not None:
        lengths = mask.sum(dim=1).long().cpu()
    else:
        lengths = torch.full((batch,), seq_len, dtype=torch.long)
    start = seq_len - lengths  # first real token of each row
    if isinstance(positions, str):
        if positions == "last":
            index = torch.full((batch, 1), seq_len - 1, dtype=torch.long)
            own = torch.full((batch, 1), -1, dtype=torch.long)
            return PositionSelection(index, own, torch.ones(batch, 1, dtype=torch.bool))
        if positions == "all":
            index = torch.arange(seq_len).expand(batch, seq_len).clone()
            own = index - start[:, None]
            return PositionSelection(index, own, own >= 0)
        raise InputError(f"positions must be 'all', 'last' or a list of ints, got {positions!r}")
    try:
        wanted = torch.as_tensor([int(p) for p in positions], dtype=torch.long)
    except (TypeError, ValueError) as exc:
        raise InputError(f"positions must be 'all', 'last' or a list of ints, got {positions!r}") from exc
    if wanted.numel() == 0:
        raise InputError("positions=[] selects no token; give at least one position, 'last' or 'all'")
    own = torch.where(wanted[None, :] >= 0, wanted[None, :], lengths[:, None] + wanted[None, :])
    bad = (own < 0) | (own >= lengths[:, None])
    if bad.any():
        b, p = (int(x) for x in bad.nonzero()[0])
        raise IndexError(
            f"position {int(wanted[p])} is out of range for prompt {b} of the batch, which has "
            f"{int(lengths[b])} tokens (positions count within each prompt's own tokens)"
        )
    index = start[:, None] + own
    # [1, -1] on a two-token prompt names one token twice: record it once
    repeated = (own[:, :, None] == own[:, None, :]).tril(diagonal=-1).any(dim=2)
    return PositionSelection(index, own, ~repeated)
