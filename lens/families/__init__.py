"""The family registry: which looped architectures looplens reads, and how a checkpoint is recognised.

A family is a config class, a model class (its module tree, blocks and rules) and its layout
(:class:`lens.layout.UnrolledLayout`); probes, studies and the explorer only ever see the layout and
the model's small interface, so adding a family means adding a module here, not editing them.

Recognition reads ``config.json`` and the weight *names* (safetensors headers, no tensor is loaded):

==========  ==========================  ======================================================
family      ``model_type``              weights that decide
==========  ==========================  ======================================================
huginn      ``huginn_raven``            sandwich blocks: ``transformer.core_block.0.norm_4.weight``
retrofit    ``huginn_raven``            Llama pre-norm blocks: ``…core_block.0.norm_2.weight``, no
                                        ``norm_3``/``norm_4``; the config must carry ``rope_theta``
ouro        ``ouro``                    ``model.early_exit_gate.weight``, ``model.layers.0.input_layernorm_2.weight``
==========  ==========================  ======================================================

Huginn and retrofits share a ``model_type``; the weights tell them apart. A config of one family with
the weights of another, or an unknown ``model_type``, is one clear error naming what was expected.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from lens.config import RecurrentDepthConfig
from lens.errors import CheckpointError, ConfigError
from lens.families import huginn, ouro, retrofit
from lens.families.huginn import RecurrentDepthLM
from lens.families.ouro import OuroConfig, OuroLM
from lens.families.retrofit import RetrofitConfig, RetrofitLM
from lens.looped import LoopedLM

__all__ = ["FAMILIES", "Family", "detect_family", "family_of"]


@dataclass(frozen=True)
class Family:
    """One architecture: how to recognise it, and the classes that read it."""

    name: str
    summary: str
    model_type: str
    config_class: Any  # a config dataclass with a from_dict classmethod
    model_class: type[LoopedLM]
    expects: str  # the weights that identify it, in words (for error messages)
    matches: Callable[[Collection[str]], bool]
    check_config: Callable[[Mapping[str, Any]], None] = lambda data: None

    def config_from_dict(self, data: Mapping[str, Any]) -> Any:
        self.check_config(data)
        return self.config_class.from_dict(dict(data))


def _huginn_weights(keys: Collection[str]) -> bool:
    return huginn.SIGNATURE in keys


def _retrofit_weights(keys: Collection[str]) -> bool:
    return (
        retrofit.SIGNATURE in keys
        and huginn.SIGNATURE not in keys
        and "transformer.core_block.0.norm_3.weight" not in keys
        and retrofit.OLMO_SIGNATURE not in keys
    )


def _ouro_weights(keys: Collection[str]) -> bool:
    return ouro.SIGNATURE in keys and ouro.BLOCK_SIGNATURE in keys


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "huginn",
            "Huginn (prelude → adapter + sandwich core × T → ln_f → coda), model_type 'huginn_raven'",
            "huginn_raven",
            RecurrentDepthConfig,
            RecurrentDepthLM,
            f"sandwich blocks ({huginn.SIGNATURE})",
            _huginn_weights,
        ),
        Family(
            "retrofit",
            "retrofitted recurrence (Huginn's layout with Llama pre-norm blocks), model_type 'huginn_raven' + rope_theta",
            "huginn_raven",
            RetrofitConfig,
            RetrofitLM,
            f"Llama pre-norm blocks ({retrofit.SIGNATURE} without norm_3/norm_4)",
            _retrofit_weights,
            retrofit.check_config,
        ),
        Family(
            "ouro",
            "Ouro / LoopLM (all layers looped, exit gate), model_type 'ouro'",
            "ouro",
            OuroConfig,
            OuroLM,
            f"Ouro layers and exit gate ({ouro.SIGNATURE}, {ouro.BLOCK_SIGNATURE})",
            _ouro_weights,
        ),
    )
}


def _menu() -> str:
    return "; ".join(f"{f.name}: {f.summary}" for f in FAMILIES.values())


def detect_family(
    config: Mapping[str, Any], weight_names: Collection[str], where: str = "the checkpoint"
) -> Family:
    """The family of a checkpoint from its ``config.json`` mapping and its weight names.

    Raises ``ConfigError`` for an unknown ``model_type`` and ``CheckpointError`` when the weights are not
    those of any family the config allows (say, a Huginn config with Ouro weights).
    """
    model_type = config.get("model_type")
    if model_type is None and "n_layers_in_recurrent_block" in config:
        model_type = "huginn_raven"  # a Huginn-style config written without the Hugging Face key
    candidates = [f for f in FAMILIES.values() if f.model_type == model_type]
    if not candidates:
        archs = config.get("architectures")
        raise ConfigError(
            f"{where}: unknown model family (config.json has model_type {model_type!r}"
            + (f", architectures {archs}" if archs else "")
            + f"). looplens reads these families: {_menu()}"
        )
    keys = set(weight_names)
    matching = [f for f in candidates if f.matches(keys)]
    if len(matching) == 1:
        return matching[0]
    expected = " or ".join(f"{f.name} ({f.expects})" for f in candidates)
    if retrofit.OLMO_SIGNATURE in keys:
        raise ConfigError(
            f"{where}: the core blocks have q_norm/k_norm (an OLMo-based retrofit); looplens implements "
            f"the Llama-based retrofit only. Families: {_menu()}"
        )
    others = [f.name for f in FAMILIES.values() if f not in candidates and f.matches(keys)]
    found = f"; the weights look like {others[0]}'s" if others else ""
    sample = sorted(keys)[:4]
    raise CheckpointError(
        f"{where}: config.json has model_type {model_type!r}, so the weights should be {expected}, "
        f"but they are not{found} (first weight names: {sample}). Families: {_menu()}"
    )


def family_of(model: LoopedLM) -> Family:
    """The registry entry of a built model."""
    return FAMILIES[model.layout.family]
