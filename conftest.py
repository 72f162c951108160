"""Collection rules for the doctests of the packages (``--doctest-modules``; see pyproject.toml)."""

# Streamlit scripts run their page when imported, and ``python -m looplens`` runs the command line:
# they hold no docstring examples and must not be imported by the collector.
collect_ignore = ["app/main.py", "looplens/__main__.py"]
collect_ignore_glob = ["app/views/*.py", "tests/data/*", "benchmarks/*"]
