"""The packages stack in one direction: kernels < lens < probes < studies, app < looplens (the CLI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ABOVE = {
    "kernels": {"lens", "probes", "studies", "app", "looplens"},
    "lens": {"probes", "studies", "app", "looplens"},
    "probes": {"studies", "app", "looplens"},
    "studies": {"app", "looplens"},
}


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_importing_a_package_never_imports_a_package_above_it(package):
    code = (
        f"import sys, {package}\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules})\n"
        "print(' '.join(loaded))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = set(run.stdout.split())
    assert not (loaded & ABOVE[package]), f"importing {package} imported {sorted(loaded & ABOVE[package])}"


def _imported_packages(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(ABOVE))
def test_no_module_imports_upwards_even_lazily(package):
    """The subprocess test sees module-level imports; this one also sees imports inside functions."""
    offenders = {
        str(path.relative_to(REPO)): sorted(_imported_packages(path) & ABOVE[package])
        for path in (REPO / package).rglob("*.py")
        if _imported_packages(path) & ABOVE[package]
    }
    assert not offenders, offenders
