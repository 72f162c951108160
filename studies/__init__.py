"""Batch studies that write runs and figures (``looplens study NAME``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _arithmetic(**kwargs: Any) -> Any:
    from studies.arithmetic import run_arithmetic_study

    return run_arithmetic_study(**kwargs)


def _chains(**kwargs: Any) -> Any:
    from studies.chains import run_chains_study

    return run_chains_study(**kwargs)


def _patching(**kwargs: Any) -> Any:
    from studies.patching import run_patching_study

    return run_patching_study(**kwargs)


def _sampler(**kwargs: Any) -> Any:
    from studies.sampler import run_sampler_study

    return run_sampler_study(**kwargs)


STUDIES: dict[str, Callable[..., Any]] = {
    "arithmetic": _arithmetic,
    "chains": _chains,
    "patching": _patching,
    "sampler": _sampler,
}
"""Study name → its runner; every runner takes the options of ``looplens study`` as keywords."""
