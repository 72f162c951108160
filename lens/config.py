"""The recurrent-depth configuration, read from (and written back to) a Huginn ``config.json``.

Huginn's config carries many fields; each one is either used by the model, checked against the
architecture looplens implements (a different block or norm class is an error, not a silent
approximation), or kept as provenance. Generic Hugging Face bookkeeping keys are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lens.errors import ConfigError, ConfigTypeError

CONFIGS_DIR = Path(__file__).parent / "configs"  # released models' configs and tokenizers (no weights)

# Fields whose value must equal what looplens implements: anything else would be a different model.
_ARCHITECTURE_CHECKS: dict[str, tuple[Any, ...]] = {
    "block_class_name": ("SandwichBlock",),
    "norm_class_name": ("RMSNorm_llama",),
    "mlp_class_name": ("GatedMLP",),
    "nonlin_name": ("SiLU",),
    "injection_type": ("linear",),
    "architecture_class_name": ("RecurrentGPT",),
}

# Generic keys written by transformers' PretrainedConfig that say nothing about the architecture.
_HF_BOOKKEEPING = {
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "pruned_heads",
    "tie_word_embeddings",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "cross_attention_hidden_size",
    "add_cross_attention",
    "tie_encoder_decoder",
    "finetuning_task",
    "id2label",
    "label2id",
    "task_specific_params",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "num_beam_groups",
    "diversity_penalty",
    "_name_or_path",
    "tf_legacy_loss",
    "use_bfloat16",
    "dtype",
    "_commit_hash",
    "_attn_implementation_autoset",
    "transformers_version",
    "architectures",
    "auto_map",
    "torch_dtype",
    "model_type",
}


@dataclass
class RecurrentDepthConfig:
    """Shape and recipe of a Huginn-style recurrent-depth model.

    Names follow Huginn's ``config.json`` so a real config parses field by field.

    Example:
        >>> cfg = RecurrentDepthConfig(n_embd=64, n_heads=4, vocab_size=128)
        >>> cfg.head_dim, cfg.num_key_value_heads, cfg.embed_scale
        (16, 4, 8.0)
    """

    family: ClassVar[str] = "huginn"

    n_embd: int = 128
    n_heads: int = 4
    # None in the constructor means "derive it"; __post_init__ always sets an int.
    num_key_value_heads: int = None  # type: ignore[assignment]
    head_dim: int = None  # type: ignore[assignment]
    n_layers_in_prelude: int = 1
    n_layers_in_recurrent_block: int = 2
    n_layers_in_coda: int = 1
    intermediate_size: int = 256
    vocab_size: int = 128
    padded_vocab_size: int = None  # type: ignore[assignment]  # None: vocab_size (__post_init__)
    block_size: int = 256
    norm_eps: float = 1e-6
    qk_bias: bool = True
    bias: bool = False
    rope_base: float = 50000.0
    tie_embeddings: bool = True
    mean_recurrence: int = 8
    mean_backprop_depth: int = 4
    init_values: dict[str, float] = field(default_factory=dict)
    state_init: str = "like-init"
    sampling_scheme: str = "poisson-lognormal-filling"
    test_time_noise: float = 0.0
    test_time_noise_type: str = "fixed"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Checked against the implemented architecture (see _ARCHITECTURE_CHECKS).
    block_class_name: str = "SandwichBlock"
    norm_class_name: str = "RMSNorm_llama"
    mlp_class_name: str = "GatedMLP"
    nonlin_name: str = "SiLU"
    injection_type: str = "linear"
    architecture_class_name: str = "RecurrentGPT"
    # Provenance only: recorded, round-tripped, not used by inference.
    n_layers: int | None = None
    effective_expected_depth: int | None = None
    init_strategy: str = "takase"
    init_orthogonal: bool = False
    activation_checkpoint_impl: str = "per-iteration"
    padding_multiple: int = 1
    name: str = "recurrent-depth"

    def __post_init__(self) -> None:
        self._check_types()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.n_embd // self.n_heads
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size
        self.init_values = {**self.default_init_values(), **self.init_values}
        self.validate()

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def embed_scale(self) -> float:
        """Huginn multiplies the token embedding by this before the prelude."""
        return float(self.init_values["embed_scale"])

    @property
    def state_std(self) -> float:
        """Std of the truncated-normal initial latent (before ``embed_scale``)."""
        return float(self.init_values["std"])

    def default_init_values(self) -> dict[str, float]:
        """Huginn's "takase" scales: std = sqrt(2 / 5d), out_proj = std / sqrt(2 * effective depth)."""
        std = (2.0 / (5.0 * self.n_embd)) ** 0.5
        depth = self.effective_expected_depth or (
            self.n_layers_in_prelude
            + self.n_layers_in_coda
            + self.n_layers_in_recurrent_block * self.mean_recurrence
        )
        return {
            "std": std,
            "out_proj": std / (2.0 * depth) ** 0.5,
            "embedding": std,
            "embed_scale": float(self.n_embd) ** 0.5,
        }

    def unrolled_layers(self, num_steps: int) -> int:
        """Number of block outputs in the unrolled order at ``num_steps`` iterations (from the layout)."""
        from lens.families.huginn import huginn_layout

        return huginn_layout(self).num_unrolled(num_steps)

    # ---- validation ---------------------------------------------------------------------------
    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            expected = f.type if isinstance(f.type, str) else str(f.type)
            if expected.startswith("int") and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigTypeError(f"config field {f.name!r} must be an integer, got {value!r}")
            if expected.startswith("float") and (
                not isinstance(value, (int, float)) or isinstance(value, bool)
            ):
                raise ConfigTypeError(f"config field {f.name!r} must be a number, got {value!r}")
            if expected.startswith("float"):
                setattr(self, f.name, float(value))
            if expected.startswith("bool") and not isinstance(value, bool):
                raise ConfigTypeError(f"config field {f.name!r} must be true or false, got {value!r}")
            if expected.startswith("str") and not isinstance(value, str):
                raise ConfigTypeError(f"config field {f.name!r} must be a string, got {value!r}")
            if expected.startswith("dict") and not isinstance(value, dict):
                raise ConfigTypeError(f"config field {f.name!r} must be a mapping, got {value!r}")

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field for any inconsistent, non-finite or unsupported setting."""
        for name in (
            "n_embd",
            "n_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "block_size",
            "n_layers_in_recurrent_block",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"config field {name!r} must be >= 1, got {getattr(self, name)}")
        for name in ("n_layers_in_prelude", "n_layers_in_coda"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config field {name!r} must be >= 0, got {getattr(self, name)}")
        if self.n_heads * self.head_dim != self.n_embd:
            raise ConfigError(
                f"config fields 'n_heads' x 'head_dim' ({self.n_heads} x {self.head_dim}) must equal 'n_embd' ({self.n_embd})"
            )
        if self.n_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_key_value_heads' ({self.num_key_value_heads}) must divide 'n_heads' ({self.n_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"config field 'head_dim' must be even for rotary embeddings, got {self.head_dim}"
            )
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError("config field 'padded_vocab_size' must be >= 'vocab_size'")
        for key in ("std", "embed_scale"):
            if key not in self.init_values:
                raise ConfigError(f"config field 'init_values' lacks {key!r}")
        for name, allowed in _ARCHITECTURE_CHECKS.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"config field {name!r} = {getattr(self, name)!r} is not supported (looplens implements {allowed[0]!r})"
                )
        positive = {"rope_base": self.rope_base, "norm_eps": self.norm_eps}
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"config field {name!r} must be a finite number > 0, got {value!r}")
        if not (math.isfinite(self.test_time_noise) and self.test_time_noise >= 0):
            raise ConfigError(
                f"config field 'test_time_noise' must be finite and >= 0, got {self.test_time_noise!r}"
            )
        for key, value in self.init_values.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"config field 'init_values.{key}' must be a finite number, got {value!r}")
        if self.test_time_noise_type not in ("fixed", "geom", "sqrt", "line", "chi"):
            raise ConfigError(
                f"config field 'test_time_noise_type' = {self.test_time_noise_type!r} is unknown"
            )

    # ---- (de)serialisation --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecurrentDepthConfig:
        """Build from a Huginn-style mapping; unknown architecture keys raise, HF bookkeeping is dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = dict(data)
        if "num_attention_heads" in data and "n_heads" not in data:
            data["n_heads"] = data.pop("num_attention_heads")
        unknown = sorted(k for k in data if k not in known and k not in _HF_BOOKKEEPING)
        if unknown:
            raise ConfigError(
                f"unknown config field(s) {unknown}: not part of the recurrent-depth architecture"
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> RecurrentDepthConfig:
        """Read ``config.json`` (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} is not valid UTF-8 JSON: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_name(cls, name: str) -> RecurrentDepthConfig:
        """A released model's configuration shipped with looplens (no weights): ``"huginn-0125"``.

        Example:
            >>> RecurrentDepthConfig.from_name("huginn-0125").unrolled_layers(16)
            68
        """
        path = CONFIGS_DIR / name / "config.json"
        if not path.is_file():
            known = sorted(p.name for p in CONFIGS_DIR.iterdir() if (p / "config.json").is_file())
            raise ConfigError(f"no shipped configuration named {name!r}; known: {', '.join(known)}")
        return cls.from_json(path)

    def to_dict(self) -> dict[str, Any]:
        """Huginn-compatible mapping (also readable by Huginn's own config class)."""
        out = dataclasses.asdict(self)
        out["model_type"] = "huginn_raven"
        out["architectures"] = ["RavenForCausalLM"]
        out["n_layers"] = self.n_layers or (
            self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda
        )
        return out

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
