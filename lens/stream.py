"""The state stream: every hidden state the model produces, handed to consumers as it is made.

Which sites a model emits, in which order, and each state's unrolled index are its layout's
business (:class:`lens.layout.UnrolledLayout`, the one description of the unrolled order). Sites:
``embed``, ``prelude.{i}``, ``adapter`` (per iteration), ``core.{j}`` (per iteration), ``latent``,
``coda.{i}``, ``final``; block indices are 0-based like the module paths, iterations 1-based.

Nothing is kept unless a consumer keeps it, so probing 128 iterations costs the memory of one.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast

import torch
from jaxtyping import Float
from torch import Tensor

from lens.errors import InputError
from lens.layout import UnrolledLayout

Positions = Literal["all", "last"] | Sequence[int]

_CONSUMING: contextvars.ContextVar[bool] = contextvars.ContextVar("looplens_consuming", default=False)


def inside_consumer() -> bool:
    """Whether a stream consumer is running (its own passes, say the Coda Lens decoding a state through
    the coda, are reads of the run: interventions leave them alone)."""
    return _CONSUMING.get()


@dataclass
class Wavefront:
    """What the diffusion sampler knows about the positions of one of its forward passes (its window).

    ``step`` is the diffusion step (-1 for the prefill pass over the prompt). Every tensor is ``[B, P]``,
    one entry per row and window position: ``positions`` the absolute token
    position (-1 for padding, when rows' windows differ in length), ``recurrence`` the core iterations
    the position had received before this step, ``token`` its current token guess, ``frozen`` whether
    it is already frozen (the last frozen position stays in the window), ``stability`` how often its
    proposal has agreed with the guess so far. ``sequence`` ``[B]`` says which prompt of the sampler's
    call each row is (finished sequences leave the batch).
    """

    step: int
    positions: Tensor
    recurrence: Tensor
    token: Tensor
    frozen: Tensor
    stability: Tensor
    sequence: Tensor

    def select(self, positions: Positions) -> Wavefront:
        """The same positions a consumer selected from the states (``"all"``, ``"last"`` or indices)."""
        pos, rec, tok, frozen, stab = (
            select_positions(t[..., None], positions)[0][..., 0] for t in self._tensors()
        )
        return Wavefront(self.step, pos, rec, tok, frozen, stab, self.sequence)

    def _tensors(self) -> tuple[Tensor, ...]:
        return (self.positions, self.recurrence, self.token, self.frozen, self.stability)


@dataclass
class State:
    """One hidden state as it goes by: where it came from and the tensor ``[B, P, d]``.

    ``positions`` are the token positions of the second axis (``None`` = all positions). At the
    ``latent`` of an exit-gated family, ``exit_lambda`` carries the gate's reading at the same positions.
    States of the diffusion sampler's forward passes carry its ``wavefront`` (the diffusion step, and per
    position the recurrence count, token guess, frozen flag and stability count).
    """

    site: str
    iteration: int
    block: int
    unrolled_index: int
    tensor: Float[Tensor, "B P d"]
    positions: Tensor | None = None
    num_steps: int = 0
    exit_lambda: Float[Tensor, "B P"] | None = (
        None  # the exit gate's λ_t at this latent (exit-gated families)
    )
    wavefront: Wavefront | None = None  # the diffusion sampler's window (its forward passes only)

    @property
    def diffusion_step(self) -> int | None:
        """The diffusion step this state belongs to (None outside the diffusion sampler)."""
        return self.wavefront.step if self.wavefront is not None else None

    @property
    def frozen(self) -> Tensor | None:
        """``[B, P]``: whether each position is frozen (None outside the diffusion sampler)."""
        return self.wavefront.frozen if self.wavefront is not None else None

    @property
    def kind(self) -> str:
        return self.site.split(".")[0]


class StateConsumer(Protocol):
    """Anything that receives states: probes subscribe with ``sites`` and ``positions``."""

    sites: Sequence[str] | None  # None = every site
    positions: Positions

    def __call__(self, state: State) -> None: ...


@dataclass
class Subscription:
    """A plain callback with a site filter and a position filter (the simplest consumer)."""

    callback: Callable[[State], None]
    sites: Sequence[str] | None = None
    positions: Positions = "all"

    def __call__(self, state: State) -> None:
        self.callback(state)


def select_positions(tensor: Tensor, positions: Positions) -> tuple[Tensor, Tensor | None]:
    """Cut the position axis (dim 1) down to what a consumer asked for."""
    if isinstance(positions, str):
        if positions == "all":
            return tensor, None
        if positions == "last":
            return tensor[:, -1:], torch.tensor([tensor.shape[1] - 1])
        raise ValueError(f"positions must be 'all', 'last' or a list of ints, got {positions!r}")
    index = torch.as_tensor(list(positions), dtype=torch.long)
    S = tensor.shape[1]
    if index.numel() and (index.min() < -S or index.max() >= S):
        raise IndexError(f"positions {list(positions)} out of range for a sequence of {S} tokens")
    index = index % S
    return tensor[:, index.to(tensor.device)], index


class Dispatcher:
    """Routes each produced state to the consumers that subscribed to its site."""

    def __init__(
        self, consumers: Iterable[StateConsumer], layout: UnrolledLayout, wavefront: Wavefront | None = None
    ) -> None:
        self.consumers = list(consumers)
        self.wavefront = wavefront
        for consumer in self.consumers:
            for site in getattr(consumer, "sites", None) or ():
                if site not in ("prelude", "core", "coda"):  # a stage name subscribes to all its blocks
                    layout.parse(site)
            pos = getattr(consumer, "positions", "all")
            if isinstance(pos, str) and pos not in ("all", "last"):
                raise InputError(f"positions must be 'all', 'last' or a list of ints, got {pos!r}")
        self.layout = layout

    @staticmethod
    def _subscribed(consumer: StateConsumer, site: str) -> bool:
        sites = getattr(consumer, "sites", None)
        return sites is None or site in sites or site.split(".")[0] in sites

    def emit(
        self, site: str, iteration: int, tensor: Tensor, num_steps: int, exit_lambda: Tensor | None = None
    ) -> None:
        if not self.consumers:
            return
        kind, block = self.layout.parse(site)
        unrolled = self.layout.unrolled_index(site, iteration, num_steps)
        token = _CONSUMING.set(True)
        try:
            for consumer in self.consumers:
                if not self._subscribed(consumer, site):
                    continue
                # consumers that are not StateConsumers proper may lack the attribute: "all" then
                wanted = cast(Positions, getattr(consumer, "positions", "all"))
                selected, positions = select_positions(tensor, wanted)
                gate = select_positions(exit_lambda, wanted)[0] if exit_lambda is not None else None
                front = self.wavefront.select(wanted) if self.wavefront is not None else None
                consumer(State(site, iteration, block, unrolled, selected, positions, num_steps, gate, front))
        finally:
            _CONSUMING.reset(token)


@dataclass
class Trace:
    """States cached on request: per site a stacked tensor ``[T, B, P, d]`` (T = 1 for single-shot sites)."""

    states: dict[str, list[Tensor]] = field(default_factory=dict)
    iterations: dict[str, list[int]] = field(default_factory=dict)

    def __getitem__(self, site: str) -> Tensor:
        if site not in self.states:
            raise KeyError(f"site {site!r} was not traced; traced sites: {sorted(self.states)}")
        return torch.stack(self.states[site])

    def __contains__(self, site: str) -> bool:
        return site in self.states

    def sites(self) -> list[str]:
        return list(self.states)


class TraceCollector:
    """A consumer that keeps the states it sees (for ``return_trace=True``)."""

    def __init__(
        self,
        sites: Sequence[str] | None = None,
        positions: Positions = "all",
        device: str | torch.device | None = None,
    ) -> None:
        self.sites = sites
        self.positions = positions
        self.device = device
        self.trace = Trace()

    def __call__(self, state: State) -> None:
        tensor = state.tensor.detach()
        if self.device is not None:
            tensor = tensor.to(self.device)
        self.trace.states.setdefault(state.site, []).append(tensor)
        self.trace.iterations.setdefault(state.site, []).append(state.iteration)
