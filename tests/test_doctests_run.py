"""Docstring examples are documentation that CI runs (#11.2): none may opt out of running."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lens", "probes", "kernels", "studies", "app", "looplens")


def test_no_docstring_example_is_skipped():
    marker = "doctest: +" + "SKIP"  # split so this file does not match itself
    skipped = [
        f"{path.relative_to(REPO)}:{number}"
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if marker in line
    ]
    assert not skipped, f"docstring examples that do not run: {skipped}"


def test_every_package_is_collected_for_doctests(pytestconfig):
    assert "--doctest-modules" in pytestconfig.getini("addopts")
    assert set(PACKAGES) <= set(pytestconfig.getini("testpaths"))
