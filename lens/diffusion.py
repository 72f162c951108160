"""The diffusion-forcing sampler: refine a whole wavefront of latent states at once, freeze what converged.

Geiping, Yang and Su (2025), "Efficient Parallel Samplers for Recurrent-Depth Models and Their Connection
to Diffusion Language Models": a recurrent-depth model can be sampled like a causal diffusion model.
Each diffusion step runs ``inner_recurrence`` core iterations over a *window* of positions — the last
frozen position and every position after it — proposes a token for each, adds ``headway`` new positions
(the first from the proposal, the rest random guesses), and freezes the positions whose latent state
(or token) stopped changing. The window slides along the sequence like a wavefront; a frozen token's
keys stay in the cache, so later positions attend to it.

This is the authors' ``generate_diffusion_style`` (Huginn's modelling code), every option with its name,
meaning and default, for any family with a prelude / core / coda layout (Huginn, retrofitted recurrence),
batched (the original is batch 1) with per-sequence freezing and stopping, and traced: each step is an
ordinary forward pass whose states go to the stream's consumers with the window's
:class:`lens.stream.Wavefront` attached.

**Faithful by default.** ``faithful=True`` reproduces the original, defects included, so results
match the paper's code token for token (``tests/lens/test_diffusion_parity.py``). ``faithful=False``
corrects them all:

================================  ============================================  ==============================================
defect                            original (``faithful=True``)                  corrected (``faithful=False``)
================================  ============================================  ==============================================
latent comparison                 the previous states are sliced again by the   each position is compared with its own state
                                  window's advance: position p meets the old    of the previous step (latent-diff,
                                  state of p + advance                          latent-acceleration-1/2)
how far to freeze                 up to the *last* converged position, even     the longest run of converged positions after
                                  past unconverged ones                         the last frozen one; a position that has had
                                                                                ``num_steps`` iterations counts as converged
                                                                                (a latent in a cycle cannot stall the window)
guess bound, stop ids             random guesses from ``[0, 65510)`` (clipped   guesses from the real vocabulary; stop ids
                                  to the vocabulary, the fixture's one patch);  are the model's end-of-text and the ones
                                  stop ids 65504, 65505, 65508 always           given
cache                             ``latest-m4-compress-s4``: Huginn-3.5B's      ``deepest-compress``: one slot per core block
                                  arithmetic on every shape                     on any layout
``fixed`` with a wavefront cut    the cache is cleared by ``headway``, the      freezes ``headway`` tokens, the window
                                  window by the cut: the original fails         slides
                                  (:class:`FaithfulDefectError` here)
analysis tablets                  ``2 (max_new_tokens + headway)`` rows, fixed  every step, as wide as the sequence gets;
                                  width: the original fails past it (here       states recorded where they are
                                  :class:`FaithfulDefectError`); states
                                  written from the pre-freeze window start
stops                             checked only after ``num_steps`` steps, on    checked every step on every newly frozen
                                  the newly frozen (latent) or last             token; the output is cut at the first stop
                                  ``headway`` tokens; output may overshoot      and at ``max_new_tokens``
                                  ``max_new_tokens``
================================  ============================================  ==============================================

The original's docstring says it equals ordinary generation with ``max_wavefront=1`` and
``inner_recurrence=32``; with either behaviour a wavefront of one position can never take in a new
one (the proposal is cut away as soon as it is made), so the sampler makes no progress. What does
give ordinary generation's tokens (at ``num_steps``, from zero states) is the corrected sampler with a
window of two, ``freeze_strategy="fixed"``, ``inner_recurrence=num_steps``, ``headway=1`` and
``init_scale=0`` (``docs/sampler.md``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from lens.cache import CacheStrategy, KVCache
from lens.errors import InputError, LooplensError
from lens.generation import GenerationResult, StopReason, _as_token_lists, _cut_at_stop, sample_next
from lens.looped import LoopedLM
from lens.stream import StateConsumer, Wavefront

__all__ = [
    "FREEZE_STRATEGIES",
    "DiffusionResult",
    "DiffusionSampler",
    "DiffusionSettings",
    "DiffusionStats",
    "FaithfulDefectError",
    "Tablets",
    "diffusion_applies",
    "initialize_state",
    "sample",
]

FREEZE_STRATEGIES = (
    "latent-diff",
    "latent-acceleration-1",
    "latent-acceleration-2",
    "token-stability",
    "fixed",
)
UPSTREAM_STOP_IDS = (65504, 65505, 65508)  # hard-coded in the original (Huginn's special tokens)
UPSTREAM_GUESS_BOUND = 65510  # the original's random-guess bound (Huginn's vocabulary)
FAITHFUL_CACHE = "latest-m4-compress-s4"
CORRECTED_CACHE = "deepest-compress"


class FaithfulDefectError(LooplensError, RuntimeError):
    """The faithful reproduction fails where the authors' sampler fails; ``faithful=False`` avoids it."""


@dataclass(frozen=True)
class DiffusionSettings:
    """Every option of the original, with its name, meaning and default (plus ``faithful``).

    ``headway``: new positions added per step (the first gets the proposal, the others random guesses).
    ``inner_recurrence``: core iterations per step. ``num_steps``: the prefill's depth; also sets the
    ``token-stability`` / ``fixed`` patience ``num_steps // inner_recurrence`` and when stops are checked.
    ``init_scale``: scale of random initial states (0: zeros). ``state_noise_mixing``: how much fresh
    noise is mixed into the window's states before each step, ``dampened_state_mixer`` dividing it by
    1 + the position's iterations so far, ``sqrt_mixer`` mixing variances instead of amplitudes.
    ``ema_embeds``: weight of the previous step's (mixed) prelude output in a moving average.
    ``freeze_strategy``/``exit_t``: when a position freezes. ``max_wavefront``: most positions in the
    window (0: no limit); a step that would exceed it adds fewer (a standing wave).
    ``continuous_compute``: new positions start from a copy of the last states instead of a fresh one.
    ``full_prefill``: run the prompt once at ``num_steps`` first (else the window starts over the prompt).
    ``cache_lookup_strategy``: see :mod:`lens.cache` (None: ``latest-m4-compress-s4`` when faithful,
    ``deepest-compress`` otherwise). ``max_diffusion_steps``: a hard stop.
    """

    headway: int = 1
    inner_recurrence: int = 4
    num_steps: int = 32
    init_scale: float = 1.0
    state_noise_mixing: float = 0.5
    dampened_state_mixer: bool = True
    sqrt_mixer: bool = False
    ema_embeds: float = 0.1
    freeze_strategy: str = "latent-diff"
    exit_t: float = 0.03
    max_wavefront: int = 128
    continuous_compute: bool = False
    full_prefill: bool = True
    cache_lookup_strategy: str | None = None
    max_diffusion_steps: int = 4096
    faithful: bool = True

    def __post_init__(self) -> None:
        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name} must be an integer >= {low}, got {value!r}")

        def number(name: str, low: float, inclusive: bool = True, high: float | None = None) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value >= low if inclusive else value > low) and (high is None or value <= high)
            if not ok:
                bound = f">= {low}" if inclusive else f"> {low}"
                raise InputError(
                    f"{name} must be a number {bound}"
                    + (f" and <= {high}" if high is not None else "")
                    + f", got {value!r}"
                )

        integer("headway", 1)
        integer("inner_recurrence", 1)
        integer("num_steps", 1)
        integer("max_wavefront", 0)
        integer("max_diffusion_steps", 0)
        number("init_scale", 0.0)
        number("state_noise_mixing", 0.0)
        number("ema_embeds", 0.0, high=1.0)
        number("exit_t", 0.0, inclusive=False)
        for name in ("dampened_state_mixer", "sqrt_mixer", "continuous_compute", "full_prefill", "faithful"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.freeze_strategy not in FREEZE_STRATEGIES:
            raise InputError(
                f"unknown freeze_strategy {self.freeze_strategy!r}; choose from {', '.join(FREEZE_STRATEGIES)}"
            )
        if self.cache_lookup_strategy is not None:
            CacheStrategy.parse(self.cache_lookup_strategy)
        if not self.faithful and self.max_wavefront == 1:
            raise InputError(
                "max_wavefront=1 leaves no room for a new position next to the last frozen one, so the "
                "sampler could never advance (the original spins until max_diffusion_steps): use 0 "
                "(no limit) or >= 2"
            )

    @property
    def cache_strategy(self) -> str:
        if self.cache_lookup_strategy is not None:
            return self.cache_lookup_strategy
        return FAITHFUL_CACHE if self.faithful else CORRECTED_CACHE

    @property
    def patience(self) -> int:
        """``num_steps // inner_recurrence``: the token-stability threshold and the fixed warm-up."""
        return self.num_steps // self.inner_recurrence

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"cache_strategy": self.cache_strategy}


@dataclass
class DiffusionStats:
    """The original's scores for one sequence, plus honest totals.

    ``num_core_forward_passes`` counts the prefill as one (as the original does) plus one per inner
    iteration; ``core_iterations`` counts the prefill's ``num_steps`` too (sequential core-block
    applications); ``model_calls`` is the number of sequential forward passes (prefill + steps).
    """

    num_core_forward_passes: int = 0
    num_tokens_forward: int = 0
    num_cache_clears: int = 0
    num_standing_waves: int = 0
    diffusion_steps: int = 0
    gen_seq_length: int = 0
    len_prefill: int = 0
    recurrence_per_position: list[int] = field(default_factory=list)
    token_stable_per_position: list[int] = field(default_factory=list)
    model_calls: int = 0
    core_iterations: int = 0
    stop_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Tablets:
    """The original's analysis tablets of one sequence: row = diffusion step, column = absolute position.

    ``token`` the working sequence after the step's advance, ``frozen`` the frozen tokens, ``counter``
    iterations per position, ``stability`` agreements per position (all int64 ``[steps, width]``, zeros
    beyond), ``state`` the window's states ``[steps, width, d]`` when asked for, in the model's dtype (the
    original rounds them to bfloat16).
    """

    token: Tensor
    frozen: Tensor
    counter: Tensor
    stability: Tensor
    state: Tensor | None = None


@dataclass
class DiffusionResult(GenerationResult):
    """``GenerationResult`` plus, per sequence, the sampler's counters and (when asked) its tablets.

    ``steps_used`` holds, per generated token, the core iterations its position received.
    """

    stats: list[DiffusionStats] = field(default_factory=list)
    tablets: list[Tablets | None] = field(default_factory=list)
    settings: DiffusionSettings | None = None
    seconds: float = 0.0


def initialize_state(
    model: LoopedLM, like: Tensor, scale: float, generator: torch.Generator | None = None
) -> Tensor:
    """Huginn's ``initialize_state``: a fresh latent shaped and typed like ``like``.

    Draws a standard normal first (so a generator always advances by the same amount), then, when
    ``std = state_std * scale > 0``, refills it with a normal truncated at ±3 std times the embedding
    scale; at ``scale = 0`` it returns zeros.
    """
    x = torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    std = float(model.config.state_std) * scale
    if std > 0:
        x = torch.nn.init.trunc_normal_(x, std=std, a=-3 * std, b=3 * std, generator=generator)
        return x * model.config.embed_scale
    return torch.zeros_like(x)


@dataclass
class _Sequence:
    """One prompt's sampler state (the original's local variables, per sequence)."""

    index: int
    prompt: list[int]
    generator: torch.Generator | None
    guesses: Sequence[Sequence[int]] | None
    width: int
    frozen: list[int] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)
    # states, counter and stable are set before first use (counter/stable in generate, states in _start)
    states: Tensor = field(init=False)  # [W, d]
    start: int = 0  # c: the window's first position = committed cache length
    counter: Tensor = field(init=False)
    stable: Tensor = field(init=False)
    old_embeds: Tensor | None = None
    old_start: int = 0
    prev_states: Tensor | None = None
    prev_start: int = 0  # where prev_states really begins (the corrected alignment)
    prev_delta: Tensor | None = None
    prev_delta_start: int = 0
    prev_prev_states: Tensor | None = None
    prev_prev_start: int = 0
    old_old_start: int = 0
    head_start: int = 0  # (corrected) the first unfrozen position's iteration count when it became first
    k: int = 0
    old_k: int = 0
    step: int = 0
    stats: DiffusionStats = field(default_factory=DiffusionStats)
    rows: dict[str, list[Tensor]] = field(default_factory=dict)
    done: bool = False
    stop: StopReason | None = None

    @property
    def L(self) -> int:
        return len(self.prompt)


def diffusion_applies(layout: Any) -> bool:
    """Whether the sampler runs on a model of this :class:`~lens.layout.Layout`: a prelude, a core opened by
    an adapter, a coda, and one latent per iteration (Huginn, retrofitted recurrence; not Ouro)."""
    return bool(layout.adapter and layout.prelude > 0 and layout.coda > 0 and not layout.latent_per_iteration)


class DiffusionSampler:
    """The sampler for one model and one set of :class:`DiffusionSettings`; :meth:`sample` runs a batch."""

    def __init__(self, model: LoopedLM, settings: DiffusionSettings | None = None, **options: Any) -> None:
        layout = model.layout
        if not diffusion_applies(layout):
            raise InputError(
                f"the diffusion sampler needs a prelude / core / coda layout with an adapter (Huginn, "
                f"retrofitted recurrence); {layout.family} models are {layout.describe()}"
            )
        try:
            self.settings = replace(settings or DiffusionSettings(), **options)
        except TypeError as err:
            names = ", ".join(f.name for f in fields(DiffusionSettings))
            raise InputError(f"unknown diffusion sampler option ({err}); options are {names}") from None
        self.model = model

    # ---- the batch ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        prompts: Tensor | Sequence[Sequence[int]] | Sequence[str] | str,
        max_new_tokens: int = 16,
        *,
        stop_token_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] = (),
        stop_at_eos: bool = True,
        consumers: Sequence[StateConsumer] = (),
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        guesses: Sequence[Sequence[Sequence[int]]] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        tablets: bool = False,
        state_tablet: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> DiffusionResult:
        """Sample every prompt; returns the new tokens, the counters and (``tablets=True``) the tablets.

        Random draws (initial states, noise, headway guesses) come per sequence from ``seed`` (one seed
        per prompt, or one for all: each prompt then draws exactly as it would alone) or from
        ``generator`` (shared, drawn in prompt order), in the original's order, so a sequence sampled
        after ``torch.manual_seed(s)`` there equals one sampled with ``seed=s`` here. ``guesses`` replays
        recorded headway guesses instead (per prompt, per step, ``headway - 1`` ids).
        ``progress(step, active)`` is called after each diffusion step.
        """
        cfg, model = self.settings, self.model
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        token_lists = _as_token_lists(model, prompts)
        if not token_lists or any(len(p) == 0 for p in token_lists):
            raise InputError("every prompt needs at least one token")
        V = model.config.padded_vocab_size
        for p in token_lists:
            if min(p) < 0 or max(p) >= V:
                raise InputError(f"token id outside the vocabulary [0, {V}) in prompt {p[:8]}…")
        block = model.config.block_size
        for p in token_lists:
            if len(p) > block:
                raise InputError(f"a prompt of {len(p)} tokens is longer than the model's context ({block})")
            if not cfg.full_prefill and 0 < cfg.max_wavefront < len(p):
                raise InputError(
                    f"max_wavefront={cfg.max_wavefront} is smaller than a prompt of {len(p)} tokens, which "
                    "without prefill must fit in the window: use full_prefill=True or a larger max_wavefront"
                )
        if guesses is not None and len(guesses) != len(token_lists):
            raise InputError(f"guesses for {len(guesses)} prompts, but {len(token_lists)} prompts")
        generators = self._generators(len(token_lists), seed, generator)
        self._stops = self._stop_ids(stop_token_ids, stop_at_eos)
        self._stop_strings = tuple(stop_strings)
        self._sampling = (do_sample, temperature, top_k, top_p)
        self._tablets = tablets or state_tablet
        self._state_tablet = state_tablet
        self._max_new = max_new_tokens
        started = time.perf_counter()
        seqs = []
        for i, prompt in enumerate(token_lists):
            width = max(block, len(prompt) + max_new_tokens + cfg.headway + int(cfg.full_prefill))
            if not cfg.faithful:  # as wide as the working sequence can get
                width = max(width, block + cfg.headway + 1)
            seqs.append(
                _Sequence(i, list(prompt), generators[i], guesses[i] if guesses is not None else None, width)
            )
            seqs[-1].counter = torch.zeros(width, dtype=torch.long)
            seqs[-1].stable = torch.zeros(width, dtype=torch.long)
        cache = model.new_cache(cfg.cache_strategy)
        cache.set_lengths(torch.zeros(len(seqs), dtype=torch.long))
        self._start(seqs, cache, consumers)
        alive = list(seqs)  # the running sequences, in the order of the cache's rows
        while True:
            for s in alive:
                self._check_continue(s)
            kept = [r for r, s in enumerate(alive) if not s.done]
            if len(kept) != len(alive):  # finished sequences leave the batch
                if kept:
                    cache.select_rows(torch.tensor(kept, dtype=torch.long))
                alive = [alive[r] for r in kept]
            if not alive:
                break
            self._step(alive, cache, consumers)
            if progress is not None:
                progress(max(s.step for s in seqs), len(alive))
        return self._result(seqs, token_lists, time.perf_counter() - started)

    def _generators(
        self, n: int, seed: int | Sequence[int] | None, generator: torch.Generator | None
    ) -> list[torch.Generator | None]:
        if seed is not None and generator is not None:
            raise InputError("give seed or generator, not both")
        if seed is None:
            return [generator] * n
        seeds = [seed] * n if isinstance(seed, int) else list(seed)
        if len(seeds) != n or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
            raise InputError(f"seed must be one integer or one per prompt ({n}), got {seed!r}")
        device = self.model.device
        return [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def _stop_ids(self, stop_token_ids: Sequence[int] | None, stop_at_eos: bool) -> set[int]:
        stops = set(int(t) for t in (stop_token_ids or ()))
        eos = self.model.config.eos_token_id
        if stop_at_eos and eos is not None:
            stops.add(int(eos))
        if self.settings.faithful:
            stops |= set(UPSTREAM_STOP_IDS)
        return stops

    # ---- set-up: prefill (or a window over the prompt) -----------------------------------------------------------
    def _start(self, seqs: list[_Sequence], cache: KVCache, consumers: Sequence[StateConsumer]) -> None:
        cfg, model = self.settings, self.model
        device, dtype, d = model.device, model.dtype, model.config.n_embd
        if cfg.full_prefill:
            width = max(s.L for s in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
            mask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
            init = torch.zeros(len(seqs), width, d, dtype=dtype, device=device)
            for r, s in enumerate(seqs):
                ids[r, : s.L] = torch.tensor(s.prompt)
                mask[r, : s.L] = 1
                like = torch.zeros(1, s.L, d, dtype=torch.float32, device=device)
                init[r, : s.L] = initialize_state(model, like, cfg.init_scale, s.generator)[0].to(dtype)
            front = None
            if consumers:
                front = self._wavefront(seqs, -1, [list(range(s.L)) for s in seqs], width, prefill=True)
            out = model(
                ids,
                cfg.num_steps,
                init,
                mask,
                consumers=consumers,
                cache=cache,
                logits="all",
                wavefront=front,
            )
            for r, s in enumerate(seqs):
                token = int(self._pick(out.logits[r, s.L - 1 : s.L], s)[0])
                s.frozen = s.prompt + [token]
                s.seq = list(s.frozen)
                s.counter[: len(s.frozen)] += cfg.num_steps
                s.stats.num_core_forward_passes += 1
                s.stats.num_tokens_forward += s.L
                s.stats.model_calls += 1
                s.stats.core_iterations += cfg.num_steps
                s.start = s.L
                like = torch.zeros(1, 1, d, dtype=torch.float32, device=device)
                s.states = initialize_state(model, like, cfg.init_scale, s.generator)[0].to(dtype)
            cache.truncate(torch.tensor([s.L for s in seqs]))
        else:
            for s in seqs:
                s.frozen, s.seq, s.start = list(s.prompt), list(s.prompt), 0
                like = torch.zeros(1, s.L, d, dtype=torch.bfloat16, device=device)
                s.states = initialize_state(model, like, cfg.init_scale, s.generator)[0].to(dtype)
        for s in seqs:
            s.stats.len_prefill = s.L
            if cfg.ema_embeds > 0:
                s.old_embeds = self._prelude(s.seq)
                s.old_start = 0
            if "latent" in cfg.freeze_strategy:
                s.prev_states, s.prev_start = s.states.clone(), s.start
            if "latent-acceleration" in cfg.freeze_strategy:
                s.prev_delta, s.prev_delta_start = torch.zeros_like(s.states), s.start
                s.prev_prev_states = torch.zeros_like(s.states)
                s.prev_prev_start = s.start
                s.old_old_start = 0

    def _prelude(self, ids: list[int]) -> Tensor:
        """The prelude's output over a whole sequence, without a cache (the EMA's starting point)."""
        model = self.model
        x = torch.tensor([ids], device=model.device)
        e = model.embed(x)
        rope, mask = model._positions(1, len(ids), None, None, model.device)
        for i, block in enumerate(model.stage("prelude")):
            e = block(e, rope, model.layout.cache_index("prelude", 0, i), mask, None)
        return e[0]

    def _check_continue(self, s: _Sequence) -> None:
        """The original's loop condition (generated enough, or the working sequence ran past the context)."""
        if s.done:
            return
        if len(s.frozen) - s.L >= self._max_new:
            s.done, s.stop = True, s.stop or "max_new_tokens"
        elif len(s.seq) > self.model.config.block_size:
            s.done, s.stop = True, "context"

    # ---- one diffusion step for every running sequence ------------------------------------------------------------
    def _wavefront(
        self, seqs: list[_Sequence], step: int, positions: list[list[int]], width: int, prefill: bool = False
    ) -> Wavefront:
        B = len(seqs)
        pos = torch.full((B, width), -1, dtype=torch.long)
        rec, tok, stab = (torch.zeros(B, width, dtype=torch.long) for _ in range(3))
        frozen = torch.zeros(B, width, dtype=torch.bool)
        for r, (s, ps) in enumerate(zip(seqs, positions, strict=True)):
            n = len(ps)
            pos[r, :n] = torch.tensor(ps, dtype=torch.long)
            source = s.prompt if prefill else s.seq
            tok[r, :n] = torch.tensor([source[p] for p in ps], dtype=torch.long)
            rec[r, :n] = s.counter[ps]
            stab[r, :n] = s.stable[ps]
            frozen[r, :n] = torch.tensor([p < (s.L if prefill else len(s.frozen)) for p in ps])
        return Wavefront(step, pos, rec, tok, frozen, stab, torch.tensor([s.index for s in seqs]))

    def _step(self, seqs: list[_Sequence], cache: KVCache, consumers: Sequence[StateConsumer]) -> None:
        cfg, model = self.settings, self.model
        device, dtype = model.device, model.dtype
        windows = [len(s.states) for s in seqs]
        width = max(windows)
        d = model.config.n_embd
        ids = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
        states = torch.zeros(len(seqs), width, d, dtype=dtype, device=device)
        for r, s in enumerate(seqs):
            W = windows[r]
            ids[r, :W] = torch.tensor(s.seq[s.start : s.start + W])
            mask[r, :W] = 1
            x = s.states
            if cfg.state_noise_mixing > 0:
                noise = initialize_state(model, x[None].float(), cfg.init_scale, s.generator)[0].to(x.dtype)
                if cfg.dampened_state_mixer:
                    done = s.counter[s.start : s.start + W].to(device=device)
                    sigma = (cfg.state_noise_mixing / (1 + done))[:, None].to(x.dtype)
                else:
                    sigma = torch.tensor(cfg.state_noise_mixing, dtype=x.dtype, device=device)
                if cfg.sqrt_mixer:
                    x = x * torch.relu(1 - sigma).sqrt() + sigma.sqrt() * noise
                else:
                    x = x * (1 - sigma) + sigma * noise
            states[r, :W] = x
        on_prelude = self._ema(seqs, windows) if cfg.ema_embeds > 0 else None
        front = None
        if consumers:  # the window's bookkeeping rides along on the stream only when someone listens
            positions = [list(range(s.start, s.start + w)) for s, w in zip(seqs, windows, strict=True)]
            front = self._wavefront(seqs, seqs[0].step, positions, width)
        out = model(
            ids,
            cfg.inner_recurrence,
            states,
            mask,
            consumers=consumers,
            cache=cache,
            logits="all",
            on_prelude=on_prelude,
            wavefront=front,
        )
        new_lengths = []
        for r, s in enumerate(seqs):
            W = windows[r]
            s.counter[s.start : s.start + W] += cfg.inner_recurrence
            s.stats.num_core_forward_passes += cfg.inner_recurrence
            s.stats.num_tokens_forward += W * cfg.inner_recurrence
            s.stats.core_iterations += cfg.inner_recurrence
            s.stats.model_calls += 1
            new_lengths.append(self._advance(s, out.state[r, :W], out.logits[r, :W]))
        cache.truncate(torch.tensor(new_lengths, dtype=torch.long))

    def _ema(self, seqs: list[_Sequence], windows: list[int]) -> Callable[[Tensor], Tensor]:
        """The moving average of prelude outputs: each window position mixes with its previous value."""
        a = self.settings.ema_embeds

        def mix(e_new: Tensor) -> Tensor:
            e = e_new * (1 - a)
            for r, s in enumerate(seqs):
                offset = s.start - s.old_start
                old = s.old_embeds[offset:] if s.old_embeds is not None else e_new[r, :0]
                n = min(len(old), windows[r])
                if n:
                    e[r, :n] = e[r, :n] + old[:n] * a
                s.old_embeds = e[r, : windows[r]].clone()
            return e

        return mix

    def _pick(self, logits: Tensor, s: _Sequence) -> Tensor:
        do_sample, temperature, top_k, top_p = self._sampling
        return sample_next(logits, do_sample, temperature, top_k, top_p, s.generator).cpu()

    def _guesses(self, s: _Sequence) -> list[int]:
        """The ``headway - 1`` random guesses of this step (replayed, or drawn as the original draws them)."""
        n = self.settings.headway - 1
        if s.guesses is not None:
            if s.step >= len(s.guesses) or len(s.guesses[s.step]) != n:
                raise InputError(f"guesses for prompt {s.index} lack step {s.step} ({n} ids per step)")
            return [int(t) for t in s.guesses[s.step]]
        vocab = self.model.config.vocab_size
        bound = min(UPSTREAM_GUESS_BOUND, vocab) if self.settings.faithful else vocab
        draw = torch.randint(0, bound, (1, n), generator=s.generator, device=self.model.device)
        return [int(t) for t in draw[0].tolist()]

    def _advance(self, s: _Sequence, x: Tensor, logits: Tensor) -> int:
        """Steps 5–12 of one sequence: propose, advance, cut, freeze, stop, record. Returns its cache length."""
        cfg, model = self.settings, self.model
        c, W, F = s.start, len(x), len(s.frozen)
        skip = max(F - 1 - c, 0)  # proposals start at the first position after the frozen ones
        new = self._pick(logits[skip:], s).tolist()
        potential = s.frozen + new[:-1]
        agree = torch.tensor([a == b for a, b in zip(s.seq, potential, strict=True)], dtype=torch.long)
        s.stable[: len(s.seq)] += agree
        extra = self._guesses(s)
        s.seq = s.frozen + new + extra
        h = cfg.headway
        if cfg.continuous_compute and W >= h:
            fresh = x[-h:].clone()
        else:
            like = torch.zeros(1, h, model.config.n_embd, dtype=torch.bfloat16, device=x.device)
            fresh = initialize_state(model, like, cfg.init_scale, s.generator)[0].to(x.dtype)
        states = torch.cat([x, fresh], 0)
        step_h = h
        if cfg.max_wavefront > 0 and len(states) > cfg.max_wavefront:
            step_h = cfg.max_wavefront - W
            states = states[: cfg.max_wavefront]
            s.seq = s.seq[: c + cfg.max_wavefront]
            s.stats.num_standing_waves += 1
        before = len(s.frozen)
        cache_len, states = self._freeze(s, states, W, step_h)
        if len(s.frozen) != before:  # a new first unfrozen position: its budget starts now
            s.head_start = int(s.counter[len(s.frozen)])
        if self._stop_now(s):  # the original breaks here: no tablet row, the step is not counted
            s.done, s.stop = True, "stop_token"
            return cache_len
        if s.step > cfg.max_diffusion_steps:
            s.done, s.stop = True, "max_diffusion_steps"
            return cache_len
        self._record(s, states, c, cache_len)
        self._remember(s, states, c, cache_len)
        s.states = states
        s.start = cache_len
        return cache_len

    def _freeze(self, s: _Sequence, states: Tensor, W: int, step_h: int) -> tuple[int, Tensor]:
        """Step 9: choose the new frozen length, clear the cache, cut the window. Returns (cache length, states)."""
        cfg = self.settings
        c = s.start
        strategy = cfg.freeze_strategy
        if "latent" in strategy:
            found = self._latent_freeze(s, states, W)
        elif strategy == "token-stability":
            if cfg.faithful:
                stable = (s.stable > cfg.patience).nonzero()
                found = int(stable[-1]) + 1 if len(stable) else None
            else:
                found = self._stable_prefix(s)
            s.k = found if found is not None else 0
        else:  # fixed
            if s.step > cfg.patience:
                if step_h != cfg.headway and cfg.faithful:
                    raise FaithfulDefectError(
                        f"freeze_strategy='fixed' with a max_wavefront cut (step {s.step} adds {step_h} "
                        f"position(s), not headway={cfg.headway}): the original clears the cache by headway "
                        "and the window by the cut, and fails on the next step (IndexError); pass "
                        "faithful=False to freeze headway tokens and slide the window"
                    )
                n = min(cfg.headway, len(states) - 1)  # (corrected) the cut leaves room for fewer
                s.frozen = s.frozen + s.seq[len(s.frozen) : len(s.frozen) + n]
                s.stats.num_cache_clears += W - n
                return c + n, states[n:]
            s.stats.num_cache_clears += W
            return c, states
        if found is None:
            s.stats.num_cache_clears += W
            return c, states
        k = found
        if not cfg.faithful:
            k = max(k, s.L)  # the prompt is never given up
        s.stats.num_cache_clears += c + W - k + 1
        s.frozen = s.seq[:k] if cfg.faithful else s.seq[: max(k, len(s.frozen))]
        if "latent" in strategy:
            s.k = k
        return k - 1, states[k - 1 - c :]

    def _stable_prefix(self, s: _Sequence) -> int | None:
        """Corrected token-stability: freeze the run of stable positions after the frozen ones."""
        p = len(s.frozen)
        limit = len(s.seq)
        while p < limit and (
            int(s.stable[p]) > self.settings.patience or (p == len(s.frozen) and self._spent(s, p))
        ):
            p += 1
        return p if p > len(s.frozen) else None

    def _latent_freeze(self, s: _Sequence, states: Tensor, W: int) -> int | None:
        """latent-diff / latent-acceleration-1/2: the new frozen length ``k``, or None."""
        cfg = self.settings
        c = s.start
        strategy = cfg.freeze_strategy
        prev_offset = (c - s.old_start) if cfg.faithful else (c - s.prev_start)
        # _start sets prev_states for every "latent" strategy, prev_delta / prev_prev_states for the
        # "latent-acceleration" ones, and only those strategies reach here
        assert s.prev_states is not None
        prev = s.prev_states[prev_offset:]
        current = states[: len(prev)]
        base = c  # the absolute position of criterion index 0
        if strategy == "latent-diff":
            crit = (current - prev).float().norm(dim=-1) / current.float().norm(dim=-1)
        elif strategy == "latent-acceleration-1":
            delta = current - prev
            assert s.prev_delta is not None
            prev_delta = s.prev_delta if cfg.faithful else s.prev_delta[c - s.prev_delta_start :]
            n = min(len(delta), len(prev_delta))
            accel = delta[:n] - prev_delta[:n]
            crit = accel.float().norm(dim=-1) / current[:n].float().norm(dim=-1)
            s.prev_delta, s.prev_delta_start = delta.clone(), c
        else:  # latent-acceleration-2: the positions all three windows share
            assert s.prev_prev_states is not None
            pp_start = s.old_old_start if cfg.faithful else s.prev_prev_start
            p_start = s.old_start if cfg.faithful else s.prev_start
            lo = max(c, p_start, pp_start)
            hi = min(c + len(states), p_start + len(s.prev_states), pp_start + len(s.prev_prev_states))
            cur = states[lo - c : hi - c]
            p1 = s.prev_states[lo - p_start : hi - p_start]
            p2 = s.prev_prev_states[lo - pp_start : hi - pp_start]
            accel = (cur - p1) - (p1 - p2)
            crit = accel.float().norm(dim=-1) / (cur.float().norm(dim=-1) + 1e-6)
            if not cfg.faithful:
                base = lo
        if cfg.faithful:
            converged = (crit < cfg.exit_t).nonzero()
            return base + int(converged[-1]) + 1 if len(converged) else None
        ok = (crit < cfg.exit_t).cpu().tolist()
        first = len(s.frozen) - base  # the first position not yet frozen, as a criterion index
        j = max(first, 0)
        while j < len(ok) and (ok[j] or (j == max(first, 0) and self._spent(s, base + j))):
            j += 1
        return base + j if j > max(first, 0) else None

    def _spent(self, s: _Sequence, position: int) -> bool:
        """(corrected) The first unfrozen position has had ``num_steps`` iterations since every position
        before it froze — as many as an autoregressive token gets with its context fixed — and freezes
        then even unconverged: a latent caught in a cycle cannot stall the wavefront."""
        return int(s.counter[position]) - s.head_start >= self.settings.num_steps

    def _stop_now(self, s: _Sequence) -> bool:
        """Step 10: a stop token or stop string among the newly frozen tokens."""
        cfg = self.settings
        if cfg.faithful:
            if s.step <= cfg.num_steps:
                return False
            if "latent" in cfg.freeze_strategy:
                recent = s.frozen[s.old_k : s.k]
            else:
                recent = s.frozen[-cfg.headway :]
        else:
            recent = s.frozen[s.L :]
        if any(t in self._stops for t in recent):
            return True
        if self._stop_strings and self.model.tokenizer is not None:
            text = self.model.tokenizer.decode(s.frozen[s.L :])
            return any(x in text for x in self._stop_strings)
        return False

    def _record(self, s: _Sequence, states: Tensor, c: int, state_start: int) -> None:
        """Step 11: a tablet row (the original keeps ``2 (max_new_tokens + headway)`` rows of fixed width)."""
        if not self._tablets:
            return
        cfg = self.settings
        if cfg.faithful:
            if s.step >= 2 * (self._max_new + cfg.headway):
                return
            if len(s.seq) > s.width:
                raise FaithfulDefectError(
                    f"analysis tablets overflow: the working sequence reached {len(s.seq)} positions, the "
                    f"tablets hold {s.width} (the original fails here too); pass faithful=False for tablets "
                    "that fit, or tablets=False"
                )
        row = torch.zeros(s.width, dtype=torch.long)
        rows = s.rows
        row[: len(s.seq)] = torch.tensor(s.seq)
        rows.setdefault("token", []).append(row)
        row = torch.zeros(s.width, dtype=torch.long)
        row[: len(s.frozen)] = torch.tensor(s.frozen)
        rows.setdefault("frozen", []).append(row)
        rows.setdefault("counter", []).append(s.counter.clone())
        rows.setdefault("stability", []).append(s.stable.clone())
        if self._state_tablet:
            at = c if cfg.faithful else state_start
            row = torch.zeros(s.width, states.shape[-1], dtype=states.dtype)
            n = max(0, min(len(states), s.width - at))
            row[at : at + n] = states[:n].cpu()
            rows.setdefault("state", []).append(row)

    def _remember(self, s: _Sequence, states: Tensor, c: int, state_start: int) -> None:
        """Step 12: what the next step compares with."""
        cfg = self.settings
        if "latent-acceleration" in cfg.freeze_strategy:
            s.prev_prev_states, s.prev_prev_start = s.prev_states, s.prev_start
            s.old_old_start = s.old_start
        if "latent" in cfg.freeze_strategy:
            s.prev_states, s.prev_start = states.clone(), state_start
        s.old_start = c
        s.step += 1
        s.old_k = s.k

    # ---- the result ---------------------------------------------------------------------------------------------
    def _result(self, seqs: list[_Sequence], prompts: list[list[int]], seconds: float) -> DiffusionResult:
        cfg, tok = self.settings, self.model.tokenizer
        tokens, steps, stats, reasons = [], [], [], []
        tablets: list[Tablets | None] = []
        for s in seqs:
            st = s.stats
            st.diffusion_steps = s.step
            st.gen_seq_length = len(s.seq)
            st.recurrence_per_position = s.counter[: len(s.frozen)].tolist()
            st.token_stable_per_position = s.stable[: len(s.frozen)].tolist()
            st.stop_reason = s.stop or "max_new_tokens"
            new = s.frozen[s.L :]
            used = st.recurrence_per_position[s.L :]
            reason: StopReason = s.stop or "max_new_tokens"
            if not cfg.faithful:
                cut = next((i + 1 for i, t in enumerate(new) if t in self._stops), None)
                if cut is not None:
                    new, used, reason = new[:cut], used[:cut], "stop_token"
                if len(new) > self._max_new:
                    new, used = new[: self._max_new], used[: self._max_new]
            eos = self.model.config.eos_token_id
            if reason == "stop_token" and new and eos is not None and new[-1] == eos:
                reason = "eos"
            tokens.append(new)
            steps.append(used)
            stats.append(st)
            reasons.append(reason)
            if self._tablets and s.rows:
                stack = {k: torch.stack(v) for k, v in s.rows.items()}
                tablets.append(
                    Tablets(
                        stack["token"],
                        stack["frozen"],
                        stack["counter"],
                        stack["stability"],
                        stack.get("state"),
                    )
                )
            else:
                tablets.append(None)
        texts = [tok.decode(t, skip_special_tokens=True) for t in tokens] if tok is not None else None
        if texts is not None and self._stop_strings:
            texts = [_cut_at_stop(t, self._stop_strings) for t in texts]
        return DiffusionResult(
            tokens, steps, texts, [list(p) for p in prompts], reasons, stats, tablets, cfg, seconds
        )


def sample(
    model: LoopedLM,
    prompts: Tensor | Sequence[Sequence[int]] | Sequence[str] | str,
    max_new_tokens: int = 16,
    num_steps: int | None = None,
    **options: Any,
) -> DiffusionResult:
    """``model.generate(prompts, sampler="diffusion", ...)``: the settings' options (:class:`DiffusionSettings`)
    and :meth:`DiffusionSampler.sample`'s keywords in one call."""
    names = {f.name for f in fields(DiffusionSettings)}
    settings = {k: options.pop(k) for k in list(options) if k in names}
    if num_steps is not None:
        settings["num_steps"] = num_steps
    sampler = DiffusionSampler(model, **settings)
    try:
        return sampler.sample(prompts, max_new_tokens, **options)
    except TypeError as err:
        if "unexpected keyword" not in str(err):
            raise
        raise InputError(
            f"unknown diffusion sampler option ({err}); options are {', '.join(sorted(names))} and the "
            "keywords of DiffusionSampler.sample"
        ) from None
