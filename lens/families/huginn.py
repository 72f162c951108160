"""Huginn ("Raven", Geiping et al. 2025): prelude → [adapter(concat[state, prelude output]) → core] × T → ln_f → coda → ln_f.

``RecurrentDepthLM`` is the module tree Huginn's checkpoints name (``transformer.wte``,
``transformer.prelude``, ``transformer.adapter``, ``transformer.core_block``, ``transformer.coda``,
``transformer.ln_f``, ``lm_head``, the persistent ``freqs_cis`` table), so checkpoints load by name and
nnsight users write the paths they know (``transformer.core_block[3]``). Retrofitted-recurrence
models share this tree with other blocks (:mod:`lens.families.retrofit`).

How a Huginn checkpoint is recognised: ``model_type`` ``"huginn_raven"`` and sandwich blocks (the
weights hold ``transformer.core_block.0.norm_4.weight``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import kernels
from lens.config import RecurrentDepthConfig
from lens.errors import InputError
from lens.layers import RMSNorm, SandwichBlock, init_block_, precompute_freqs_cis, rotary_rotation
from lens.layout import ModulePaths, UnrolledLayout
from lens.looped import InitState, LoopedLM

#: A weight only Huginn's sandwich blocks have (retrofits' pre-norm blocks stop at norm_2).
SIGNATURE = "transformer.core_block.0.norm_4.weight"


def huginn_layout(
    config: RecurrentDepthConfig, family: str = "huginn", latent_norm: bool = True
) -> UnrolledLayout:
    """The layout of the ``transformer.*`` tree: prelude, adapter, core, coda (Huginn's and retrofits')."""
    return UnrolledLayout(
        family=family,
        prelude=config.n_layers_in_prelude,
        core=config.n_layers_in_recurrent_block,
        coda=config.n_layers_in_coda,
        adapter=True,
        feedback="state",
        latent_norm=latent_norm,
        norm_after_coda=True,
        exit_gate=False,
        modules=ModulePaths(),
    )


class HuginnTransformer(nn.Module):
    """The checkpoint's ``transformer.*`` modules: embeddings, prelude, adapter, core, coda, final norm."""

    def __init__(self, config: RecurrentDepthConfig, block_class: type[nn.Module]) -> None:
        super().__init__()
        d = config.n_embd
        self.wte = nn.Embedding(config.padded_vocab_size, d)
        self.prelude = nn.ModuleList(block_class(config) for _ in range(config.n_layers_in_prelude))
        self.adapter = nn.Linear(2 * d, d, bias=config.bias)
        self.core_block = nn.ModuleList(
            block_class(config) for _ in range(config.n_layers_in_recurrent_block)
        )
        self.coda = nn.ModuleList(block_class(config) for _ in range(config.n_layers_in_coda))
        self.ln_f = RMSNorm(d, eps=config.norm_eps)


class RecurrentDepthLM(LoopedLM):
    """A Huginn-architecture model whose forward pass streams its states to consumers.

    Example:
        >>> import torch, lens
        >>> model = lens.RecurrentDepthLM(lens.RecurrentDepthConfig(n_embd=32, n_heads=2, vocab_size=50))
        >>> out = model(torch.tensor([[1, 2, 3]]), num_steps=4, init_state="zeros")
        >>> tuple(out.logits.shape), model.layout.describe()
        ((1, 3, 50), 'prelude 1 · core 2 × T · coda 1')
    """

    block_class: type[nn.Module] = SandwichBlock
    freqs_cis: Tensor

    def __init__(self, config: RecurrentDepthConfig, tokenizer: Any = None) -> None:
        super().__init__()
        self.config = config
        self.layout = self.build_layout(config)
        d = config.n_embd
        self.transformer = HuginnTransformer(config, self.block_class)
        self.lm_head = nn.Linear(d, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.build_rotary()
        self.tokenizer = tokenizer
        self.reset_parameters()
        self.setup_loop_hooks()

    # ---- construction --------------------------------------------------------------------------
    @staticmethod
    def build_layout(config: RecurrentDepthConfig) -> UnrolledLayout:
        return huginn_layout(config)

    def build_rotary(self) -> None:
        """Huginn keeps its interleaved-pair table as a persistent buffer (``freqs_cis`` is a checkpoint key)."""
        cfg = self.config
        self.register_buffer(
            "freqs_cis", precompute_freqs_cis(cfg.head_dim, cfg.block_size, cfg.rope_base), persistent=True
        )

    @property
    def _is_meta(self) -> bool:
        return self.transformer.wte.weight.is_meta

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Huginn's initialisation (meta tensors are left alone)."""
        if self._is_meta:
            return
        std, out_std = self.config.state_std, self.config.init_values.get("out_proj", self.config.state_std)
        emb_std = self.config.init_values.get("embedding", std)
        nn.init.trunc_normal_(self.transformer.wte.weight, std=emb_std, a=-3 * emb_std, b=3 * emb_std)
        nn.init.trunc_normal_(self.transformer.adapter.weight, std=std, a=-3 * std, b=3 * std)
        if self.transformer.adapter.bias is not None:
            nn.init.zeros_(self.transformer.adapter.bias)
        for stage in (self.transformer.prelude, self.transformer.core_block, self.transformer.coda):
            for block in stage:
                init_block_(block, std, out_std)
        nn.init.ones_(self.transformer.ln_f.weight)
        if not self.config.tie_embeddings:
            nn.init.trunc_normal_(self.lm_head.weight, std=emb_std, a=-3 * emb_std, b=3 * emb_std)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute ``freqs_cis`` in float32, as Huginn does at construction."""
        cfg = self.config
        self.freqs_cis = precompute_freqs_cis(cfg.head_dim, cfg.block_size, cfg.rope_base).to(device)

    def _apply(self, fn: Any, recurse: bool = True) -> RecurrentDepthLM:
        """Keep the rotary table in float32 whatever dtype the weights are cast to (as Huginn does)."""
        super()._apply(fn, recurse)
        table = getattr(self, "freqs_cis", None)
        if table is not None and table.dtype != torch.float32 and not table.is_meta:
            self.reset_buffers(table.device)
        return self

    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "transformer.wte.weight"} if self.config.tie_embeddings else {}

    # ---- the family's rules -------------------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        return self.transformer.wte(input_ids) * self.config.embed_scale

    def rope(self, positions: Tensor) -> Tensor:
        """The rotations of ``freqs_cis`` at ``positions``, in the form :func:`lens.layers.apply_rotary` multiplies."""
        return self._rotations()[0, positions]

    def _rotations(self) -> Tensor:
        """:func:`~lens.layers.rotary_rotation` of the whole ``freqs_cis`` table, rebuilt only when the table
        changes (another tensor, device or dtype, or an in-place write: its version counter)."""
        table = self.freqs_cis
        key = (table.data_ptr(), table._version, table.device, table.dtype, tuple(table.shape))
        cached = self.__dict__.get("_rotation_cache")
        if cached is None or cached[0] != key:
            cached = (key, rotary_rotation(table))
            self.__dict__["_rotation_cache"] = cached  # a plain attribute: not a buffer, not in checkpoints
        return cached[1]

    def initial_state(
        self, embedded: Tensor, init_state: InitState = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Huginn's truncated-normal latent (``std * emb_scale``), zeros, or a given tensor."""
        if isinstance(init_state, Tensor):
            if init_state.shape[-1] != embedded.shape[-1]:
                raise InputError(
                    f"init_state has width {init_state.shape[-1]}, the model {embedded.shape[-1]}"
                )
            try:
                torch.broadcast_shapes(init_state.shape, embedded.shape)
            except RuntimeError:
                raise InputError(
                    f"init_state of shape {tuple(init_state.shape)} does not fit the batch "
                    f"{tuple(embedded.shape)} ([B, S, d], or a shape that broadcasts to it)"
                ) from None
            return init_state.to(device=embedded.device, dtype=embedded.dtype).expand_as(embedded).clone()
        if isinstance(init_state, str) and init_state == "zeros":
            return torch.zeros_like(embedded)
        if init_state is not None and not (isinstance(init_state, str) and init_state == "random"):
            raise InputError(f"init_state must be None, 'random', 'zeros' or a tensor, got {init_state!r}")
        std = self.config.state_std
        x = torch.empty(embedded.shape, dtype=torch.float32, device=embedded.device)
        if std > 0:
            x.normal_(generator=generator)
            x = torch.nn.init.trunc_normal_(x, std=std, a=-3 * std, b=3 * std, generator=generator)
            x = x * self.config.embed_scale
        else:
            x.zero_()
        return x.to(embedded.dtype)

    def injection(self, embedded: Tensor) -> Tensor:
        """The embedded-input half of the adapter, computed once per forward pass."""
        return kernels.adapter_injection(embedded, self.transformer.adapter.weight)

    def inject(self, state: Tensor, injection: Tensor, iteration: int) -> Tensor:
        """``adapter(concat[state, prelude output])`` (after the optional test-time noise)."""
        adapter = self.transformer.adapter
        return kernels.adapter_step(self._noise(state, iteration), adapter.weight, injection, adapter.bias)

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


__all__ = ["SIGNATURE", "RecurrentDepthLM", "huginn_layout"]
