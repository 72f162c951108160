"""The one batch driver and positions relative to each prompt's own tokens (never its padding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probes import probe_prompts
from probes.batching import forward_batches, select_positions
from probes.linear import collect_for_probe

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]  # different lengths: the batch is padded
KEY = ["prompt_id", "position", "site", "iteration", "lens", "target_kind"]


def _probe(model, prompts, positions, prompt_ids=None):
    return probe_prompts(
        model,
        prompts,
        {"final": [3] * len(prompts)},
        num_steps=3,
        positions=positions,
        init_state="zeros",
        batch_size=len(prompts),
        prompt_ids=prompt_ids,
    )


def _alone(model, positions):
    parts = [_probe(model, [p], positions, prompt_ids=[i]).ranks for i, p in enumerate(PROMPTS)]
    import pandas as pd

    return pd.concat(parts).sort_values(KEY).reset_index(drop=True)


@pytest.mark.parametrize("positions", [[0], [1, -1], "all", "last"])
def test_positions_count_within_each_prompt(small_model, positions):
    batched = _probe(small_model, PROMPTS, positions).ranks.sort_values(KEY).reset_index(drop=True)
    alone = _alone(small_model, positions)
    assert len(batched) == len(alone)
    assert (batched[KEY].to_numpy() == alone[KEY].to_numpy()).all()
    assert (batched["token_id"].to_numpy() == alone["token_id"].to_numpy()).all()  # same own prediction
    np.testing.assert_allclose(batched["logprob"], alone["logprob"], atol=1e-4)
    got = batched.groupby("prompt_id")["position"].agg(lambda s: sorted(set(s)))
    if positions == "all":
        assert [got[i] for i in range(3)] == [list(range(len(p))) for p in PROMPTS]
    elif positions == "last":
        assert all(got[i] == [-1] for i in range(3))
    elif positions == [0]:
        assert all(got[i] == [0] for i in range(3))
    else:
        assert [got[i] for i in range(3)] == [sorted({1, len(p) - 1}) for p in PROMPTS]  # once each


def test_a_position_a_prompt_lacks_is_refused(small_model):
    with pytest.raises(IndexError, match="out of range for prompt 1 of the batch, which has 2 tokens"):
        _probe(small_model, PROMPTS, [3])
    with pytest.raises(IndexError, match="prompt 1"):
        _probe(small_model, PROMPTS, [-3])
    with pytest.raises(ValueError, match="selects no token"):
        _probe(small_model, PROMPTS, [])


def test_select_positions_never_points_into_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    sel = select_positions([0, -1], mask, 2, 4)
    assert sel.index.tolist() == [[2, 3], [0, 3]] and sel.own.tolist() == [[0, 1], [0, 3]]
    every = select_positions("all", mask, 2, 4)
    assert every.valid.tolist() == [[False, False, True, True], [True] * 4]
    assert every.own[0, 2:].tolist() == [0, 1]


@pytest.mark.parametrize("position", [0, -1])
def test_linear_probe_features_count_within_each_prompt(small_model, position):
    def collect(prompts):
        return collect_for_probe(
            small_model, prompts, 2, ["core.1"], len(prompts), position=position, init_state="zeros"
        )

    batched = collect(PROMPTS)
    alone = [collect([p]) for p in PROMPTS]
    for key, rows in batched.items():
        np.testing.assert_allclose(rows, np.concatenate([a[key] for a in alone]), atol=1e-4)


def test_forward_batches_seeds_once_and_reports_batches(small_model):
    seen = []
    for batch, out, consumers in forward_batches(
        small_model, PROMPTS, lambda b: [], num_steps=2, batch_size=2, seed=3
    ):
        seen.append((batch.start, batch.lengths, batch.padded, tuple(out.logits.shape), consumers))
    assert seen == [(0, [6, 2], True, (2, 1, 97), []), (2, [4], False, (1, 1, 97), [])]
    with pytest.raises(ValueError, match="batch_size"):
        list(forward_batches(small_model, PROMPTS, batch_size=0))
