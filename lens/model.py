"""``RecurrentDepthLM``: the Huginn ("Raven") architecture, instrumented to stream every state.

``prelude → [adapter(concat[state, embedded input]) → core blocks] × T → ln_f → coda → ln_f → lm_head``.
Module paths and parameter names equal Huginn's checkpoint keys (``transformer.core_block.3.attn.Wqkv``),
so checkpoints load by name and nnsight users write the paths they already know.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

import kernels
from lens.cache import KVCache
from lens.config import RecurrentDepthConfig
from lens.exit_criteria import ExitCriterion
from lens.hooks import HookedModule, HookPoint
from lens.layers import RMSNorm, SandwichBlock, causal_mask, init_block_, precompute_freqs_cis
from lens.stream import Dispatcher, SiteLayout, StateConsumer, Trace, TraceCollector

InitState = Literal["random", "zeros"] | Tensor | None
Steps = int | tuple[int, int]


@dataclass
class RecurrentDepthOutput:
    """What one forward pass returns.

    ``logits`` are float32 ``[B, S, V]`` (``[B, 1, V]`` with ``logits="last"``); ``latent`` is
    ``ln_f`` of the last iteration (the coda's input); ``state`` the raw last core state, from which
    a continuous warm start continues; ``trace`` holds cached states when asked for.
    """

    logits: Tensor | None
    latent: Tensor
    state: Tensor
    num_steps: int
    cache: KVCache | None = None
    trace: Trace | None = None
    steps_used: Tensor | None = None  # per sequence, when an exit criterion stopped rows early


class RecurrentDepthLM(HookedModule):
    """A recurrent-depth language model whose forward pass streams its states to consumers.

    Example:
        >>> import torch, lens
        >>> model = lens.RecurrentDepthLM(lens.RecurrentDepthConfig(n_embd=32, n_heads=2, vocab_size=50))
        >>> out = model(torch.tensor([[1, 2, 3]]), num_steps=4, init_state="zeros")
        >>> tuple(out.logits.shape)
        (1, 3, 50)
    """

    freqs_cis: Tensor

    def __init__(self, config: RecurrentDepthConfig, tokenizer: Any = None) -> None:
        super().__init__()
        self.config = config
        d = config.n_embd
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, d),
                prelude=nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_prelude)),
                adapter=nn.Linear(2 * d, d, bias=config.bias),
                core_block=nn.ModuleList(
                    SandwichBlock(config) for _ in range(config.n_layers_in_recurrent_block)
                ),
                coda=nn.ModuleList(SandwichBlock(config) for _ in range(config.n_layers_in_coda)),
                ln_f=RMSNorm(d, eps=config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(d, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.register_buffer(
            "freqs_cis",
            precompute_freqs_cis(config.head_dim, config.block_size, config.rope_base),
            persistent=True,
        )
        self.hook_embed = HookPoint()
        self.hook_adapter = HookPoint()
        self.hook_latent = HookPoint()
        self.hook_final = HookPoint()
        self.layout = SiteLayout(
            config.n_layers_in_prelude, config.n_layers_in_recurrent_block, config.n_layers_in_coda
        )
        self.tokenizer = tokenizer
        self.reset_parameters()
        self.setup_hooks()

    # ---- construction --------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Huginn's initialisation (meta tensors are left alone)."""
        if self.freqs_cis.is_meta:
            return
        std, out_std = self.config.state_std, self.config.init_values.get("out_proj", self.config.state_std)
        emb_std = self.config.init_values.get("embedding", std)
        nn.init.trunc_normal_(self.transformer.wte.weight, std=emb_std, a=-3 * emb_std, b=3 * emb_std)
        nn.init.trunc_normal_(self.transformer.adapter.weight, std=std, a=-3 * std, b=3 * std)
        if self.transformer.adapter.bias is not None:
            nn.init.zeros_(self.transformer.adapter.bias)
        for stage in ("prelude", "core_block", "coda"):
            for block in self.transformer[stage]:
                init_block_(block, std, out_std)
        nn.init.ones_(self.transformer.ln_f.weight)
        if not self.config.tie_embeddings:
            nn.init.trunc_normal_(self.lm_head.weight, std=emb_std, a=-3 * emb_std, b=3 * emb_std)

    def _apply(self, fn: Any, recurse: bool = True) -> RecurrentDepthLM:
        """Keep the rotary table in float32 whatever dtype the weights are cast to (as Huginn does)."""
        super()._apply(fn, recurse)
        if self.freqs_cis.dtype != torch.float32 and not self.freqs_cis.is_meta:
            self.freqs_cis = precompute_freqs_cis(
                self.config.head_dim, self.config.block_size, self.config.rope_base
            ).to(self.freqs_cis.device)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    # ---- the small interface probes use -------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        return self.transformer.wte(input_ids) * self.config.embed_scale

    def final_norm(self, x: Tensor) -> Tensor:
        return self.transformer.ln_f(x)

    def head(self, x: Tensor) -> Tensor:
        """Unembedding to float32 logits."""
        return self.lm_head(x).float()

    def run_coda(
        self,
        x: Float[Tensor, "B S d"],
        attention_mask: Tensor | None = None,
    ) -> Float[Tensor, "B S d"]:
        """The coda blocks over whole sequences, no cache: input already through ``ln_f``, output
        before the final ``ln_f`` (what the Coda Lens decodes with)."""
        freqs, mask = self._positions(x.shape[0], x.shape[1], attention_mask, None, x.device)
        for i, block in enumerate(self.transformer.coda):
            x = block(x, freqs, -1 - i, mask, None)
        return x

    # ---- the forward pass -------------------------------------------------------------------------
    def initial_state(
        self, embedded: Tensor, init_state: InitState = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Huginn's truncated-normal latent (``std * emb_scale``), zeros, or a given tensor."""
        if isinstance(init_state, Tensor):
            if init_state.shape[-1] != embedded.shape[-1]:
                raise ValueError(
                    f"init_state has width {init_state.shape[-1]}, the model {embedded.shape[-1]}"
                )
            return init_state.to(device=embedded.device, dtype=embedded.dtype).expand_as(embedded).clone()
        if init_state == "zeros":
            return torch.zeros_like(embedded)
        if init_state not in (None, "random"):
            raise ValueError(f"init_state must be None, 'random', 'zeros' or a tensor, got {init_state!r}")
        std = self.config.state_std
        x = torch.empty(embedded.shape, dtype=torch.float32, device=embedded.device)
        if std > 0:
            x.normal_(generator=generator)
            x = torch.nn.init.trunc_normal_(x, std=std, a=-3 * std, b=3 * std, generator=generator)
            x = x * self.config.embed_scale
        else:
            x.zero_()
        return x.to(embedded.dtype)

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
    ) -> RecurrentDepthOutput:
        """Run the model; each state goes to the ``consumers`` subscribed to its site.

        ``num_steps`` is the number of recurrent iterations (or ``(no_grad, with_grad)`` for
        truncated backpropagation); ``attention_mask`` (1 = token, 0 = left padding) makes padded
        batches equal to each prompt run alone; ``return_trace`` (True or a list of sites) caches
        states as stacked ``[T, B, S, d]`` tensors; ``exit_criterion`` stops each sequence once its
        last position has converged (adaptive depth, ``out.steps_used``).
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
    ) -> Iterator[tuple[str, int, Tensor]]:
        """The forward pass as a generator of ``(site, iteration, tensor)``; returns the output.

        ``forward`` drives it; iterate it yourself to interleave work with the pass.
        """
        n_free, n_grad = self._check_steps(num_steps)
        T = n_free + n_grad
        self._check_inputs(input_ids, attention_mask, cache)
        B, S = input_ids.shape
        dispatch = Dispatcher(consumers, self.layout)
        freqs, mask = self._positions(B, S, attention_mask, cache, input_ids.device)

        def emit(site: str, iteration: int, tensor: Tensor) -> Iterator[tuple[str, int, Tensor]]:
            dispatch.emit(site, iteration, tensor, T)
            yield site, iteration, tensor

        self.set_hook_iteration(0)
        e = self.hook_embed(self.embed(input_ids))
        yield from emit("embed", 0, e)
        for i, block in enumerate(self.transformer.prelude):
            e = block(e, freqs, i, mask, cache)
            yield from emit(f"prelude.{i}", 0, e)

        x = self.initial_state(e, init_state, generator)
        injection = kernels.adapter_injection(e, self.transformer.adapter.weight)
        exited = torch.zeros(B, dtype=torch.bool, device=x.device)
        steps_used = torch.full((B,), T, dtype=torch.long, device=x.device)
        if exit_criterion is not None:
            exit_criterion.reset()
        for t in range(1, T + 1):
            with torch.set_grad_enabled(torch.is_grad_enabled() and t > n_free):
                self.set_hook_iteration(t)
                previous = x
                x = self._noise(x, t)
                x = self.hook_adapter(
                    kernels.adapter_step(
                        x, self.transformer.adapter.weight, injection, self.transformer.adapter.bias
                    )
                )
                yield from emit("adapter", t, x)
                for j, block in enumerate(self.transformer.core_block):
                    x = block(x, freqs, self._core_index(t, j), mask, cache)
                    yield from emit(f"core.{j}", t, x)
            if exit_criterion is None:
                continue
            if exited.any():  # finished rows keep their exit state and keys, as if they had stopped
                x = torch.where(exited[:, None, None], previous, x)
                if cache is not None:
                    for s_exit in steps_used[exited].unique().tolist():
                        rows = exited & (steps_used == s_exit)
                        for j in range(self.layout.core):
                            cache.freeze_rows(self._core_index(t, j), rows, self._core_index(s_exit, j))
            check_logits = None
            if exit_criterion.needs_logits:
                check_logits = self.head(self._coda(self.final_norm(x), freqs, mask, cache)[:, -1])
            _, stop = exit_criterion.update(x[:, -1], check_logits)
            newly = stop & ~exited
            steps_used[newly] = t
            exited |= newly
            if bool(exited.all()):
                break
        self.set_hook_iteration(0)
        state = x
        latent = self.hook_latent(self.final_norm(x))
        yield from emit("latent", T, latent)
        h = latent
        for i, block in enumerate(self.transformer.coda):
            h = block(h, freqs, -1 - i, mask, cache)
            yield from emit(f"coda.{i}", 0, h)
        h = self.hook_final(self.final_norm(h))
        yield from emit("final", 0, h)
        if cache is not None:
            cache.commit(S, attention_mask if attention_mask is not None else None)
        out_logits = None
        if logits == "all":
            out_logits = self.head(h)
        elif logits == "last":
            out_logits = self.head(h[:, -1:])
        return RecurrentDepthOutput(out_logits, latent, state, T, cache, steps_used=steps_used)

    # ---- helpers ----------------------------------------------------------------------------------
    def _core_index(self, iteration: int, block: int) -> int:
        """Cache index of core block ``block`` at ``iteration`` (see ``lens.cache``)."""
        return self.layout.prelude + (iteration - 1) * self.layout.core + block

    def _coda(self, x: Tensor, freqs: Tensor, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        for i, block in enumerate(self.transformer.coda):
            x = block(x, freqs, -1 - i, mask, cache)
        return self.final_norm(x)

    def new_cache(self) -> KVCache:
        return KVCache(self.layout.prelude, self.layout.core)

    def _check_steps(self, num_steps: Steps | None) -> tuple[int, int]:
        if num_steps is None:
            num_steps = self.config.mean_recurrence
        if isinstance(num_steps, Tensor):
            num_steps = int(num_steps)
        if isinstance(num_steps, (tuple, list)):
            if (
                len(num_steps) != 2
                or any(int(n) < 0 for n in num_steps)
                or sum(int(n) for n in num_steps) < 1
            ):
                raise ValueError(
                    f"num_steps as (no_grad, with_grad) needs two counts >= 0 summing to >= 1, got {num_steps}"
                )
            return int(num_steps[0]), int(num_steps[1])
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        return num_steps, 0

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache | None) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [batch, seq] tensor of token ids")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: at least one token is needed")
        V = self.config.padded_vocab_size
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {V})")
        past = cache.seq_len if cache is not None else 0
        if past + input_ids.shape[1] > self.config.block_size:
            raise ValueError(
                f"sequence of {past + input_ids.shape[1]} tokens is longer than the model's context "
                f"(block_size = {self.config.block_size})"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
            )

    def _positions(
        self, B: int, S: int, attention_mask: Tensor | None, cache: KVCache | None, device: torch.device
    ) -> tuple[Tensor, Tensor | None]:
        """Rotary table rows and the attention mask for this call (left padding shifts positions)."""
        past = cache.seq_len if cache is not None else 0
        past_mask = cache.key_mask if cache is not None else None
        if attention_mask is None and past_mask is None:
            return self.freqs_cis[:, past : past + S], None
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.bool, device=device)
        if past_mask is None and past:
            past_mask = torch.ones(B, past, dtype=torch.bool, device=device)
        keys = (
            attention_mask.bool() if past_mask is None else torch.cat([past_mask, attention_mask.bool()], 1)
        )
        positions = (keys.long().cumsum(1) - 1).clamp(min=0)[:, past:]
        freqs = self.freqs_cis[0, positions]  # [B, S, 1, P, 2]
        K = keys.shape[1]
        mask = causal_mask(S, K, device)[None] & keys[:, None, :]
        diag = torch.zeros(S, K, dtype=torch.bool, device=device)
        diag[torch.arange(S), torch.arange(K - S, K)] = True
        mask = mask | diag[None]  # a padding query sees itself: no empty softmax rows
        return freqs, mask[:, None]

    def _noise(self, x: Tensor, step: int) -> Tensor:
        """Huginn's optional test-time noise on the latent (off unless the config sets it)."""
        cfg = self.config
        if cfg.test_time_noise <= 0:
            return x
        n = cfg.test_time_noise * cfg.state_std * cfg.embed_scale
        kind = cfg.test_time_noise_type
        if kind == "geom":
            n = n / step
        elif kind == "sqrt":
            n = n / step**0.5
        elif kind == "line":
            n = max(n, (cfg.mean_recurrence - (step - 1)) / cfg.mean_recurrence)
        elif kind == "chi":
            n = 2 * float(torch.rand(())) * n
        return x * (1 - n) + torch.randn_like(x) * n

    def generate(
        self, prompts: Any, max_new_tokens: int = 16, num_steps: int | None = None, **kwargs: Any
    ) -> Any:
        """Shortcut for :func:`lens.generation.generate` (fixed or adaptive depth, cached)."""
        from lens.generation import generate

        return generate(self, prompts, max_new_tokens, num_steps, **kwargs)

    def num_parameters(self) -> int:
        """Unique parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
