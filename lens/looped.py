"""``LoopedLM``: the forward pass every family shares, driven by its unrolled layout.

``embed → prelude → [adapter → core blocks (→ norm, fed back)] × T → latent → coda → norm → head``:
which of these parts exist, and how the iterations are chained, is read from the model's
:class:`lens.layout.UnrolledLayout`; a family supplies its module tree (with the checkpoint's own
names), its blocks, its rotary embedding and its embedding / initial-state / injection rules
(``lens.families``). Every state goes to the stream's consumers as it is made; hook points fire
once per iteration; the key/value cache is indexed by the layout; exit criteria and an exit gate
stop rows early.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from lens.cache import CacheStrategy, KVCache
from lens.errors import InputError
from lens.exit_criteria import ExitCriterion
from lens.exit_gate import GateExit, GateReadout, exit_distribution
from lens.hooks import HookedModule, HookPoint
from lens.layers import RMSNorm, causal_mask
from lens.layout import UnrolledLayout
from lens.stream import Dispatcher, StateConsumer, Trace, TraceCollector, Wavefront

InitState = Literal["random", "zeros"] | Tensor | None
Steps = int | tuple[int, int]


@dataclass
class RecurrentDepthOutput:
    """What one forward pass returns.

    ``logits`` are float32 ``[B, S, V]`` (``[B, 1, V]`` with ``logits="last"``): the readout after
    ``num_steps`` iterations, or the readout a ``gate_exit`` mode chose. ``latent`` is the state
    the recurrence handed on after the last iteration (the coda's input); ``state`` the raw state
    the next iteration would receive, from which a continuous warm start continues; ``trace`` holds
    cached states when asked for. Exit-gated families (Ouro) add the gate's ``exit_lambda``
    ``[B, S, T]`` (λ_t per iteration run), the exit distribution ``exit_pdf`` ``[B, S, T]``, and with
    a ``gate_exit`` mode the 1-based iteration each output token was read at, ``exit_steps``.
    """

    logits: Tensor | None
    latent: Tensor
    state: Tensor
    num_steps: int
    cache: KVCache | None = None
    trace: Trace | None = None
    steps_used: Tensor | None = None  # per sequence, when an exit criterion stopped rows early
    exit_lambda: Tensor | None = None
    exit_pdf: Tensor | None = None
    exit_steps: Tensor | None = None


class LoopedLM(HookedModule):
    """A looped language model whose forward pass streams its states to consumers.

    Subclasses (one per module tree) set ``config``, ``layout`` and ``tokenizer``, build their modules
    under the paths ``layout.modules`` names, call :meth:`setup_loop_hooks` last in ``__init__``, and
    implement :meth:`embed`, :meth:`rope`, :meth:`initial_state`; with an adapter also
    :meth:`injection` and :meth:`inject`, with an exit gate :meth:`exit_lambda`.
    """

    config: Any
    layout: UnrolledLayout
    tokenizer: Any
    lm_head: nn.Linear
    #: The most iterations one forward may run (``num_steps``). A cache and a trace grow with every
    #: iteration, so a typo such as ``--steps 1000000`` is refused instead of exhausting memory. Raise it
    #: on purpose per model (``model.max_num_steps = 4096``) or for every model (``LoopedLM.max_num_steps``).
    max_num_steps: int = 1024

    # ---- what a family supplies ------------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        """Token ids to the embedded input ``[B, S, d]``."""
        raise NotImplementedError

    def rope(self, positions: Tensor) -> Tensor:
        """Rotary angles for token positions ``[1 or B, S]``, in the form the family's attention takes."""
        raise NotImplementedError

    def initial_state(
        self, embedded: Tensor, init_state: InitState = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """The state the first iteration starts from."""
        raise NotImplementedError

    def injection(self, embedded: Tensor) -> Any:
        """What the adapter re-injects each iteration, computed once per forward pass."""
        return None

    def inject(self, state: Tensor, injection: Any, iteration: int) -> Tensor:
        """The adapter step opening an iteration (families with an adapter)."""
        raise NotImplementedError

    def exit_lambda(self, latent: Tensor) -> Tensor:
        """The exit gate's ``λ_t`` ``[B, S]`` for a latent (families with an exit gate)."""
        raise InputError(f"{self.layout.family} models have no exit gate")

    def setup_loop_hooks(self) -> None:
        """Add the model-level hook points the loop fires, then name every hook point."""
        self.hook_embed = HookPoint()
        if self.layout.adapter:
            self.hook_injection = HookPoint()  # the re-injected input, per iteration (fires only when hooked)
            self.hook_adapter = HookPoint()
        self.hook_latent = HookPoint()
        if self.layout.exit_gate:
            self.hook_exit_lambda = HookPoint()
        self.hook_final = HookPoint()
        self.setup_hooks()

    # ---- parts, by the layout's module paths ------------------------------------------------------------
    def stage(self, name: str) -> nn.ModuleList:
        """The blocks of ``prelude``, ``core`` or ``coda`` (an empty list where the family has none)."""
        path = getattr(self.layout.modules, name)
        # the layout's stage paths name ModuleLists (get_submodule is typed as returning any Module)
        return cast(nn.ModuleList, self.get_submodule(path)) if path is not None else nn.ModuleList()

    @property
    def final_norm_layer(self) -> RMSNorm:
        """The final norm (Huginn's ``transformer.ln_f``, Ouro's ``model.norm``): lenses decode with it."""
        norm = self.get_submodule(self.layout.modules.norm)
        assert isinstance(norm, RMSNorm), f"{type(self).__name__}'s final norm is a {type(norm).__name__}"
        return norm

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ---- the small interface probes use -------------------------------------------------------------
    def final_norm(self, x: Tensor) -> Tensor:
        return self.final_norm_layer(x)

    def head(self, x: Tensor) -> Tensor:
        """Unembedding to float32 logits."""
        return self.lm_head(x).float()

    def to_latent(self, state: Tensor) -> Tensor:
        """A core state as the coda receives it: through the final norm where the layout puts one there."""
        return self.final_norm(state) if self.layout.latent_norm else state

    def run_coda(
        self,
        latent: Float[Tensor, "B S d"],
        attention_mask: Tensor | None = None,
        *,
        rope: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Float[Tensor, "B S d"]:
        """The coda over whole sequences: input the latent, output before the final norm (what the
        Coda Lens decodes with). Without ``rope`` the positions come from ``attention_mask``, no cache."""
        if rope is None:
            rope, mask = self._positions(
                latent.shape[0], latent.shape[1], attention_mask, None, latent.device
            )
        h = latent
        for _, out in self._coda_blocks(latent, rope, mask, cache):
            h = out
        return h

    def _coda_blocks(
        self, h: Tensor, rope: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> Iterator[tuple[int, Tensor]]:
        """The one coda pass: yields ``(block, output)`` for each coda block."""
        for i, block in enumerate(self.stage("coda")):
            h = block(h, rope, self.layout.cache_index("coda", 0, i), mask, cache)
            yield i, h

    def readout(
        self, state: Tensor, rope: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> Float[Tensor, "B S d"]:
        """The hidden state the head reads after an iteration that ended in ``state`` (what an exit criterion checks)."""
        latent = state if self.layout.latent_per_iteration else self.to_latent(state)
        h = self.run_coda(latent, rope=rope, mask=mask, cache=cache)
        return self.final_norm(h) if self.layout.norm_after_coda else h

    # ---- the forward pass -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Int[Tensor, "B S"],
        num_steps: Steps | None = None,
        init_state: InitState = None,
        attention_mask: Int[Tensor, "B S"] | None = None,
        consumers: Sequence[StateConsumer] = (),
        cache: KVCache | None = None,
        logits: Literal["all", "last", "none"] = "all",
        return_trace: bool | Sequence[str] = False,
        generator: torch.Generator | None = None,
        exit_criterion: ExitCriterion | None = None,
        gate_exit: GateExit | None = None,
        first_iteration: int = 1,
        on_prelude: Callable[[Tensor], Tensor] | None = None,
        wavefront: Wavefront | None = None,
    ) -> RecurrentDepthOutput:
        """Run the model; each state goes to the ``consumers`` subscribed to its site.

        ``num_steps`` is the number of recurrent iterations (or ``(no_grad, with_grad)`` for
        truncated backpropagation); ``attention_mask`` (1 = token, 0 = left padding) makes padded
        batches equal to each prompt run alone; ``return_trace`` (True or a list of sites) caches
        states as stacked ``[T, B, S, d]`` tensors; ``exit_criterion`` stops each sequence once its
        last position may exit (adaptive depth, ``out.steps_used``); ``gate_exit`` (exit-gated
        families) returns the readout an exit mode picks per token instead of the last iteration's.
        ``first_iteration`` resumes the loop: ``init_state`` is then the state iteration
        ``first_iteration - 1`` handed on (``out.state`` of a shorter run, or a traced one), the loop runs
        iterations ``first_iteration..T`` with their own numbers, and the result equals the full run's
        (an exit gate's ``exit_lambda`` / ``exit_pdf`` then cover the iterations run).
        ``on_prelude`` replaces the prelude output the recurrence re-injects (the diffusion sampler's
        moving average of input embeddings); ``wavefront`` rides along on every emitted state.
        """
        consumers = list(consumers)
        collector = None
        if return_trace:
            collector = TraceCollector(None if return_trace is True else list(return_trace))
            consumers.append(collector)
        stream = self.iter_states(
            input_ids,
            num_steps,
            init_state,
            attention_mask,
            consumers,
            cache,
            logits,
            generator,
            exit_criterion,
            gate_exit,
            first_iteration,
            on_prelude,
            wavefront,
        )
        while True:
            try:
                next(stream)
            except StopIteration as done:
                out: RecurrentDepthOutput = done.value
                break
        if collector is not None:
            out.trace = collector.trace
        return out

    def iter_states(
        self,
        input_ids: Tensor,
        num_steps: Steps | None = None,
        init_state: InitState = None,
        attention_mask: Tensor | None = None,
        consumers: Sequence[StateConsumer] = (),
        cache: KVCache | None = None,
        logits: Literal["all", "last", "none"] = "all",
        generator: torch.Generator | None = None,
        exit_criterion: ExitCriterion | None = None,
        gate_exit: GateExit | None = None,
        first_iteration: int = 1,
        on_prelude: Callable[[Tensor], Tensor] | None = None,
        wavefront: Wavefront | None = None,
    ) -> Generator[tuple[str, int, Tensor], None, RecurrentDepthOutput]:
        """The forward pass as a generator of ``(site, iteration, tensor)``; returns the output.

        ``forward`` drives it; iterate it yourself to interleave work with the pass.
        """
        n_free, n_grad = self._check_steps(num_steps)
        T = n_free + n_grad
        self._check_inputs(input_ids, attention_mask, cache)
        if cache is not None:
            cache.active = None
        if logits not in ("all", "last", "none"):
            raise InputError(f"logits must be 'all', 'last' or 'none', got {logits!r}")
        layout = self.layout
        gated = layout.exit_gate
        if gate_exit is not None and not gated:
            raise InputError(f"exit modes need an exit gate; {layout.family} models have none")
        if gate_exit is not None and exit_criterion is not None:
            raise InputError(
                "gate_exit (decode after running every iteration) and exit_criterion (stop early) exclude "
                "each other; for a thresholded exit that stops computing use exit_criterion='gate'"
            )
        if exit_criterion is not None and exit_criterion.needs_gate and not gated:
            raise InputError(
                f"the 'gate' exit criterion needs an exit gate; {layout.family} models have none"
            )
        B, S = input_ids.shape
        if first_iteration != 1:
            self._check_resume(first_iteration, T, init_state, gate_exit, (B, S))
        dispatch = Dispatcher(consumers, layout, wavefront)
        rope, mask = self._positions(B, S, attention_mask, cache, input_ids.device)

        def emit(
            site: str, iteration: int, tensor: Tensor, **extra: Tensor
        ) -> Iterator[tuple[str, int, Tensor]]:
            dispatch.emit(site, iteration, tensor, T, **extra)
            yield site, iteration, tensor

        self.set_hook_iteration(0)
        e = self.hook_embed(self.embed(input_ids))
        yield from emit("embed", 0, e)
        for i, block in enumerate(self.stage("prelude")):
            e = block(e, rope, layout.cache_index("prelude", 0, i), mask, cache)
            yield from emit(f"prelude.{i}", 0, e)

        if on_prelude is not None:
            e = on_prelude(e)
        if first_iteration == 1:
            x = self.initial_state(e, init_state, generator)
        else:  # resuming: the state iteration first_iteration - 1 handed on
            assert isinstance(init_state, Tensor)  # _check_resume raised otherwise
            x = init_state.to(device=e.device, dtype=e.dtype).expand_as(e).clone()
        injection = self.injection(e) if layout.adapter else None
        exited = torch.zeros(B, dtype=torch.bool, device=x.device)
        any_exited = False  # exited.any(), kept in Python: it changes only where an exit criterion runs
        steps_used = torch.full((B,), T, dtype=torch.long, device=x.device)
        lambdas: list[Tensor] = []
        kept = slice(None) if logits == "all" else slice(-1, None)
        readout = GateReadout(gate_exit, T, self.head) if gate_exit is not None and logits != "none" else None
        if exit_criterion is not None:
            exit_criterion.reset(x, attention_mask)
        core = self.stage("core")
        for t in range(first_iteration, T + 1):
            with torch.set_grad_enabled(torch.is_grad_enabled() and t > n_free):
                self.set_hook_iteration(t)
                previous = x
                if cache is not None:  # rows that exited compute on, unseen, and write no keys
                    cache.active = ~exited if any_exited else None
                if layout.adapter:
                    inj = self.hook_injection(injection) if self.hook_injection._forward_hooks else injection
                    x = self.hook_adapter(self.inject(x, inj, t))
                    yield from emit("adapter", t, x)
                for j, block in enumerate(core):
                    x = block(x, rope, layout.cache_index("core", t, j), mask, cache)
                    yield from emit(f"core.{j}", t, x)
                if any_exited:  # finished rows keep their exit state (and wrote no keys: cache.active)
                    x = torch.where(exited[:, None, None], previous, x)
                lam = None
                if layout.latent_per_iteration:
                    if not any_exited:
                        x = self.hook_latent(self.final_norm(x))
                    else:  # exited rows' state is already their (normalised) exit latent
                        x = torch.where(exited[:, None, None], x, self.hook_latent(self.final_norm(x)))
                    if gated:
                        lam = self.hook_exit_lambda(self.exit_lambda(x))
                        lambdas.append(lam)
                    yield from emit("latent", t, x, **({"exit_lambda": lam} if lam is not None else {}))
                elif gated:
                    lam = self.hook_exit_lambda(self.exit_lambda(self.to_latent(x)))
                    lambdas.append(lam)
                if readout is not None:
                    # a readout needs gate_exit, which needs an exit gate (checked above): lam was computed
                    assert lam is not None
                    readout.update(t, x[:, kept], lam[:, kept])
            if exit_criterion is None:
                continue
            check_logits = None
            if exit_criterion.needs_logits:
                check_logits = self.head(self.readout(x, rope, mask, cache)[:, -1])
            _, stop = exit_criterion.update(
                x, check_logits, lam[:, -1] if lam is not None else None, attention_mask
            )
            newly = stop & ~exited
            steps_used[newly] = t
            exited |= newly
            any_exited = bool(exited.any())
            if any_exited and bool(exited.all()):
                break
        self.set_hook_iteration(0)
        if cache is not None:
            cache.active = None
        state = x
        if layout.latent_per_iteration:
            latent = x
        else:
            latent = self.hook_latent(self.to_latent(x))
            yield from emit("latent", T, latent)
        h = latent
        for i, h in self._coda_blocks(latent, rope, mask, cache):
            yield from emit(f"coda.{i}", 0, h)
        h = self.hook_final(self.final_norm(h) if layout.norm_after_coda else h)
        yield from emit("final", 0, h)
        if cache is not None:
            cache.commit(S, attention_mask if attention_mask is not None else None)
        out_logits = None
        if readout is not None:
            out_logits = readout.logits
        elif logits == "all":
            out_logits = self.head(h)
        elif logits == "last":
            out_logits = self.head(h[:, -1:])
        out = RecurrentDepthOutput(out_logits, latent, state, T, cache, steps_used=steps_used)
        if lambdas:
            out.exit_lambda = torch.stack(lambdas, -1)
            out.exit_pdf = exit_distribution(out.exit_lambda.float())[0]
            out.exit_steps = readout.exit_steps if readout is not None else None
        return out

    # ---- helpers ----------------------------------------------------------------------------------
    def new_cache(self, strategy: str | CacheStrategy = "deepest") -> KVCache:
        """An empty key/value cache for this model's layout (``strategy``: see :mod:`lens.cache`)."""
        return KVCache(self.layout, strategy)

    @property
    def default_cache_strategy(self) -> str:
        """The lookup strategy adaptive generation uses unless told: the authors' ``full`` for Huginn,
        looplens's ``deepest`` for the other families (whose authors' code runs every iteration)."""
        return "full" if self.layout.family == "huginn" else "deepest"

    @property
    def default_steps(self) -> int:
        """The number of iterations a call without ``num_steps`` runs (the family's own default)."""
        return int(self.config.mean_recurrence)

    def _check_steps(self, num_steps: Steps | None) -> tuple[int, int]:
        if num_steps is None:
            num_steps = self.default_steps
        if isinstance(num_steps, Tensor):
            num_steps = int(num_steps) if num_steps.numel() == 1 else tuple(int(n) for n in num_steps)
        if isinstance(num_steps, (tuple, list)):
            if (
                len(num_steps) != 2
                or any(int(n) < 0 for n in num_steps)
                or sum(int(n) for n in num_steps) < 1
            ):
                raise InputError(
                    f"num_steps as (no_grad, with_grad) needs two counts >= 0 summing to >= 1, got {num_steps}"
                )
            self._check_step_limit(int(num_steps[0]) + int(num_steps[1]))
            return int(num_steps[0]), int(num_steps[1])
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise InputError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        self._check_step_limit(num_steps)
        return num_steps, 0

    def _check_resume(
        self, first: Any, T: int, init_state: Any, gate_exit: GateExit | None, shape: tuple[int, int]
    ) -> None:
        if isinstance(first, bool) or not isinstance(first, int) or not 1 <= first <= T:
            raise InputError(f"first_iteration must be an integer in 1..{T} (num_steps), got {first!r}")
        d = self.config.n_embd
        if not isinstance(init_state, Tensor) or init_state.dim() != 3 or init_state.shape[-1] != d:
            raise InputError(
                f"resuming at iteration {first} needs init_state = the state iteration {first - 1} handed on, "
                f"a [B, S, {d}] tensor"
            )
        try:
            torch.broadcast_shapes(tuple(init_state.shape), (*shape, d))
        except RuntimeError:
            raise InputError(
                f"init_state {tuple(init_state.shape)} does not fit the input [{shape[0]}, {shape[1]}]"
            ) from None
        if gate_exit is not None:
            raise InputError("gate_exit reads every iteration's readout; it cannot resume a loop midway")

    def _check_step_limit(self, total: int) -> None:
        if total > self.max_num_steps:
            raise InputError(
                f"num_steps = {total} is above this model's limit of {self.max_num_steps} iterations "
                "(a key/value cache and a trace grow with every iteration); raise it on purpose with "
                "`model.max_num_steps = N`"
            )

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache | None) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise InputError("input_ids must be a [batch, seq] tensor of token ids")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise InputError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[0] == 0:
            raise InputError("input_ids holds no sequence: the batch is empty")
        if input_ids.shape[1] == 0:
            raise InputError("input_ids is empty: at least one token is needed")
        V = self.config.padded_vocab_size
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise InputError(f"token id {bad} is outside the vocabulary [0, {V})")
        past = cache.seq_len if cache is not None else 0
        total = past + input_ids.shape[1]
        if cache is not None and cache.ragged:  # each row's own length plus its own (right-padded) tokens
            new = attention_mask.sum(1) if attention_mask is not None else input_ids.shape[1]
            total = int((cache.row_lengths(input_ids.shape[0], input_ids.device) + new).max())
        if total > self.config.block_size:
            raise InputError(
                f"sequence of {total} tokens is longer than the model's context "
                f"(block_size = {self.config.block_size})"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise InputError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
            )

    def _positions(
        self, B: int, S: int, attention_mask: Tensor | None, cache: KVCache | None, device: torch.device
    ) -> tuple[Tensor, Tensor | None]:
        """Rotary angles and the attention mask for this call (left padding shifts positions; a ragged
        cache gives each row its own start, and ``attention_mask`` then marks right padding)."""
        if cache is not None and cache.ragged:
            positions, mask = cache.positions(B, S, device)
            return self.rope(positions.clamp(max=self.config.block_size - 1)), mask[:, None]
        past = cache.seq_len if cache is not None else 0
        past_mask = cache.key_mask if cache is not None else None
        if attention_mask is None and past_mask is None:
            rope = self.rope(torch.arange(past, past + S, device=device)[None])
            # with cached keys the queries are the last S of past + S keys: one mask for every block
            # (none for a single query, which sees every key)
            return rope, causal_mask(S, past + S, device)[None, None] if past and S > 1 else None
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.bool, device=device)
        if past_mask is None and past:
            past_mask = torch.ones(B, past, dtype=torch.bool, device=device)
        keys = (
            attention_mask.bool() if past_mask is None else torch.cat([past_mask, attention_mask.bool()], 1)
        )
        positions = (keys.long().cumsum(1) - 1).clamp(min=0)[:, past:]
        K = keys.shape[1]
        mask = causal_mask(S, K, device)[None] & keys[:, None, :]
        diag = torch.zeros(S, K, dtype=torch.bool, device=device)
        diag[torch.arange(S), torch.arange(K - S, K)] = True
        mask = mask | diag[None]  # a padding query sees itself: no empty softmax rows
        return self.rope(positions), mask[:, None]

    def run_with_interventions(
        self, input_ids: Tensor, interventions: Sequence[Any], num_steps: Steps | None = None, **kwargs: Any
    ) -> RecurrentDepthOutput:
        """Shortcut for :func:`lens.interventions.run_with_interventions` (patch, ablate, steer, freeze,
        re-inject; ``fwd_hooks`` and every ``forward`` argument pass through)."""
        from lens.interventions import run_with_interventions

        return run_with_interventions(self, input_ids, interventions, num_steps, **kwargs)

    def generate(
        self, prompts: Any, max_new_tokens: int = 16, num_steps: int | None = None, **kwargs: Any
    ) -> Any:
        """Shortcut for :func:`lens.generation.generate` (fixed or adaptive depth, cached)."""
        from lens.generation import generate

        return generate(self, prompts, max_new_tokens, num_steps, **kwargs)

    def compile_blocks(
        self, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = True
    ) -> LoopedLM:
        """Opt in to ``torch.compile`` of every block around the key/value cache (:mod:`lens.compiled`):
        one graph per block class for all iterations and decoding steps; results equal the eager path's
        up to float rounding. Returns the model; :meth:`uncompile_blocks` undoes it."""
        from lens.compiled import compile_blocks

        return compile_blocks(self, backend=backend, mode=mode, dynamic=dynamic)

    def uncompile_blocks(self) -> LoopedLM:
        """Back to the eager blocks (the bit-stable reference path)."""
        from lens.compiled import uncompile_blocks

        return uncompile_blocks(self)

    @property
    def blocks_compiled(self) -> bool:
        from lens.compiled import is_compiled

        return is_compiled(self)

    def num_parameters(self) -> int:
        """Unique parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def tied_weights(self) -> dict[str, str]:
        """Parameters that share another's storage, ``{tied key: source key}`` (for loading and saving)."""
        return {}

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute buffers that checkpoints do not hold (rotary tables) on ``device``."""


__all__ = ["InitState", "LoopedLM", "RecurrentDepthOutput", "Steps"]
