"""The errors looplens raises for bad input and damaged files, with one common base.

User errors (a wrong argument, a damaged checkpoint, a run made with other settings) derive from
:class:`LooplensError`; the command line prints those as one line and exits with status 2. Anything
else (``TypeError``, ``KeyError``, ...) is a bug and keeps its traceback. Each class also derives from
the built-in exception it refines (``ValueError``, ``FileNotFoundError``), so ``except ValueError``
keeps working.
"""

from __future__ import annotations


class LooplensError(Exception):
    """Base of every user-facing looplens error."""


class InputError(LooplensError, ValueError):
    """An argument with a wrong value, shape, type or range (``num_steps=0``, an unknown site, ...)."""


class ConfigError(LooplensError, ValueError):
    """A model configuration that is invalid or describes an architecture looplens does not implement."""


class ConfigTypeError(ConfigError, TypeError):
    """A configuration field of the wrong type (``"n_heads": "four"``)."""


class CheckpointError(LooplensError, ValueError):
    """A checkpoint that does not match its configuration's architecture, or is damaged."""


class ModelNotFoundError(LooplensError, FileNotFoundError):
    """Neither an embedded model's name nor a checkpoint directory."""


__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConfigTypeError",
    "InputError",
    "LooplensError",
    "ModelNotFoundError",
]
