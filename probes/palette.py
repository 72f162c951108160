"""Lens and target-kind names in their reading order, with one label and one colour each.

The study figures (``studies.figures``) and the explorer (``app``) draw the same lenses and targets;
both take their order, labels and colours from here, so a lens keeps its colour everywhere. Colours
are from the Okabe–Ito palette (readable by colour-blind readers and in grey).

Example:
    >>> lens_order(["tuned", "mine", "logit"])
    ['logit', 'tuned', 'mine']
    >>> target_order(["digit_3", "control", "final", "predicted"])
    ['predicted', 'final', 'control', 'digit_3']
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "EXTRA_COLORS",
    "LENS_COLORS",
    "LENS_LABELS",
    "LENS_ORDER",
    "TARGET_COLORS",
    "TARGET_LABELS",
    "TARGET_ORDER",
    "lens_color",
    "lens_label",
    "lens_order",
    "band_trace",
    "rgba",
    "target_color",
    "target_label",
    "target_order",
]

#: Lenses in the order a researcher reads them: the plain Logit Lens, the model's own coda, the learned one.
LENS_ORDER: tuple[str, ...] = ("logit", "coda", "tuned")
LENS_LABELS: dict[str, str] = {"logit": "Logit Lens", "coda": "Coda Lens", "tuned": "Tuned Lens"}
LENS_COLORS: dict[str, str] = {"logit": "#0072B2", "coda": "#D55E00", "tuned": "#009E73"}
#: Colours for lenses and targets outside the lists above (picked by a stable hash of the name).
EXTRA_COLORS: tuple[str, ...] = ("#CC79A7", "#56B4E9", "#E69F00", "#F0E442", "#000000")

#: Target kinds in reading order: what the model says, the right answer, the step before it, the
#: control token, and the other digits as a baseline; any other kind follows alphabetically.
TARGET_ORDER: tuple[str, ...] = (
    "predicted",
    "final",
    "intermediate",
    "intermediate_alt",
    "control",
    "digit_baseline",
)
TARGET_LABELS: dict[str, str] = {
    "predicted": "model's own answer",
    "final": "final answer",
    "intermediate": "intermediate result",
    "intermediate_alt": "intermediate result (other spelling)",
    "control": "control token",
    "digit_baseline": "other digits (baseline)",
}
TARGET_COLORS: dict[str, str] = {
    "predicted": "#56B4E9",
    "final": "#222222",
    "intermediate": "#E69F00",
    "intermediate_alt": "#F0C36B",
    "control": "#8C8C8C",
    "digit_baseline": "#CC79A7",
}


def _ordered(names: Iterable[str], order: tuple[str, ...]) -> list[str]:
    unique = set(names)
    known = [name for name in order if name in unique]
    return known + sorted(unique - set(known))


def _extra_color(name: str) -> str:
    return EXTRA_COLORS[sum(map(ord, name)) % len(EXTRA_COLORS)]


def lens_order(lenses: Iterable[str]) -> list[str]:
    """The distinct lenses given, logit, coda, tuned first, any other lens after them alphabetically."""
    return _ordered(lenses, LENS_ORDER)


def lens_color(lens: str) -> str:
    return LENS_COLORS.get(lens) or _extra_color(lens)


def lens_label(lens: str) -> str:
    return LENS_LABELS.get(lens, f"{lens} lens")


def target_order(kinds: Iterable[str]) -> list[str]:
    """The distinct target kinds given, in ``TARGET_ORDER`` first, others (``digit_0`` …) alphabetically."""
    return _ordered(kinds, TARGET_ORDER)


def target_color(kind: str) -> str:
    return TARGET_COLORS.get(kind) or _extra_color(kind)


def target_label(kind: str) -> str:
    return TARGET_LABELS.get(kind, kind.replace("_", " "))


def rgba(color: str, alpha: float) -> str:
    """``#RRGGBB`` → ``rgba(r,g,b,alpha)`` (plotly fills and bands)."""
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def band_trace(x: list, low: list, high: list, color: str, alpha: float, **kwargs: Any) -> Any:
    """A plotly interval band (``low``..``high`` over ``x``): a filled outline with no line, no markers
    and no hover, kept out of the legend; ``kwargs`` go to ``go.Scatter`` (``legendgroup``, ``name``)."""
    import plotly.graph_objects as go

    return go.Scatter(
        x=list(x) + list(x)[::-1],
        y=list(high) + list(low)[::-1],
        fill="toself",
        mode="lines",  # plotly adds markers to short traces by default
        fillcolor=rgba(color, alpha),
        line=dict(width=0),
        hoverinfo="skip",
        showlegend=False,
        **kwargs,
    )
