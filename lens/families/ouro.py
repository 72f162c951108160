"""Ouro (ByteDance's LoopLM, Zhu et al. 2025): the whole stack of layers looped, with a learned exit gate.

``h = embed(ids); [h = layers(h); h = model.norm(h); λ_t = sigmoid(gate(h))] × T; logits = lm_head(h)``:
no prelude, coda or adapter, no re-injected embedding; ``model.norm`` ends **every** iteration and its
output is both the next iteration's input and that step's readout. Blocks put a norm before and after
each sublayer inside the residual (four RMSNorms), attention is grouped-query with rotate-half RoPE
from ``rope_theta``, the head is untied, and each iteration has its own key/value slots. Module paths
equal the checkpoint's keys (``model.embed_tokens``, ``model.layers.{l}``, ``model.norm``,
``model.early_exit_gate``, ``lm_head``).

Sites: ``embed``, ``core.{j}`` per iteration (all of Ouro's layers loop), ``latent`` per iteration
(the normalised state fed back, with the gate's λ_t on the stream), ``final``. The Logit Lens at the
last layer of iteration ``t`` (or at ``latent``, t) *is* the model's own step-``t`` readout.

How an Ouro checkpoint is recognised: ``model_type`` ``"ouro"`` (architecture ``OuroForCausalLM``), and
the weights hold ``model.early_exit_gate.weight`` and sandwich norms (``input_layernorm_2``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lens.config import _HF_BOOKKEEPING
from lens.errors import ConfigError, ConfigTypeError, InputError
from lens.layers import OuroBlock, RMSNorm, RotaryEmbedding
from lens.layout import ModulePaths, UnrolledLayout
from lens.looped import InitState, LoopedLM

SIGNATURE = "model.early_exit_gate.weight"
BLOCK_SIGNATURE = "model.layers.0.input_layernorm_2.weight"
_INT, _FLOAT, _BOOL, _STR = (int,), (int, float), (bool,), (str,)


@dataclass
class OuroConfig:
    """Ouro's ``config.json`` (the authors' ``OuroConfig`` keys), plus the family-neutral names the
    rest of looplens reads (``n_embd``, ``padded_vocab_size``, ``mean_recurrence``, ``block_size``).

    Example:
        >>> cfg = OuroConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
        >>> cfg.head_dim, cfg.n_embd, cfg.mean_recurrence
        (16, 64, 4)
    """

    family: ClassVar[str] = "ouro"

    vocab_size: int = 49152
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    # None in the constructor means "derive it"; __post_init__ always sets an int.
    num_key_value_heads: int = None  # type: ignore[assignment]
    head_dim: int = None  # type: ignore[assignment]
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 65536
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int | None = None
    layer_types: list | None = None
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    total_ut_steps: int = 4
    early_exit_threshold: float | None = 1.0
    early_exit_step: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    use_cache: bool = True
    chunk_size: int | None = None
    initializer_range: float = 0.02
    name: str = "ouro"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # provenance keys, round-tripped

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = {"int": _INT, "float": _FLOAT, "bool": _BOOL, "str": _STR}.get(str(f.type).split(" ")[0])
            if value is None or kind is None:
                continue
            if (kind is not _BOOL and isinstance(value, bool)) or not isinstance(value, kind):
                raise ConfigTypeError(
                    f"config field {f.name!r} must be {str(f.type).split(' ')[0]}, got {value!r}"
                )
            if kind is _FLOAT:
                setattr(self, f.name, float(value))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "total_ut_steps",
                     "max_position_embeddings"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name!r} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                f"'num_attention_heads' ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"config field 'head_dim' must be even for rotary embeddings, got {self.head_dim}"
            )
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ConfigTypeError("config field 'rope_scaling' must be a mapping or null")
        if self.layer_types is not None and not isinstance(self.layer_types, list):
            raise ConfigTypeError("config field 'layer_types' must be a list or null")
        if self.hidden_act != "silu":
            raise ConfigError(
                f"config field 'hidden_act' = {self.hidden_act!r} is not supported (Ouro uses 'silu')"
            )
        sliding = [t for t in (self.layer_types or []) if t != "full_attention"]
        if self.use_sliding_window and sliding:
            raise ConfigError(
                "sliding-window attention layers are not implemented (use_sliding_window is true)"
            )
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"config field 'layer_types' has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )
        if self.early_exit_threshold is not None and not 0.0 <= self.early_exit_threshold <= 1.0:
            raise ConfigError(
                f"config field 'early_exit_threshold' must be in [0, 1], got {self.early_exit_threshold}"
            )

    # ---- the family-neutral names -----------------------------------------------------------------
    @property
    def n_embd(self) -> int:
        return self.hidden_size

    @property
    def n_heads(self) -> int:
        return self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_size

    @property
    def mean_recurrence(self) -> int:
        """The default number of iterations (``total_ut_steps``)."""
        return self.total_ut_steps

    @property
    def block_size(self) -> int:
        """The longest context (``max_position_embeddings``)."""
        return self.max_position_embeddings

    # ---- (de)serialisation --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OuroConfig:
        """Build from Ouro's ``config.json`` mapping; unknown architecture keys raise, HF bookkeeping is dropped."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(k for k in data if k not in known and k not in _HF_BOOKKEEPING)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}: not part of the Ouro architecture")
        values = {k: v for k, v in data.items() if k in known}
        return cls(**values, extra={k: v for k, v in data.items() if k in ("architectures", "auto_map")})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, "model_type": "ouro", "architectures": ["OuroForCausalLM"], **self.extra}

    def to_json(self, path: Any) -> None:
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def ouro_layout(config: OuroConfig) -> UnrolledLayout:
    """A looped stack: every layer is a core block; the normalised state is fed back; an exit gate."""
    return UnrolledLayout(
        family="ouro",
        prelude=0,
        core=config.num_hidden_layers,
        coda=0,
        adapter=False,
        feedback="latent",
        latent_norm=True,
        norm_after_coda=False,
        exit_gate=True,
        modules=ModulePaths(
            embed="model.embed_tokens",
            prelude=None,
            adapter=None,
            core="model.layers",
            coda=None,
            norm="model.norm",
            head="lm_head",
            exit_gate="model.early_exit_gate",
        ),
    )


class OuroStack(nn.Module):
    """The checkpoint's ``model.*`` modules (embeddings, the looped layers, the final norm, the exit gate)."""

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(OuroBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(d, eps=config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(d, 1, bias=True)


class OuroLM(LoopedLM):
    """Ouro under looplens's stream: per-iteration states, readouts and exit-gate readings.

    ``model(ids, num_steps=t).logits`` is the readout after ``t`` iterations (the authors'
    ``exit_at_step=t-1``); ``gate_exit=GateExit.at_threshold(q)`` / ``.weighted()`` give their other
    exit modes; ``init_state`` does not apply (the loop starts from the embeddings).

    Example:
        >>> import torch
        >>> cfg = OuroConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        ...                  vocab_size=50, max_position_embeddings=32)
        >>> out = OuroLM(cfg)(torch.tensor([[1, 2, 3]]), num_steps=3)
        >>> tuple(out.logits.shape), tuple(out.exit_lambda.shape)
        ((1, 3, 50), (1, 3, 3))
    """

    config: OuroConfig

    def __init__(self, config: OuroConfig, tokenizer: Any = None) -> None:
        super().__init__()
        self.config = config
        self.layout = ouro_layout(config)
        d = config.hidden_size
        self.model = OuroStack(config)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.tokenizer = tokenizer
        self.reset_parameters()
        self.setup_loop_hooks()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The authors' initialisation: normal(0, initializer_range) weights, unit norms, zero gate bias."""
        if self.model.embed_tokens.weight.is_meta:
            return
        std = self.config.initializer_range
        for name, param in self.named_parameters():
            if param.dim() == 1 and "norm" in name:
                nn.init.ones_(param)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.normal_(param, std=std)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        self.rotary.reset(device)

    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.config.tie_word_embeddings else {}

    # ---- the family's rules -------------------------------------------------------------------------
    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def rope(self, positions: Tensor) -> Tensor:
        return self.rotary(positions)

    def initial_state(
        self, embedded: Tensor, init_state: InitState = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Ouro's loop starts from the embeddings: an initial state does not apply."""
        if init_state is not None:
            raise InputError(
                "init_state does not apply to Ouro: its loop starts from the token embeddings "
                "(pass init_state=None; warm starts are not defined for this family)"
            )
        return embedded

    def exit_lambda(self, latent: Tensor) -> Tensor:
        """``λ_t = sigmoid(early_exit_gate(h_t))`` ``[B, S]``: the chance to stop after this iteration."""
        return torch.sigmoid(self.model.early_exit_gate(latent)).squeeze(-1)


__all__ = ["BLOCK_SIGNATURE", "SIGNATURE", "OuroConfig", "OuroLM", "ouro_layout"]
