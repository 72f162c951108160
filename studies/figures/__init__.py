"""The figure layer of the arithmetic study: plot-ready tables, PNG + interactive HTML, headlines.

Each figure is a module with ``table(tables, layout)`` (its whole content as a DataFrame),
``draw(table, layout, title)`` (→ a matplotlib figure for the PNG and a plotly figure for the
HTML) and ``headline(table, layout)`` (a few numbers for the one-screen summary):

==========================  =====================================================================
``rank_trajectory``         rank of the model's own first answer token over all unrolled layers
``numeric_prefix``          share of top-5 decodings that are digits / a minus sign, per layer
``intermediate_vs_final``   intermediate result vs final answer vs control vs other digits, per t
``depth_scaling``           accuracy vs number of iterations per task format
``latent_dynamics``         step norms, cosine to the last state, verdicts, PCA trajectories
``reference_overlay``       figures 1–3 for Huginn-3.5B (reference study) next to ours
``exit_gate``               exit-gate λ_t, exit distribution and threshold exits (Ouro runs only)
``patching_*``, ...         the patching study's figures (:mod:`studies.figures.patching`)
``sampler_frontier``        accuracy vs sequential calls and wall time per token (sampler study)
``wavefront``               diffusion step × position: frozen, iterations, lens ranks (sampler study)
==========================  =====================================================================

:func:`render_all` draws every figure whose input tables are present. The chains study adds
:data:`CHAIN_FIGURES` (drawn with :func:`render_figure`):

==========================  =====================================================================
``chain_ranks``             rank of every value along a variable chain, per hops and lens
``chain_probes``            linear-probe accuracy for every value of the chain, per hops and anchor
==========================  =====================================================================

Example:
    >>> sorted(FIGURES)[:3]
    ['attribution_agreement', 'cot_patching', 'depth_scaling']
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from studies.figures import (
    chain_probes,
    chain_ranks,
    depth_scaling,
    exit_gate,
    intermediate_vs_final,
    latent_dynamics,
    numeric_prefix,
    rank_trajectory,
    reference_overlay,
    sampler_frontier,
    wavefront,
)
from studies.figures.base import Figure, FigureSpec, Headline, Tables
from studies.figures.intermediate_vs_final import pick_block
from studies.figures.layout import Layout
from studies.figures.patching import PATCHING_FIGURES
from studies.figures.style import LENS_COLORS, save_html, save_png, save_table

__all__ = [
    "CHAIN_FIGURES",
    "FIGURES",
    "LENS_COLORS",
    "Figure",
    "FigureSpec",
    "Headline",
    "Layout",
    "pick_block",
    "render_all",
    "render_figure",
]

log = logging.getLogger(__name__)

#: Every study figure by name, in the order they are drawn.
FIGURES: dict[str, FigureSpec] = {
    spec.name: spec
    for spec in (
        rank_trajectory.FIGURE,
        numeric_prefix.FIGURE,
        intermediate_vs_final.FIGURE,
        depth_scaling.FIGURE,
        latent_dynamics.FIGURE,
        reference_overlay.FIGURE,
        exit_gate.FIGURE,
        *PATCHING_FIGURES.values(),
        sampler_frontier.FIGURE,
        wavefront.FIGURE,
    )
}


#: The chains study's own figures (``looplens study chains``).
CHAIN_FIGURES: dict[str, FigureSpec] = {spec.name: spec for spec in (chain_ranks.FIGURE, chain_probes.FIGURE)}


def render_figure(figure: Figure, tables: Tables, layout: Layout, out_dir: Path, title: str) -> dict | None:
    """Table → Parquet, PNG, HTML for one figure; ``None`` if its table came out empty."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tab = figure.table(tables, layout)
    if tab is None or tab.empty:
        return None
    paths = {
        "png": out_dir / f"{figure.name}.png",
        "html": out_dir / f"{figure.name}.html",
        "table": out_dir / f"{figure.name}.parquet",
    }
    save_table(tab, paths["table"])
    mpl_fig, plotly_fig = figure.draw(tab, layout, title)
    save_png(mpl_fig, paths["png"])
    save_html(plotly_fig, paths["html"])
    return {**{k: str(v) for k, v in paths.items()}, "headline": figure.headline(tab, layout)}


def render_all(
    tables: Tables,
    layout: Layout,
    out_dir: Path,
    title: str,
    reference: bool = True,
    only: Iterable[str] | None = None,
    strict: bool = False,
) -> dict[str, dict]:
    """Draw every figure whose inputs are present into ``out_dir`` (``NAME.png/.html/.parquet``).

    Returns ``{name: {"png", "html", "table": path, "headline": {...}}}``. ``reference`` adds the
    Huginn-3.5B overlay; ``only`` restricts to some figure names. A figure that fails to draw is
    reported with a warning and left out, unless ``strict`` (then the error propagates); a figure that
    fails to be written (``OSError``: a full disk, no permission) always propagates.
    """
    tables = {k: v for k, v in tables.items() if isinstance(v, pd.DataFrame)}
    wanted = set(only) if only is not None else None
    results: dict[str, dict] = {}
    for name, figure in FIGURES.items():
        if (wanted is not None and name not in wanted) or (name == "reference_overlay" and not reference):
            continue
        if not figure.available(tables):
            log.info("figure %s skipped: needs %s", name, figure.requires)
            continue
        try:
            info = render_figure(figure, tables, layout, Path(out_dir), title)
        except Exception as exc:
            if strict or isinstance(exc, OSError):
                raise
            warnings.warn(f"figure {name} failed: {type(exc).__name__}: {exc}", stacklevel=2)
            continue
        if info is not None:
            results[name] = info
    return results
