"""The state stream: every hidden state the model produces, handed to consumers as it is made.

Sites (block indices are 0-based like the module paths, iterations 1-based):
``embed``, ``prelude.{i}``, ``adapter`` (per iteration), ``core.{j}`` (per iteration),
``latent`` (``ln_f`` of the last iteration), ``coda.{i}``, ``final`` (after the last ``ln_f``).

The **unrolled order** numbers block outputs: prelude blocks, then core blocks t-major, then coda
blocks (Huginn-3.5B at 16 iterations: 2 + 16 × 4 + 2 = 68). Sites that are not block outputs
(``embed``, ``adapter``, ``latent``, ``final``) have ``unrolled_index = -1``.

Nothing is kept unless a consumer keeps it, so probing 128 iterations costs the memory of one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from jaxtyping import Float
from torch import Tensor

SITE_KINDS = ("embed", "prelude", "adapter", "core", "latent", "coda", "final")
_SITE_RE = re.compile(r"^(embed|adapter|latent|final)$|^(prelude|core|coda)\.(\d+)$")

Positions = Literal["all", "last"] | Sequence[int]


@dataclass(frozen=True)
class SiteLayout:
    """How many blocks each stage has; turns (site, iteration) into unrolled indices."""

    prelude: int
    core: int
    coda: int

    def parse(self, site: str) -> tuple[str, int]:
        """``"core.2"`` -> ``("core", 2)``; raises ``ValueError`` for a site this model lacks."""
        match = _SITE_RE.match(site)
        if not match:
            raise ValueError(f"unknown site {site!r}; sites are {self.describe()}")
        if match.group(1):
            return match.group(1), -1
        kind, block = match.group(2), int(match.group(3))
        limit = {"prelude": self.prelude, "core": self.core, "coda": self.coda}[kind]
        if block >= limit:
            raise ValueError(f"site {site!r} does not exist: the model has {limit} {kind} block(s)")
        return kind, block

    def describe(self) -> str:
        return (
            f"embed, prelude.0..{self.prelude - 1}, adapter, core.0..{self.core - 1}, latent, "
            f"coda.0..{self.coda - 1}, final"
        )

    def all_sites(self) -> list[str]:
        return (
            ["embed"]
            + [f"prelude.{i}" for i in range(self.prelude)]
            + ["adapter"]
            + [f"core.{j}" for j in range(self.core)]
            + ["latent"]
            + [f"coda.{i}" for i in range(self.coda)]
            + ["final"]
        )

    def block_sites(self) -> list[str]:
        """Sites that are block outputs (those with an unrolled index)."""
        return [s for s in self.all_sites() if "." in s]

    def unrolled_index(self, site: str, iteration: int, num_steps: int) -> int:
        kind, block = self.parse(site)
        if kind == "prelude":
            return block
        if kind == "core":
            return self.prelude + (iteration - 1) * self.core + block
        if kind == "coda":
            return self.prelude + num_steps * self.core + block
        return -1

    def num_unrolled(self, num_steps: int) -> int:
        return self.prelude + num_steps * self.core + self.coda


@dataclass
class State:
    """One hidden state as it goes by: where it came from and the tensor ``[B, P, d]``.

    ``positions`` are the token positions of the second axis (``None`` = all positions).
    """

    site: str
    iteration: int
    block: int
    unrolled_index: int
    tensor: Float[Tensor, "B P d"]
    positions: Tensor | None = None
    num_steps: int = 0

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

    def __init__(self, consumers: Iterable[StateConsumer], layout: SiteLayout) -> None:
        self.consumers = list(consumers)
        for consumer in self.consumers:
            for site in getattr(consumer, "sites", None) or ():
                if site not in ("prelude", "core", "coda"):  # a stage name subscribes to all its blocks
                    layout.parse(site)
            pos = getattr(consumer, "positions", "all")
            if isinstance(pos, str) and pos not in ("all", "last"):
                raise ValueError(f"positions must be 'all', 'last' or a list of ints, got {pos!r}")
        self.layout = layout

    def wants(self, site: str) -> bool:
        return any(self._subscribed(c, site) for c in self.consumers)

    @staticmethod
    def _subscribed(consumer: StateConsumer, site: str) -> bool:
        sites = getattr(consumer, "sites", None)
        return sites is None or site in sites or site.split(".")[0] in sites

    def emit(self, site: str, iteration: int, tensor: Tensor, num_steps: int) -> None:
        if not self.consumers:
            return
        kind, block = self.layout.parse(site)
        unrolled = self.layout.unrolled_index(site, iteration, num_steps)
        for consumer in self.consumers:
            if not self._subscribed(consumer, site):
                continue
            selected, positions = select_positions(tensor, getattr(consumer, "positions", "all"))
            consumer(State(site, iteration, block, unrolled, selected, positions, num_steps))


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
