"""Shared fixtures: small random models, paths to ../shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOOPLENS_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared; the test is skipped when the shared data is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


def small_config(**overrides):
    import lens

    kwargs = dict(
        n_embd=64, n_heads=4, vocab_size=97, block_size=64, intermediate_size=96,
        n_layers_in_prelude=1, n_layers_in_recurrent_block=2, n_layers_in_coda=1, mean_recurrence=4,
    )
    kwargs.update(overrides)
    return lens.RecurrentDepthConfig(**kwargs)


def save_arith_model(directory: Path, **overrides) -> Path:
    """A small random model with the tiny-arith tokenizer, saved where ``lens.load_model`` and the CLI read it."""
    import lens
    from studies.tiny_arith.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = small_config(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       **{"block_size": 128, **overrides})
    return lens.save_model(lens.RecurrentDepthLM(cfg, tokenizer=tok).eval(), directory)


@pytest.fixture
def small_model():
    import lens

    torch.manual_seed(0)
    return lens.RecurrentDepthLM(small_config()).eval()
