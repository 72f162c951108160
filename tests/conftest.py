"""Shared fixtures: small random models, paths to the test data copied into the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"  # copied in with a note of origin (tests/data/ORIGIN.md)
HUGINN_0125 = REPO / "lens" / "configs" / "huginn-0125"  # Huginn-3.5B config + tokenizer, no weights
REFERENCE = REPO / "studies" / "reference" / "huginn-latent-cot"


def data_path(*parts: str) -> Path:
    """A path under ``tests/data``; missing data is an error, never a skip."""
    path = DATA.joinpath(*parts)
    assert path.exists(), f"test data missing from the repository: {path}"
    return path


def small_config(**overrides):
    import lens

    kwargs = dict(
        n_embd=64,
        n_heads=4,
        vocab_size=97,
        block_size=64,
        intermediate_size=96,
        n_layers_in_prelude=1,
        n_layers_in_recurrent_block=2,
        n_layers_in_coda=1,
        mean_recurrence=4,
    )
    kwargs.update(overrides)
    return lens.RecurrentDepthConfig(**kwargs)


def save_arith_model(directory: Path, **overrides) -> Path:
    """A small random model with the tiny-arith tokenizer, saved where ``lens.load_model`` and the CLI read it."""
    import lens
    from studies.tiny_arith.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = small_config(
        vocab_size=tok.vocab_size,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **{"block_size": 128, **overrides},
    )
    return lens.save_model(lens.RecurrentDepthLM(cfg, tokenizer=tok).eval(), directory)


@pytest.fixture
def small_model():
    import lens

    torch.manual_seed(0)
    return lens.RecurrentDepthLM(small_config()).eval()
