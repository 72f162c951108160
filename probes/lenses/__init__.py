"""Lenses: Logit, Coda and Tuned."""

from __future__ import annotations

from collections.abc import Sequence

from lens.errors import InputError
from lens.model import LoopedLM
from probes.lenses.base import Lens, LensNotApplicableError
from probes.lenses.coda import CodaLens
from probes.lenses.logit import LogitLens
from probes.lenses.tuned import TunedLens

LENSES = {"logit": LogitLens, "coda": CodaLens}


def make_lens(model: LoopedLM, lens: str | Lens) -> Lens:
    """A lens by name (``"logit"``, ``"coda"``) or an already-built lens (e.g. a trained ``TunedLens``).

    A lens the model's family does not support raises :class:`LensNotApplicableError`.
    """
    if isinstance(lens, Lens):
        return lens
    if lens not in LENSES:
        raise InputError(f"unknown lens {lens!r}; built-in lenses: {sorted(LENSES)} (or pass a TunedLens)")
    return LENSES[lens](model)


def applicable_lenses(model: LoopedLM, wanted: Sequence[str] = ("logit", "coda")) -> list[str]:
    """The built-in lenses among ``wanted`` that the model's family supports, in order."""
    return [name for name in wanted if name in model.layout.lenses()]


__all__ = [
    "LENSES",
    "CodaLens",
    "Lens",
    "LensNotApplicableError",
    "LogitLens",
    "TunedLens",
    "applicable_lenses",
    "make_lens",
]
