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


def small_config(config_class=None, **overrides):
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
    return (config_class or lens.RecurrentDepthConfig)(**kwargs)


def save_arith_model(directory: Path, family: str = "huginn", **overrides) -> Path:
    """A small random model of ``family`` (huginn, retrofit, ouro) with the tiny-arith tokenizer, saved
    where ``lens.load_model`` and the CLI read it."""
    import lens
    from studies.tiny_arith.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    ids = dict(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "ouro":
        cfg = lens.OuroConfig(
            **ids,
            **{
                "hidden_size": 64,
                "intermediate_size": 96,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 128,
                "initializer_range": 0.1,
                **overrides,
            },
        )
        model = lens.OuroLM(cfg, tokenizer=tok)
    elif family == "retrofit":
        cfg = small_config(
            lens.RetrofitConfig, **ids, **{"block_size": 128, "num_key_value_heads": 2, **overrides}
        )
        model = lens.RetrofitLM(cfg, tokenizer=tok)
    else:
        cfg = small_config(**ids, **{"block_size": 128, **overrides})
        model = lens.RecurrentDepthLM(cfg, tokenizer=tok)
    return lens.save_model(model.eval(), directory)


@pytest.fixture
def small_model():
    import lens

    torch.manual_seed(0)
    return lens.RecurrentDepthLM(small_config()).eval()
