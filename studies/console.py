"""What every study prints when it ends: where its run is and how long it took (one layout for all)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from probes.store import Run


def fmt_number(value: Any) -> str:
    """Three significant digits for floats, anything else as it prints."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def print_run_footer(console: Console, run: Run, seconds: float, page: str | None = None) -> None:
    """The summary's last lines: figures, tables, the explorer command (and its page), the time taken.
    A grid that folds long paths, so it fits 80 columns."""
    footer = Table.grid(padding=(0, 2))
    footer.add_column(style="bold", no_wrap=True)
    footer.add_column(overflow="fold")
    footer.add_row("figures", f"{run.figures_dir}  (PNG + interactive HTML)")
    footer.add_row("tables", ", ".join(run.tables()))
    footer.add_row("explore", f"looplens explore {run.path.parent}" + (f"  (page: {page})" if page else ""))
    footer.add_row("time", f"{seconds:.0f} s")
    console.print(footer)
