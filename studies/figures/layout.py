"""The unrolled layer order of a recurrent-depth model, as the figures need it.

A looped LM with ``prelude`` blocks, ``core`` blocks repeated for ``steps`` iterations and
``coda`` blocks is read, for plotting, as one deep network of ``prelude + steps × core + coda``
layers: prelude blocks first, then the core blocks iteration by iteration (t-major), then the
coda. Every table and figure in :mod:`studies.figures` uses this order.

Example:
    >>> layout = Layout(prelude=2, core=4, coda=2, steps=16)
    >>> layout.n_unrolled
    68
    >>> layout.locate(2), layout.locate(65), layout.locate(67)
    (('core', 1, 0), ('core', 16, 3), ('coda', 0, 1))
    >>> layout.unrolled_index("core", 16, 3)
    65
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

__all__ = ["STAGES", "Layout"]

STAGES = ("prelude", "core", "coda")


@dataclass(frozen=True)
class Layout:
    """Block counts per stage and the number of recurrent iterations ``steps`` (T)."""

    prelude: int
    core: int
    coda: int
    steps: int

    def __post_init__(self) -> None:
        if min(self.prelude, self.coda) < 0 or self.core < 1 or self.steps < 1:
            raise ValueError(f"invalid layout {self}: need prelude, coda >= 0 and core, steps >= 1")

    @property
    def n_unrolled(self) -> int:
        """Number of unrolled layers: prelude + steps × core + coda."""
        return self.prelude + self.steps * self.core + self.coda

    @property
    def core_start(self) -> int:
        """Unrolled index of the first core block of iteration 1."""
        return self.prelude

    @property
    def coda_start(self) -> int:
        """Unrolled index of the first coda block."""
        return self.prelude + self.steps * self.core

    def locate(self, u: int) -> tuple[str, int, int]:
        """``(stage, iteration, block)`` of unrolled layer ``u`` (iteration 0 outside the core)."""
        if not 0 <= u < self.n_unrolled:
            raise IndexError(f"unrolled index {u} outside 0..{self.n_unrolled - 1}")
        if u < self.core_start:
            return "prelude", 0, u
        if u < self.coda_start:
            t, j = divmod(u - self.core_start, self.core)
            return "core", t + 1, j
        return "coda", 0, u - self.coda_start

    def unrolled_index(self, stage: str, iteration: int, block: int) -> int:
        """Inverse of :meth:`locate`."""
        if stage == "prelude" and 0 <= block < self.prelude:
            return block
        if stage == "core" and 1 <= iteration <= self.steps and 0 <= block < self.core:
            return self.core_start + (iteration - 1) * self.core + block
        if stage == "coda" and 0 <= block < self.coda:
            return self.coda_start + block
        raise IndexError(
            f"no unrolled layer for stage={stage!r}, iteration={iteration}, block={block} in {self}"
        )

    def frame(self) -> pd.DataFrame:
        """One row per unrolled layer: unrolled_index, stage, iteration, block, site."""
        rows = []
        for u in range(self.n_unrolled):
            stage, t, j = self.locate(u)
            rows.append(
                {"unrolled_index": u, "stage": stage, "iteration": t, "block": j, "site": f"{stage}.{j}"}
            )
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, int]:
        return {"prelude": self.prelude, "core": self.core, "coda": self.coda, "steps": self.steps}

    @classmethod
    def infer(cls, ranks: pd.DataFrame) -> Layout:
        """Read the layout off a ranks-shaped table (its block sites and iterations)."""
        sites = ranks.loc[ranks["unrolled_index"] >= 0, ["site", "iteration"]].drop_duplicates()
        stage = sites["site"].str.split(".").str[0]
        count = {s: int(sites.loc[stage == s, "site"].nunique()) for s in STAGES}
        steps = int(sites.loc[stage == "core", "iteration"].max()) if count["core"] else 1
        return cls(prelude=count["prelude"], core=max(count["core"], 1), coda=count["coda"], steps=steps)
