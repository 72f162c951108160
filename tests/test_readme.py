"""Every code block of the README runs, as written, so the documentation cannot drift from the code.

Every block runs in a scratch directory that links the checkout's ``examples/`` and ``tests/`` (so
relative paths in the examples resolve and nothing is written into the checkout). Python blocks run
in one namespace per block; bash blocks with the virtual environment's ``bin`` first on ``PATH`` and
the checkout's path in place of ``.`` in ``pip install -e .`` (the same install, wherever it runs). The README's test
command is the one block not run here: ``.ci/run`` runs it verbatim (asserted below), and running the
suite inside the suite would recurse. A block that starts the explorer is run until the server answers.
"""

from __future__ import annotations

import linecache
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r"```(python|bash)\n(.*?)```", README, re.S)]
TEST_COMMAND = 'pip install torch==2.13.0 -e ".[test]" && python -m pytest'


def _blocks(kind: str) -> list[tuple[int, str]]:
    return [(i, code) for i, (k, code) in enumerate(BLOCKS) if k == kind and code.strip() != TEST_COMMAND]


def test_the_readme_test_command_is_what_ci_runs():
    assert TEST_COMMAND in README
    assert TEST_COMMAND in (REPO / ".ci" / "run").read_text().splitlines()


@pytest.mark.parametrize(
    ("index", "code"), _blocks("python"), ids=lambda v: str(v) if isinstance(v, int) else ""
)
def test_python_block_runs(index, code, scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    name = f"README.md python block {index}"
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)  # nnsight reads a trace's source
    exec(compile(code, name, "exec"), {"__name__": "__readme__"})


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    for name in ("examples", "tests"):
        (tmp_path / name).symlink_to(REPO / name, target_is_directory=True)
    return tmp_path


def _shell_env() -> dict[str, str]:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(
        REPO
    )  # this checkout's code, whatever the environment's editable install points at
    return env


def _in_scratch(code: str) -> str:
    """``pip install -e .`` / ``-e ".[extra]"`` from the checkout, wherever the block runs."""
    return re.sub(r'-e "?\.(\[[^\]]*\])?"?', lambda m: f'-e "{REPO}{m.group(1) or ""}"', code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("index", "code"), _blocks("bash"), ids=lambda v: str(v) if isinstance(v, int) else ""
)
def test_bash_block_runs(index, code, scratch):
    tmp_path = scratch
    script = _in_scratch(code)
    if "looplens explore" in code:
        port = _free_port()
        (tmp_path / "runs").mkdir()
        script = script.replace("looplens explore", f"looplens explore --port {port}")
        proc = subprocess.Popen(
            ["bash", "-ec", script],
            cwd=tmp_path,
            env=_shell_env(),
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.time() + 240
            while time.time() < deadline:
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                        assert r.status == 200
                        return
                except OSError:
                    time.sleep(1)
            pytest.fail("the explorer did not answer within 240 s")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    run = subprocess.run(
        ["bash", "-ec", script], cwd=tmp_path, env=_shell_env(), capture_output=True, text=True, timeout=1200
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
