"""The unrolled layer order as the figures draw it: the model's layout at the probed depth.

A looped LM with ``prelude`` blocks, ``core`` blocks repeated for ``steps`` iterations and ``coda``
blocks is read, for plotting, as one deep network of ``prelude + steps × core + coda`` layers:
prelude blocks first, then the core blocks iteration by iteration (t-major), then the coda. That
order, and which stages a family has, is :class:`lens.layout.UnrolledLayout`'s: a study writes it
into its run's manifest, and figures read it from there (:meth:`Layout.from_manifest`), never from
the rows.

Example:
    >>> from lens.layout import UnrolledLayout
    >>> layout = Layout(UnrolledLayout(prelude=2, core=4, coda=2), steps=16)
    >>> layout.n_unrolled
    68
    >>> layout.locate(2), layout.locate(65), layout.locate(67)
    (('core', 1, 0), ('core', 16, 3), ('coda', 0, 1))
    >>> layout.unrolled_index("core", 16, 3)
    65
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from lens.layout import STAGES, Unrolled, UnrolledLayout

__all__ = ["STAGES", "Layout"]


class Layout(Unrolled):
    """A model's :class:`~lens.layout.UnrolledLayout` unrolled to ``steps`` iterations, plus a table view."""

    def frame(self) -> pd.DataFrame:
        """One row per unrolled layer: unrolled_index, stage, iteration, block, site."""
        return pd.DataFrame(self.layers(), columns=["unrolled_index", "stage", "iteration", "block", "site"])

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], steps: int | None = None) -> Layout:
        """The layout a run recorded (``model.layout``) at ``steps`` (default: the run's ``settings.steps``)."""
        if steps is None:
            steps = int((manifest.get("settings") or {}).get("steps", 0) or 0)
        return cls(UnrolledLayout.from_manifest(manifest), steps)
