"""The command line: version, help on every option, one-line errors for bad input, bugs keep tracebacks."""

from __future__ import annotations

import importlib.metadata

import typer
from typer.testing import CliRunner

from looplens.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"looplens {importlib.metadata.version('looplens')}"


def test_every_command_and_option_has_help():
    group = typer.main.get_command(app)
    commands = group.commands  # type: ignore[attr-defined]
    assert {"study", "train", "eval", "tuned-lens", "explore", "info"} <= set(commands)
    for name, command in commands.items():
        assert command.help, f"command {name} has no help text"
        for param in command.params:
            assert getattr(param, "help", None), f"{name} {param.name} has no help text"


def test_explore_on_a_missing_folder_says_so(tmp_path):
    result = runner.invoke(app, ["explore", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output


def test_port_out_of_range_is_refused(tmp_path):
    result = runner.invoke(app, ["explore", str(tmp_path), "--port", "99999"])
    assert result.exit_code == 2 and "65535" in result.output


def test_cuda_without_cuda_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():  # pragma: no cover - CI has no GPU
        return
    result = runner.invoke(app, ["study", "arithmetic", "--device", "cuda", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no CUDA device" in result.output
    assert not any(tmp_path.iterdir())  # refused before any work


def test_bugs_keep_their_traceback(monkeypatch):
    """A TypeError inside a command is a bug, not a user error: it is not swallowed into one line."""
    import lens

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(lens, "load_model", broken)
    result = runner.invoke(app, ["info"])
    assert isinstance(result.exception, TypeError)


def test_an_out_folder_that_cannot_be_written_is_one_line(tmp_path):
    """Issue #11.18 (read-only ``--out``): an operating-system error on a user's path is one line, not a
    traceback. (CI runs as root, which ignores permission bits, so a path through a file stands in.)"""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = runner.invoke(app, ["study", "arithmetic", "--n", "2", "--out", str(blocker / "runs")])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output


def test_a_bad_dtype_is_one_line():
    result = runner.invoke(app, ["study", "arithmetic", "--dtype", "int8"])
    assert result.exit_code == 2 and "not a floating dtype" in result.output


def test_explore_starts_streamlit_without_watcher_or_forced_gc(tmp_path, monkeypatch):
    """The server options that keep reruns cheap: no source watcher (a scan of sys.modules per session)
    and no ``gc.collect(2)`` after every script run (0.23 CPU s over the explorer's heap)."""
    import streamlit.web.cli

    from looplens import cli

    seen: dict = {}
    monkeypatch.setattr(cli, "_warm_explorer", lambda model: None)
    monkeypatch.setattr(streamlit.web.cli, "main", lambda args, **kw: seen.setdefault("args", args))
    result = runner.invoke(app, ["explore", str(tmp_path), "--port", "8765"])
    assert result.exit_code == 0, result.output
    args = seen["args"]
    assert args[0] == "run" and args[1].endswith("main.py")
    for option in ("--server.fileWatcherType=none", "--runner.postScriptGC=false", "--server.port=8765"):
        assert option in args
    assert args[args.index("--runs") + 1] == str(tmp_path)
