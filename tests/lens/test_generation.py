"""Generation: cache equals recomputation, sampling filters, adaptive depth, warm start."""

import pytest
import torch

import lens
from lens.exit_criteria import ExitCriterion
from lens.generation import sample_next


def test_cached_generation_equals_uncached(small_model):
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10]]
    cached = small_model.generate(prompts, 8, 4, init_state="zeros")
    plain = small_model.generate(prompts, 8, 4, init_state="zeros", use_cache=False)
    assert cached.tokens == plain.tokens
    assert cached.steps_used == [[4] * 8, [4] * 8]


@pytest.mark.parametrize(
    "criterion", ["kl", "minp-kl", "latent-diff", "entropy-diff", "argmax-stability", "cosine"]
)
def test_adaptive_depth_reports_steps_and_matches_recompute(small_model, criterion):
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10]]
    thresholds = {"latent-diff": 0.2, "cosine": 0.01, "argmax-stability": 2}
    kwargs = dict(init_state="zeros", exit_criterion=criterion, exit_threshold=thresholds.get(criterion))
    res = small_model.generate(prompts, 5, 12, **kwargs)
    assert all(len(s) == len(t) for s, t in zip(res.steps_used, res.tokens, strict=True))
    assert all(1 <= n <= 12 for row in res.steps_used for n in row)
    if criterion in ("kl", "latent-diff"):
        assert any(n < 12 for row in res.steps_used for n in row)


def test_exit_criterion_validation():
    with pytest.raises(ValueError, match="unknown exit criterion"):
        ExitCriterion("vibes")


def test_sampling_filters():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    assert sample_next(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, True, top_k=2, generator=g)) for _ in range(200)}
    assert draws <= {1, 2} and len(draws) == 2
    draws = {int(sample_next(logits, True, top_p=0.5, generator=g)) for _ in range(50)}
    assert draws == {1}
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, True, temperature=0)


def test_warm_start_and_budget(small_model):
    res = small_model.generate([[1, 2, 3]], 6, 4, init_state="zeros", warm_start=True)
    assert len(res.tokens[0]) == 6
    with pytest.raises(ValueError, match="warm_start"):
        small_model.generate([[1, 2, 3]], 2, 4, warm_start=True, use_cache=False)
    with pytest.raises(ValueError, match="text prompts"):
        small_model.generate("hello", 2, 2)


def test_stop_token_ends_sequence(small_model):
    first = small_model.generate([[1, 2, 3]], 1, 3, init_state="zeros").tokens[0][0]
    res = small_model.generate([[1, 2, 3]], 10, 3, init_state="zeros", stop_token_ids=[first])
    assert res.tokens == [[first]]
    assert isinstance(lens.RecurrentDepthLM, type)


def test_texts_strip_special_tokens_and_ids_keep_them(tmp_path):
    """Issue #11.4: the end-of-text token stays in ``tokens`` but never shows in ``texts``."""
    from tests.conftest import save_arith_model

    model = lens.load_model(save_arith_model(tmp_path / "m"))
    eos = model.config.eos_token_id
    prompt = model.tokenizer.encode("Question: What is 2 plus 3?\nAnswer:")
    digit = model.tokenizer.encode(" 7")[0]
    head = model.head

    def head_prefers(x):  # " 7" first, then end-of-text
        out = head(x)
        out[..., digit] = 1e4 if not preferred else -1e4
        out[..., eos] = 1e4 if preferred else -1e4
        preferred.append(True)
        return out

    preferred: list[bool] = []
    model.head = head_prefers
    res = model.generate([prompt], 4, 2, init_state="zeros")
    assert res.tokens == [[digit, eos]] and res.stopped == ["eos"]
    assert res.texts == [" 7"]


def test_generation_at_the_context_limit_keeps_what_was_generated(small_model):
    """Issue #11.12: reaching the context returns the tokens so far, ``stopped == "context"``."""
    block = small_model.config.block_size
    prompt = list(range(1, block - 2))  # room for 3 more positions: 4 tokens can be generated
    res = small_model.generate([prompt], 10, 2, init_state="zeros")
    assert res.stopped == ["context"]
    assert len(res.tokens[0]) == block - len(prompt) + 1
    fresh = small_model.generate([prompt], 2, 2, init_state="zeros")
    assert res.tokens[0][:2] == fresh.tokens[0] and fresh.stopped == ["max_new_tokens"]
