"""The standard figures of a ``looplens probe`` run, drawn from DuckDB queries (no table is loaded whole).

Of the study figures, those that mean something for any prompts apply: the rank trajectory of the
model's own next token (``rank_trajectory``) and the latent dynamics (``latent_dynamics``). Only the
rows they plot are read: each prompt's last recorded position, block sites, the ``predicted`` target.
"""

from __future__ import annotations

from typing import Any

from probes.dataset import last_position_sql
from probes.store import Run
from studies.figures import Layout, render_all

__all__ = ["PROBE_FIGURES", "render_probe_figures"]

#: Figures drawn for a probe run.
PROBE_FIGURES = ("rank_trajectory", "latent_dynamics")


def render_probe_figures(run: Run) -> dict[str, dict[str, Any]]:
    """Draw the figures that apply into ``run.figures_dir``; returns ``render_all``'s description."""
    manifest = run.manifest
    steps = int(manifest["settings"]["num_steps"])
    layout = Layout.from_manifest(manifest, steps)
    ranks = run.query(
        f"""SELECT prompt_id, position, site, iteration, block, unrolled_index, lens, target_kind, rank
            FROM ranks WHERE target_kind = 'predicted' AND unrolled_index >= 0 AND {last_position_sql("ranks")}"""
    )
    tables = {"ranks": ranks}
    if "dynamics" in run.tables():
        tables["dynamics"] = run.query(
            f"SELECT * EXCLUDE (run) FROM dynamics WHERE {last_position_sql('dynamics')}"
        )
        tables["verdicts"] = run.query(
            f"SELECT * EXCLUDE (run) FROM verdicts WHERE {last_position_sql('verdicts')}"
        )
    source = manifest["settings"].get("input", {}).get("source", "prompts")
    title = f"{manifest['model']['name']} · T={steps} · {source}"
    return render_all(
        tables, layout, run.figures_dir, title, reference=False, only=PROBE_FIGURES, strict=True
    )
