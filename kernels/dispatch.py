"""Which implementation runs a kernel call: Triton on CUDA, chunked PyTorch elsewhere, or the reference.

Every public op in :mod:`kernels` asks :func:`backend_for` first. The choice depends only on the
tensor's device, whether Triton can be imported, and the debugging switches:

* ``with kernels.force_reference(): ...`` runs everything inside the block on the plain PyTorch
  reference (the definition each fast path is tested against);
* the environment variable ``LOOPLENS_KERNELS`` does the same process-wide: ``reference`` forces the
  reference, ``torch`` forces the chunked PyTorch path even on CUDA, ``auto`` (or unset) lets the device
  decide.

Triton is an optional extra (``looplens[gpu]``); it is imported only when a CUDA tensor asks for it, so
the CPU path works without it installed.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Iterator
from typing import Literal

from torch import Tensor

Backend = Literal["triton", "torch", "reference"]

ENV_VAR = "LOOPLENS_KERNELS"
_ENV_CHOICES = ("auto", "reference", "torch")

#: Device types whose tensors go to the Triton kernels (tests add "cpu" to run them interpreted).
TRITON_DEVICE_TYPES = frozenset({"cuda"})

_FORCED: contextvars.ContextVar[bool] = contextvars.ContextVar("looplens_force_reference", default=False)


def _env_choice() -> str:
    """The ``LOOPLENS_KERNELS`` setting, checked: a typo must not silently mean "auto".

    One read of the environment; the parsing of each distinct value is remembered.
    """
    raw = os.environ.get(ENV_VAR)
    return "auto" if raw is None else _parse_env(raw)


@functools.cache
def _parse_env(raw: str) -> str:
    value = raw.strip().lower() or "auto"
    if value not in _ENV_CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(_ENV_CHOICES)}")
    return value


@functools.cache
def triton_available() -> bool:
    """True when the optional ``triton`` package can be imported (checked once per process)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install is the same as none: use the PyTorch path
        return False
    return True


def reference_forced() -> bool:
    """True inside :func:`force_reference` or when ``LOOPLENS_KERNELS=reference``."""
    return _FORCED.get() or _env_choice() == "reference"


def backend_for(tensor: Tensor) -> Backend:
    """The implementation a call on ``tensor`` should use: ``"triton" | "torch" | "reference"``.

    CUDA tensors get Triton when it is installed, everything else the chunked PyTorch path; the
    debugging switches override both. Individual ops may still fall back from ``"triton"`` to PyTorch
    for inputs the kernels do not cover (see each op), never to a silently different result.
    """
    if _FORCED.get():
        return "reference"
    choice = _env_choice()
    if choice != "auto":
        return choice  # type: ignore[return-value]
    if tensor.device.type in TRITON_DEVICE_TYPES and triton_available():
        return "triton"
    return "torch"


def use_triton(tensor: Tensor) -> bool:
    """Whether a core op on ``tensor`` should run its Triton kernel.

    The device is checked first, so an op on a CPU tensor (the small-model decoding path, dozens of
    ops per block) never reads the environment; elsewhere it is :func:`backend_for`'s answer.
    """
    return tensor.device.type in TRITON_DEVICE_TYPES and backend_for(tensor) == "triton"


@contextlib.contextmanager
def force_reference() -> Iterator[None]:
    """Run every kernel call in this block on the PyTorch reference path (for debugging a fast path).

    >>> import torch, kernels
    >>> with kernels.force_reference():
    ...     kernels.backend_for(torch.zeros(1))
    'reference'
    """
    token = _FORCED.set(True)
    try:
        yield
    finally:
        _FORCED.reset(token)


__all__ = [
    "Backend",
    "ENV_VAR",
    "TRITON_DEVICE_TYPES",
    "backend_for",
    "force_reference",
    "reference_forced",
    "triton_available",
    "use_triton",
]
