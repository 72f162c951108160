"""Fixtures of the explorer tests: runs folders in every state, and a small random model on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studies.synthetic import corrupt_shard, write_run
from tests.conftest import save_arith_model


def write_model(directory: Path) -> Path:
    """A random recurrent-depth model (prelude 1, core 2 × 4, coda 1) with the tiny-arith tokenizer."""
    return save_arith_model(directory, block_size=256)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("model") / "tiny-random")


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    """Two complete runs: a small one (prelude 1, core 2 × 4, coda 1) and a deeper 'reference' one."""
    root = tmp_path_factory.mktemp("runs")
    write_run(root, "arith-small", n_prompts=6)
    write_run(
        root,
        "huginn-ref",
        n_prompts=8,
        prelude=2,
        core=4,
        coda=2,
        steps=8,
        vocab_size=4096,
        model_name="huginn-0125",
        seed=1,
        figures=False,
    )
    return root


@pytest.fixture(scope="session")
def ouro_model_dir(tmp_path_factory) -> Path:
    """A random Ouro model (2 looped layers, exit gate) with the tiny-arith tokenizer."""
    return save_arith_model(
        tmp_path_factory.mktemp("model") / "tiny-ouro", family="ouro", max_position_embeddings=256
    )


@pytest.fixture(scope="session")
def ouro_runs_dir(tmp_path_factory, ouro_model_dir) -> Path:
    """A real (small) arithmetic-study run of the Ouro model: no Coda Lens, exit-gate records."""
    from studies.arithmetic import run_arithmetic_study

    root = tmp_path_factory.mktemp("ouro-runs")
    run_arithmetic_study(
        model=str(ouro_model_dir), out=root, name="ouro-small", n=6, steps=3, batch_size=3, depths=(1, 3),
        depth_n=2, tuned_lens=False,
    )  # fmt: skip
    return root


@pytest.fixture(scope="session")
def sampler_runs_dir(tmp_path_factory, model_dir) -> Path:
    """A real (small) sampler-study run of the random model: sampler rows and one traced wavefront."""
    from studies.sampler import run_sampler_study

    root = tmp_path_factory.mktemp("sampler-runs")
    run_sampler_study(
        model=str(model_dir), out=root, name="sampler-small", n=2, steps=2, new_tokens=16, batch_size=2,
        thresholds=(0.1,), inner=(2,), headways=(1,), wavefront_n=1,
    )  # fmt: skip
    return root


@pytest.fixture(scope="session")
def partial_runs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("partial")
    write_run(root, "arith-partial", n_prompts=6, status="running")
    return root


@pytest.fixture(scope="session")
def corrupt_runs_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A run whose first ranks shard is truncated, and one whose manifest is not JSON."""
    root = tmp_path_factory.mktemp("corrupt")
    path = write_run(root, "arith-corrupt", n_prompts=4, figures=False)
    shard = corrupt_shard(path, "ranks")
    broken = write_run(root, "broken-manifest", n_prompts=2, figures=False)
    (broken / "manifest.json").write_text("{not json")
    return root, shard


@pytest.fixture
def empty_runs_dir(tmp_path) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    (root / "notes").mkdir()  # a folder that is not a run is ignored
    return root


def manifest_of(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())
