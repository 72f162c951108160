"""Interventions across iterations: patch, ablate, steer, freeze and re-inject a looped model's states.

An intervention is addressed exactly like the stream (:mod:`lens.stream`): a **site** (``embed``,
``prelude.i``, ``adapter``, ``core.j``, ``latent``, ``coda.i``, ``final``), the **iterations** it
applies to (1..T at recurrent sites; non-recurrent sites run once) and the token **positions** (and,
optionally, the batch **rows**). Kinds:

=========================  ============================================================================
:class:`Patch`             replace the state with a given one (activation patching: states from another run,
                           :meth:`Patch.from_trace`)
:class:`Ablate`            zero, mean (over reference states) or resample (another prompt's states) ablation
:class:`Steer`             add a vector over a range of iterations
:class:`Freeze`            stop the loop's update from iteration t on: every recurrent site repeats its
                           state of iteration t − 1 and the coda reads the held state
:class:`Reinject`          re-inject a different input through the adapter (patch the injection, not the
                           state); families without an adapter (Ouro) refuse it
:class:`RowPatches`        many single-site patches at once, one per batch row (what batched sweeps use)
:class:`RowReinjections`   many re-injections at once, one per batch row
=========================  ============================================================================

Interventions are compiled into hook functions on the model's TransformerLens-style hook points
(``layout.hook_name(site)``; the injection's ``hook_injection``), so several compose in one forward
(applied in the order given), every streaming consumer (lenses, recorders, traces) reads the patched
run, and hooks added after them (``fwd_hooks``, ``run_with_cache``, nnsight) see the patched values.
Reading passes that consumers run themselves (the Coda Lens decoding a state) are never patched. An
intervention-free forward pays nothing: no hook is registered.

Everything is checked before the forward runs: a site the model lacks, an iteration outside 1..T, a
position or row outside the input, a replacement of the wrong shape or dtype is one
:class:`lens.errors.InputError`.

Example:
    >>> import torch, lens
    >>> model = lens.RecurrentDepthLM(lens.RecurrentDepthConfig(n_embd=32, n_heads=2, vocab_size=50))
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> clean = model(ids, num_steps=4, init_state="zeros", return_trace=["core.1"]).trace
    >>> corrupt = torch.tensor([[1, 2, 9, 4]])
    >>> out = model.run_with_interventions(
    ...     corrupt, [Patch.from_trace(clean, "core.1", iteration=2, positions=[2])], num_steps=4,
    ...     init_state="zeros")
    >>> tuple(out.logits.shape)
    (1, 4, 50)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from lens.errors import InputError
from lens.stream import Trace, inside_consumer

if TYPE_CHECKING:
    from lens.looped import LoopedLM, RecurrentDepthOutput

__all__ = [
    "Ablate",
    "Freeze",
    "Intervention",
    "Patch",
    "Reinject",
    "RowPatches",
    "RowReinjections",
    "Steer",
    "intervene",
    "run_with_interventions",
]

Iterations = int | Sequence[int] | range | None
PositionSpec = Literal["all", "last"] | int | Sequence[int]
Rows = int | Sequence[int] | None
EditFn = Callable[[Tensor, int], Tensor]


# ---------------------------------------------------------------------------------------- binding
@dataclass
class Binding:
    """What an intervention is checked against: the model, the depth and the input's shape."""

    model: LoopedLM
    num_steps: int
    batch: int
    seq_len: int

    @property
    def layout(self) -> Any:
        return self.model.layout

    @property
    def width(self) -> int:
        return int(self.model.config.n_embd)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def hook_iterations(self, site: str, iterations: Iterations) -> tuple[int, ...]:
        """The hook iterations (``hook.iteration``) a site is edited at; checks them against 1..T.

        Recurrent sites fire at iterations 1..T (``None`` = all of them); other sites fire once, at hook
        iteration 0 (give ``None``, ``0`` or, for a ``latent`` handed on once, the stream's ``T``).
        """
        T = self.num_steps
        if self.layout.is_recurrent(site):
            if iterations is None:
                return tuple(range(1, T + 1))
            its = _int_list(iterations, "iteration")
            if not its:
                raise InputError(f"no iterations given for {site!r}")
            bad = [t for t in its if not 1 <= t <= T]
            if bad:
                raise InputError(
                    f"iteration {bad[0]} of {site!r} is outside 1..{T}: the forward runs num_steps={T} "
                    "iterations (iterations are 1-based)"
                )
            return tuple(sorted(set(its)))
        its = [] if iterations is None else _int_list(iterations, "iteration")
        allowed = {0} | ({T} if site == "latent" else set())
        if any(t not in allowed for t in its):
            raise InputError(
                f"site {site!r} is not recurrent: it runs once (iteration 0"
                + (f", or {T} as the stream numbers the latent" if site == "latent" else "")
                + f"), got iteration(s) {its}"
            )
        return (0,)

    def positions(self, positions: PositionSpec) -> Tensor:
        """Token positions as a long tensor (``"all"``, ``"last"``, an int or ints; negatives count
        from the end), checked against the input's length."""
        S = self.seq_len
        if isinstance(positions, str):
            if positions == "all":
                return torch.arange(S)
            if positions == "last":
                return torch.tensor([S - 1])
            raise InputError(f"positions must be 'all', 'last', an int or a list of ints, got {positions!r}")
        index = torch.tensor(_int_list(positions, "position"), dtype=torch.long)
        if not index.numel():
            raise InputError("no positions given")
        if index.min() < -S or index.max() >= S:
            raise InputError(f"positions {index.tolist()} are outside a sequence of {S} tokens")
        if (index % S).unique().numel() < index.numel():
            raise InputError(f"positions {index.tolist()} name one position twice")
        return index % S

    def rows(self, rows: Rows) -> Tensor:
        """Batch rows as a long tensor (``None`` = every row), checked against the batch size."""
        B = self.batch
        if rows is None:
            return torch.arange(B)
        index = torch.tensor(_int_list(rows, "row"), dtype=torch.long)
        if not index.numel():
            raise InputError("no batch rows given")
        if index.min() < -B or index.max() >= B:
            raise InputError(f"batch rows {index.tolist()} are outside a batch of {B}")
        if (index % B).unique().numel() < index.numel():
            raise InputError(f"batch rows {index.tolist()} name one row twice")
        return index % B

    def check_entries(self, rows: Tensor, positions: Tensor, iterations: Tensor, what: str) -> None:
        """Rows and positions of per-row entries inside the input, no (row, position, iteration) twice."""
        B, S = self.batch, self.seq_len
        if rows.numel() and (rows.min() < -B or rows.max() >= B):
            raise InputError(f"{what}: batch rows {rows.tolist()[:8]} … are outside a batch of {B}")
        if positions.numel() and (positions.min() < -S or positions.max() >= S):
            raise InputError(f"{what}: positions outside a sequence of {S} tokens")
        key = ((rows % B) * S + positions % S) * (self.num_steps + 1) + iterations
        if key.unique().numel() < key.numel():
            raise InputError(f"{what}: one (row, position, iteration) is patched twice")

    def check_reference(self, value: Any, what: str) -> None:
        """``value`` checked as states ``[…, d]`` of the model's dtype, free of NaN/Inf."""
        if not isinstance(value, Tensor):
            raise InputError(f"{what} must be a tensor, got {type(value).__name__}")
        if value.dtype != self.dtype:
            raise InputError(f"{what} have dtype {value.dtype}, the model's states are {self.dtype}")
        if value.dim() == 0 or value.shape[-1] != self.width or not value.numel():
            raise InputError(f"{what} have shape {tuple(value.shape)}; they must be [..., {self.width}]")
        if not torch.isfinite(value).all():
            raise InputError(f"{what} hold NaN or Inf values")

    def replacement(self, value: Any, what: str, shape: Sequence[int]) -> Tensor:
        """``value`` checked as a tensor of the model's dtype broadcastable to ``shape`` (last axis d)."""
        if not isinstance(value, Tensor):
            raise InputError(f"{what} must be a tensor, got {type(value).__name__}")
        if value.dtype != self.dtype:
            raise InputError(
                f"{what} has dtype {value.dtype}, the model's states are {self.dtype} "
                "(cast it with .to(model.dtype) if that is what you mean)"
            )
        if value.dim() == 0 or value.dim() > len(shape) or value.shape[-1] != shape[-1]:
            raise InputError(
                f"{what} has shape {tuple(value.shape)}; it must end in the model width {shape[-1]} and "
                f"broadcast to {tuple(shape)}"
            )
        try:
            torch.broadcast_shapes(tuple(value.shape), tuple(shape))
        except RuntimeError:
            raise InputError(
                f"{what} has shape {tuple(value.shape)}, which does not broadcast to {tuple(shape)}"
            ) from None
        if not torch.isfinite(value).all():
            raise InputError(f"{what} holds NaN or Inf values")
        return value.to(self.device).expand(*shape)


def _int_list(values: Any, what: str) -> list[int]:
    if isinstance(values, Tensor):
        values = values.tolist()
    if isinstance(values, int) and not isinstance(values, bool):
        return [values]
    if isinstance(values, range | Sequence) and not isinstance(values, str | bytes):
        out = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise InputError(f"{what}s must be integers, got {v!r}")
            out.append(int(v))
        return out
    raise InputError(f"{what}s must be an integer or a list of integers, got {values!r}")


@dataclass
class Edit:
    """One compiled edit: at hook point ``hook`` and hook iterations ``iterations``, ``x = fn(x, t)``."""

    hook: str
    iterations: frozenset[int]
    fn: EditFn


def _put(x: Tensor, rows: Tensor, positions: Tensor, value: Tensor) -> Tensor:
    """``x`` with ``x[rows, positions] = value`` (``value`` ``[R, P, …]``), out of place."""
    r = rows.to(x.device)[:, None].expand(-1, positions.numel())
    p = positions.to(x.device)[None, :].expand(rows.numel(), -1)
    return x.index_put((r, p), value.to(x.dtype))


def _check_state(x: Tensor, binding: Binding, hook: str) -> None:
    if x.shape[0] != binding.batch or x.shape[1] != binding.seq_len:
        raise InputError(
            f"{hook}: the interventions were checked for input [{binding.batch}, {binding.seq_len}], "
            f"but the forward runs [{x.shape[0]}, {x.shape[1]}]"
        )


# ---------------------------------------------------------------------------------------- kinds
class Intervention(ABC):
    """Something that edits states during a forward pass; :meth:`compile` turns it into hook edits."""

    @abstractmethod
    def compile(self, binding: Binding) -> list[Edit]:
        """Check against ``binding`` and return the edits (raises ``InputError`` on bad input)."""


@dataclass(frozen=True)
class _Located(Intervention):
    site: str
    iteration: Iterations = None
    positions: PositionSpec = "all"
    rows: Rows = None

    def _where(self, binding: Binding) -> tuple[str, tuple[int, ...], Tensor, Tensor]:
        binding.layout.parse(self.site)  # a site the model lacks: InputError
        return (
            binding.layout.hook_name(self.site),
            binding.hook_iterations(self.site, self.iteration),
            binding.rows(self.rows),
            binding.positions(self.positions),
        )


@dataclass(frozen=True)
class Patch(_Located):
    """Replace the state at ``site`` (``iteration``, ``positions``, ``rows``) with ``value``.

    ``value`` broadcasts to ``[rows, positions, d]`` (a ``[d]`` vector, a ``[P, d]`` block or one state
    per row) and has the model's dtype; the same value is written at every listed iteration. To patch
    in another run's states, iteration by iteration, use :meth:`from_trace`.
    """

    value: Tensor | None = None

    def compile(self, binding: Binding) -> list[Edit]:
        hook, its, rows, positions = self._where(binding)
        shape = (rows.numel(), positions.numel(), binding.width)
        value = binding.replacement(self.value, f"the replacement for {self.site!r}", shape)

        def fn(x: Tensor, t: int) -> Tensor:
            _check_state(x, binding, hook)
            return _put(x, rows, positions, value)

        return [Edit(hook, frozenset(its), fn)]

    @classmethod
    def from_trace(
        cls,
        trace: Trace,
        site: str,
        iteration: Iterations = None,
        positions: PositionSpec = "all",
        rows: Rows = None,
        source_positions: PositionSpec | None = None,
        source_rows: Rows = None,
    ) -> Intervention:
        """Patch ``site`` with the states another run produced there (``model(…, return_trace=…)``).

        Each patched iteration takes the source's state of the same iteration; ``source_positions``
        (default: the same positions) and ``source_rows`` (default: the same rows, or the source's only
        row) map the patched positions and rows to the source's, for prompts of different lengths.
        """
        if not isinstance(trace, Trace):
            raise InputError(f"from_trace needs a lens.Trace (return_trace=...), got {type(trace).__name__}")
        if site not in trace:
            raise InputError(f"the trace holds no states of {site!r}; it holds {trace.sites()}")
        return _TracePatch(site, iteration, positions, rows, trace, source_positions, source_rows)


@dataclass(frozen=True)
class _TracePatch(_Located):
    trace: Trace | None = None
    source_positions: PositionSpec | None = None
    source_rows: Rows = None

    def compile(self, binding: Binding) -> list[Edit]:
        hook, its, rows, positions = self._where(binding)
        assert self.trace is not None
        states, iterations = self.trace.states[self.site], self.trace.iterations[self.site]
        recurrent = binding.layout.is_recurrent(self.site)
        by_iteration = {t if recurrent else 0: s for t, s in zip(iterations, states, strict=True)}
        missing = [t for t in its if t not in by_iteration]
        if missing:
            raise InputError(
                f"the trace has no state of {self.site!r} at iteration {missing[0]} "
                f"(it ran {max(iterations) if iterations else 0} iterations)"
            )
        first = by_iteration[its[0]]
        source = Binding(binding.model, binding.num_steps, first.shape[0], first.shape[1])
        src_pos = positions if self.source_positions is None else source.positions(self.source_positions)
        if src_pos.numel() != positions.numel():
            raise InputError(
                f"{positions.numel()} patched positions but {src_pos.numel()} source positions for {self.site!r}"
            )
        if self.source_rows is not None:
            src_rows = source.rows(self.source_rows)
        elif first.shape[0] == 1:
            src_rows = torch.zeros(rows.numel(), dtype=torch.long)
        else:
            src_rows = source.rows(rows.tolist())
        if src_rows.numel() not in (1, rows.numel()):
            raise InputError(f"{rows.numel()} patched rows but {src_rows.numel()} source rows")
        shape = (rows.numel(), positions.numel(), binding.width)
        values = {}
        for t in its:
            state = by_iteration[t]
            picked = state[src_rows.to(state.device)][:, src_pos.to(state.device)]
            values[t] = binding.replacement(
                picked, f"the traced state of {self.site!r} at iteration {t}", shape
            )

        def fn(x: Tensor, t: int) -> Tensor:
            _check_state(x, binding, hook)
            return _put(x, rows, positions, values[t])

        return [Edit(hook, frozenset(its), fn)]


@dataclass(frozen=True)
class Ablate(_Located):
    """Zero, mean or resample ablation of the state at ``site``.

    ``kind="zero"`` writes zeros; ``"mean"`` the mean of ``reference`` (states ``[…, d]`` of the same
    site, say a trace over a dataset; with ``per_position`` a ``[N, S, d]`` reference is averaged over
    prompts only and each patched position gets its own mean); ``"resample"`` gives each patched row
    the states of a randomly drawn row of ``reference`` ``[N, S, d]`` (drawn with ``seed``).
    """

    kind: Literal["zero", "mean", "resample"] = "zero"
    reference: Tensor | None = None
    per_position: bool = False
    seed: int = 0

    def compile(self, binding: Binding) -> list[Edit]:
        hook, its, rows, positions = self._where(binding)
        R, P, d = rows.numel(), positions.numel(), binding.width
        ref = self.reference
        if self.kind == "zero":
            value = torch.zeros(d, dtype=binding.dtype, device=binding.device)
        elif self.kind in ("mean", "resample"):
            binding.check_reference(ref, f"the reference states of the {self.kind} ablation")
            assert isinstance(ref, Tensor)  # check_reference raised otherwise
            if self.kind == "resample" or self.per_position:
                if ref.dim() != 3 or ref.shape[1] != binding.seq_len:
                    raise InputError(
                        f"{'resample' if self.kind == 'resample' else 'per-position mean'} ablation needs "
                        f"reference states [N, {binding.seq_len}, {d}] (prompts of the input's length), "
                        f"got {tuple(ref.shape)}"
                    )
            if self.kind == "mean":
                value = (
                    ref.mean(0)[positions.to(ref.device)] if self.per_position else ref.reshape(-1, d).mean(0)
                )
            else:
                gen = torch.Generator().manual_seed(self.seed)
                drawn = torch.randint(0, ref.shape[0], (R,), generator=gen)
                value = ref[drawn.to(ref.device)][:, positions.to(ref.device)]
        else:
            raise InputError(f"ablation kind must be 'zero', 'mean' or 'resample', got {self.kind!r}")
        value = binding.replacement(value, f"the {self.kind} ablation of {self.site!r}", (R, P, d))

        def fn(x: Tensor, t: int) -> Tensor:
            _check_state(x, binding, hook)
            return _put(x, rows, positions, value)

        return [Edit(hook, frozenset(its), fn)]


@dataclass(frozen=True)
class Steer(_Located):
    """Add ``scale * vector`` to the state at ``site`` over ``iteration`` (a range; default every one)."""

    vector: Tensor | None = None
    scale: float = 1.0

    def compile(self, binding: Binding) -> list[Edit]:
        hook, its, rows, positions = self._where(binding)
        if not isinstance(self.scale, int | float) or not math.isfinite(self.scale):
            raise InputError(f"scale must be a finite number, got {self.scale!r}")
        shape = (rows.numel(), positions.numel(), binding.width)
        delta = binding.replacement(self.vector, f"the steering vector for {self.site!r}", shape) * self.scale

        def fn(x: Tensor, t: int) -> Tensor:
            _check_state(x, binding, hook)
            r = rows.to(x.device)[:, None]
            p = positions.to(x.device)[None, :]
            return _put(x, rows, positions, x[r, p] + delta)

        return [Edit(hook, frozenset(its), fn)]


@dataclass(frozen=True)
class Freeze(Intervention):
    """Stop the loop's update from iteration ``from_iteration`` on (2..T), in ``rows`` (default all).

    Every recurrent site (adapter, core blocks, a latent fed back each iteration and the exit gate's
    λ_t) repeats at iterations ``t >= from_iteration`` the state it had at ``from_iteration - 1``, so
    the stream shows a held loop and the coda reads the held state (as if the model had run
    ``from_iteration - 1`` iterations); with a key/value cache the held iterations' keys equal those of
    iteration ``from_iteration - 1``.
    """

    from_iteration: int = 2
    rows: Rows = None

    def compile(self, binding: Binding) -> list[Edit]:
        t0 = self.from_iteration
        T = binding.num_steps
        if isinstance(t0, bool) or not isinstance(t0, int) or not 2 <= t0 <= T:
            raise InputError(
                f"Freeze(from_iteration={t0!r}) must be in 2..{T}: iterations are 1-based and iteration "
                "from_iteration - 1 supplies the held states (num_steps={T})".replace("{T}", str(T))
            )
        layout = binding.layout
        rows = binding.rows(self.rows)
        mask = torch.zeros(binding.batch, dtype=torch.bool)
        mask[rows] = True
        hooks = ([layout.hook_name("adapter")] if layout.adapter else []) + [
            layout.hook_name(f"core.{j}") for j in range(layout.core)
        ]
        if layout.latent_per_iteration:
            hooks.append(layout.hook_name("latent"))
        if layout.exit_gate:
            hooks.append("hook_exit_lambda")
        edits = []
        for hook in hooks:
            held: dict[str, Tensor] = {}

            def fn(x: Tensor, t: int, held: dict[str, Tensor] = held, hook: str = hook) -> Tensor:
                if t == t0 - 1:
                    held["x"] = x
                    return x
                _check_state(x, binding, hook)
                keep = mask.to(x.device).reshape(-1, *([1] * (x.dim() - 1)))
                return torch.where(keep, held["x"], x)

            edits.append(Edit(hook, frozenset(range(t0 - 1, T + 1)), fn))
        return edits


@dataclass(frozen=True)
class Reinject(Intervention):
    """Re-inject a different input through the adapter at ``iteration`` (default every one).

    The adapter mixes the state with the prelude's output (the injection) at every iteration; this
    replaces the injection at ``positions`` of ``rows`` with that of another input: ``input_ids``
    (``[1 or B, S]`` token ids, run through the model's embedding and prelude) or ``embedded`` (the
    prelude's output ``[1 or B, S, d]``, e.g. a trace of the last prelude site). Only families with an
    adapter have an injection (Huginn, retrofits); Ouro refuses it.
    """

    input_ids: Tensor | None = None
    embedded: Tensor | None = None
    iteration: Iterations = None
    positions: PositionSpec = "all"
    rows: Rows = None

    def compile(self, binding: Binding) -> list[Edit]:
        layout = binding.layout
        if not layout.adapter:
            raise InputError(
                f"{layout.family} models have no adapter, so there is no injection to re-inject "
                "(their loop starts from the embeddings and re-reads nothing); patch a state instead"
            )
        if (self.input_ids is None) == (self.embedded is None):
            raise InputError(
                "Reinject needs exactly one of input_ids= (token ids) or embedded= (prelude output)"
            )
        its = binding.hook_iterations("adapter", self.iteration)
        rows, positions = binding.rows(self.rows), binding.positions(self.positions)
        if self.input_ids is not None:
            ids = self.input_ids
            if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[1] != binding.seq_len:
                raise InputError(
                    f"Reinject input_ids must be [1 or B, {binding.seq_len}] token ids (the length of the "
                    f"patched input), got {tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}"
                )
            embedded = prelude_output(binding.model, ids.to(binding.device))
        else:
            assert self.embedded is not None  # exactly one of input_ids / embedded (checked above)
            embedded = self.embedded
        B_src = embedded.shape[0] if isinstance(embedded, Tensor) and embedded.dim() == 3 else 1
        if B_src not in (1, binding.batch):
            raise InputError(f"the re-injected input has {B_src} rows; give 1 or {binding.batch}")
        embedded = binding.replacement(
            embedded, "the re-injected input (prelude output)", (B_src, binding.seq_len, binding.width)
        )
        with torch.no_grad():
            injection = binding.model.injection(embedded)
        src_rows = rows if B_src > 1 else torch.zeros_like(rows)
        value = injection[src_rows.to(injection.device)][:, positions.to(injection.device)]

        def fn(x: Tensor, t: int) -> Tensor:
            _check_state(x, binding, "hook_injection")
            return _put(x, rows, positions, value)

        return [Edit("hook_injection", frozenset(its), fn)]


@dataclass(frozen=True)
class RowPatches(Intervention):
    """Many single-site patches in one batch: row ``rows[i]`` gets ``values[i]`` at ``site``,
    iteration ``iterations[i]``, position ``positions[i]`` (rows may repeat).

    This is how a sweep puts its patches on the batch axis: one forward of R rows runs R patched runs.
    """

    site: str
    iterations: Tensor
    positions: Tensor
    values: Tensor
    rows: Tensor | None = None  # default: row i patched by entry i

    def compile(self, binding: Binding) -> list[Edit]:
        layout = binding.layout
        layout.parse(self.site)
        hook = layout.hook_name(self.site)
        n = self.values.shape[0] if isinstance(self.values, Tensor) and self.values.dim() else 0
        rows = torch.arange(n) if self.rows is None else torch.as_tensor(self.rows, dtype=torch.long).cpu()
        its = torch.as_tensor(self.iterations, dtype=torch.long).cpu()
        pos = torch.as_tensor(self.positions, dtype=torch.long).cpu()
        if not (rows.shape == its.shape == pos.shape == (n,)):
            raise InputError(
                f"RowPatches: rows, iterations and positions must each hold one entry per value ({n}), got "
                f"{tuple(rows.shape)}, {tuple(its.shape)}, {tuple(pos.shape)}"
            )
        binding.check_entries(rows, pos, its, "RowPatches")
        values = binding.replacement(self.values, f"RowPatches values for {self.site!r}", (n, binding.width))
        rows, pos = rows % max(binding.batch, 1), pos % max(binding.seq_len, 1)
        groups: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        for t in its.unique().tolist():
            (hook_t,) = binding.hook_iterations(self.site, [t])  # the same check (and error) as a Patch's
            sel = (its == t).nonzero().squeeze(1)
            groups[hook_t] = (rows[sel], pos[sel], values[sel.to(values.device)])

        def fn(x: Tensor, t: int) -> Tensor:
            _check_state(x, binding, hook)
            r, p, v = groups[t]
            return x.index_put((r.to(x.device), p.to(x.device)), v.to(x.dtype))

        return [Edit(hook, frozenset(groups), fn)]


@dataclass(frozen=True)
class RowReinjections(Intervention):
    """Many re-injections in one batch: row ``rows[i]`` re-injects ``embedded[i]`` (a prelude output
    ``[d]``, another input's) at position ``positions[i]`` at every iteration from ``from_iterations[i]``
    to T (rows may repeat, to re-inject several positions). The batched form of :class:`Reinject`."""

    from_iterations: Tensor
    positions: Tensor
    embedded: Tensor
    rows: Tensor | None = None

    def compile(self, binding: Binding) -> list[Edit]:
        layout = binding.layout
        if not layout.adapter:
            raise InputError(f"{layout.family} models have no adapter, so there is no injection to re-inject")
        n = self.embedded.shape[0] if isinstance(self.embedded, Tensor) and self.embedded.dim() else 0
        rows = torch.arange(n) if self.rows is None else torch.as_tensor(self.rows, dtype=torch.long).cpu()
        start = torch.as_tensor(self.from_iterations, dtype=torch.long).cpu()
        pos = torch.as_tensor(self.positions, dtype=torch.long).cpu()
        if not (rows.shape == start.shape == pos.shape == (n,)):
            raise InputError(
                f"RowReinjections: rows, from_iterations and positions must each hold one entry per value ({n})"
            )
        binding.check_entries(rows, pos, torch.zeros_like(start), "RowReinjections")
        if n:
            binding.hook_iterations("adapter", start.unique().tolist())
        embedded = binding.replacement(self.embedded, "RowReinjections embedded", (n, binding.width))
        with torch.no_grad():
            values = binding.model.injection(embedded[:, None])[:, 0]
        rows, pos = rows % max(binding.batch, 1), pos % max(binding.seq_len, 1)
        groups: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        for t in range(1, binding.num_steps + 1):
            sel = (start <= t).nonzero().squeeze(1)
            if sel.numel():
                groups[t] = (rows[sel], pos[sel], values[sel.to(values.device)])

        def fn(x: Tensor, t: int) -> Tensor:
            _check_state(x, binding, "hook_injection")
            r, p, v = groups[t]
            return x.index_put((r.to(x.device), p.to(x.device)), v.to(x.dtype))

        return [Edit("hook_injection", frozenset(groups), fn)]


# ---------------------------------------------------------------------------------------- running
def prelude_output(model: LoopedLM, input_ids: Tensor) -> Tensor:
    """The embedded input after the prelude (what the adapter re-injects), computed by the model's own
    forward pass up to the loop and no further."""
    last = None
    stream = model.iter_states(input_ids, 1, "zeros" if model.layout.adapter else None, logits="none")
    with torch.no_grad():
        for site, _, tensor in stream:
            if site in ("adapter",) or site.startswith("core"):
                break
            last = tensor
    stream.close()
    assert last is not None
    return last


def _steps(model: LoopedLM, num_steps: Any) -> int:
    free, grad = model._check_steps(num_steps)
    return free + grad


@contextmanager
def intervene(
    model: LoopedLM,
    interventions: Sequence[Intervention],
    num_steps: Any = None,
    *,
    batch: int,
    seq_len: int,
) -> Iterator[list[Edit]]:
    """Apply ``interventions`` to every forward pass run inside the ``with`` block.

    They are checked against ``num_steps`` iterations and an input of ``[batch, seq_len]`` tokens before
    anything runs; on exit exactly the hooks added here are removed (others stay).
    """
    interventions = list(interventions)
    for item in interventions:
        if not isinstance(item, Intervention):
            raise InputError(f"not an intervention: {item!r} (use Patch, Ablate, Steer, Freeze, Reinject, …)")
    binding = Binding(model, _steps(model, num_steps), int(batch), int(seq_len))
    edits = [edit for item in interventions for edit in item.compile(binding)]
    by_hook: dict[str, list[Edit]] = {}
    for edit in edits:
        by_hook.setdefault(edit.hook, []).append(edit)
    handles = []
    try:
        for name, group in by_hook.items():
            point = model.hook_dict.get(name)
            if point is None:
                raise InputError(f"the model has no hook point {name!r}")

            def hook_fn(x: Tensor, *, hook: Any, group: list[Edit] = group) -> Tensor | None:
                if inside_consumer():  # a reader's own pass (the Coda Lens): never patched
                    return None
                t = hook.iteration
                for edit in group:
                    if t in edit.iterations:
                        x = edit.fn(x, t)
                return x

            handles.append(point.add_hook(hook_fn))
        yield edits
    finally:
        for handle in handles:
            handle.remove()
        for name in by_hook:
            point = model.hook_dict.get(name)
            if point is not None:
                point._handles = [(h, p) for h, p in point._handles if h not in handles]


def run_with_interventions(
    model: LoopedLM,
    input_ids: Tensor,
    interventions: Sequence[Intervention],
    num_steps: Any = None,
    *,
    fwd_hooks: Sequence[tuple[Any, Callable[..., Any]]] = (),
    **kwargs: Any,
) -> RecurrentDepthOutput:
    """One forward pass of ``model`` with ``interventions`` applied (and ``fwd_hooks`` after them).

    ``kwargs`` go to ``model.forward`` (``init_state``, ``consumers``, ``return_trace``, …).
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise InputError("input_ids must be a [batch, seq] tensor of token ids")
    B, S = input_ids.shape
    with intervene(model, interventions, num_steps, batch=B, seq_len=S):
        if fwd_hooks:
            with model.hooks(fwd_hooks):
                return model(input_ids, num_steps, **kwargs)
        return model(input_ids, num_steps, **kwargs)
