"""Retrofitted recurrence (McLeish et al. 2025): pretrained Llama layers cut into Huginn's prelude / core / coda.

The checkpoint uses Huginn's module tree and config (``model_type`` ``"huginn_raven"``, even
``block_class_name: "SandwichBlock"`` by name only), with Llama's blocks inside: pre-norm
``norm_1``/``norm_2`` (no ``norm_3``/``norm_4``), no qk bias, grouped key/value heads, rotate-half RoPE
from ``rope_theta`` (and ``rope_scaling``; the config's ``rope_base`` is not read), an untied head,
an embedding scale of 1, and **no** ``ln_f`` between the recurrence and the coda (the coda receives
the raw core state; ``ln_f`` is applied once, before the head).

How a retrofit is told apart from Huginn, which shares its ``model_type``: by the weights — core
block 0 has ``norm_1``/``norm_2`` but no ``norm_4`` — and the config, which must carry
``rope_theta`` (the converter copies it from the Llama model; Huginn's configs have only
``rope_base``). OLMo-based retrofits (``q_norm``/``k_norm`` weights, post-norm blocks) are a different
block and are not implemented.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lens.config import RecurrentDepthConfig
from lens.errors import ConfigError
from lens.families.huginn import RecurrentDepthLM, huginn_layout
from lens.layers import PreNormBlock, RotaryEmbedding
from lens.layout import UnrolledLayout

#: Weights of a retrofit's core block 0 (pre-norm: exactly two norms) and of an OLMo-based one.
SIGNATURE = "transformer.core_block.0.norm_2.weight"
OLMO_SIGNATURE = "transformer.core_block.0.attn.q_norm.weight"


@dataclass
class RetrofitConfig(RecurrentDepthConfig):
    """Huginn's config plus the Llama fields a retrofit reads: ``rope_theta``, ``rope_scaling``,
    ``max_position_embeddings`` (bookkeeping), ``partial_rotary_factor`` (must be 1, as in Llama)."""

    family: ClassVar[str] = "retrofit"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int | None = None
    partial_rotary_factor: float = 1.0
    tie_embeddings: bool = False
    qk_bias: bool = False
    name: str = "retrofit"

    def default_init_values(self) -> dict[str, float]:
        """Huginn's scales, but no embedding scale: Llama layers expect the plain embedding."""
        return {**super().default_init_values(), "embed_scale": 1.0}

    def validate(self) -> None:
        super().validate()
        if self.qk_bias:
            raise ConfigError("config field 'qk_bias' must be false for a retrofitted Llama model")
        if self.partial_rotary_factor != 1.0:
            raise ConfigError(
                f"config field 'partial_rotary_factor' = {self.partial_rotary_factor} is not supported "
                "(Llama layers rotate the whole head)"
            )
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ConfigError("config field 'rope_scaling' must be a mapping or null")


class RetrofitLM(RecurrentDepthLM):
    """Huginn's module tree with Llama pre-norm blocks and rotate-half RoPE; the coda reads the raw state.

    Example:
        >>> import torch
        >>> model = RetrofitLM(RetrofitConfig(n_embd=32, n_heads=2, num_key_value_heads=1, vocab_size=50))
        >>> model(torch.tensor([[1, 2, 3]]), num_steps=2, init_state="zeros").logits.shape
        torch.Size([1, 3, 50])
    """

    block_class = PreNormBlock
    config: RetrofitConfig

    @staticmethod
    def build_layout(config: RecurrentDepthConfig) -> UnrolledLayout:
        return huginn_layout(config, family="retrofit", latent_norm=False)

    def build_rotary(self) -> None:
        cfg = self.config
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        self.rotary.reset(device)

    def rope(self, positions: Tensor) -> Tensor:
        return self.rotary(positions)


def check_config(data: Mapping[str, Any]) -> None:
    """A retrofit's config must say which RoPE base its Llama layers use."""
    if "rope_theta" not in data:
        raise ConfigError(
            "this checkpoint has Llama pre-norm blocks (a retrofitted-recurrence model) but its "
            "config.json has no 'rope_theta'; the retrofit code reads the RoPE base from rope_theta, "
            "never from rope_base: add the source model's rope_theta"
        )


__all__ = ["OLMO_SIGNATURE", "SIGNATURE", "RetrofitConfig", "RetrofitLM", "check_config"]
