"""Lenses reproduce the model where they must, agree with brute force, and fail clearly on bad input."""

import pytest
import torch

import lens
from probes.api import probe_prompts
from probes.lenses import CodaLens, LogitLens, make_lens
from probes.recorder import LensRecorder
from probes.statistics import token_statistics
from tests.conftest import small_config


def test_coda_lens_at_latent_and_logit_lens_at_final_reproduce_the_model(small_model):
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        out = small_model(ids, 5, "zeros", return_trace=["latent", "final"])
        coda = CodaLens(small_model)(out.trace["latent"][0], "latent")
        logit = LogitLens(small_model)(out.trace["final"][0], "final")
    torch.testing.assert_close(coda, out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logit, out.logits, rtol=0, atol=0)


def test_recorded_ranks_match_brute_force():
    torch.manual_seed(3)
    model = lens.RecurrentDepthLM(small_config()).eval()
    ids = torch.randint(0, 97, (3, 6))
    targets = {"a": [0, 15, 40], "b": [12, 3, 96]}
    res = probe_prompts(
        model,
        ids.tolist(),
        targets,
        num_steps=3,
        init_state="zeros",
        topk=5,
        dynamics=False,
        predicted_target=None,
    )
    with torch.no_grad():
        trace = model(ids, 3, "zeros", return_trace=True).trace
    lenses = {"logit": LogitLens(model), "coda": CodaLens(model)}
    checked = 0
    for row in res.ranks.itertuples():
        h = trace[row.site][row.iteration - 1 if row.site.startswith("core") else 0]
        with torch.no_grad():
            logits = lenses[row.lens](h, row.site, row.iteration)[row.prompt_id, -1]
        target = targets[row.target_kind][row.prompt_id]
        assert row.rank == 1 + int((logits > logits[target]).sum())
        assert abs(row.logprob - float(logits.log_softmax(-1)[target])) < 1e-4
        p = logits.softmax(-1)
        assert abs(row.entropy - float(-(p * p.log()).sum())) < 1e-4
        checked += 1
    assert checked == len(res.ranks) > 0
    assert (res.ranks["rank"] >= 1).all()
    top = res.topk[(res.topk.site == "core.1") & (res.topk.iteration == 2) & (res.topk.lens == "logit")]
    with torch.no_grad():
        logits = LogitLens(model)(trace["core.1"][1], "core.1")[:, -1]
    for pid, group in top.groupby("prompt_id"):
        expected = torch.sort(logits[pid], descending=True).values[:5]
        got = logits[pid][torch.tensor(group.sort_values("k").token_id.values)]
        torch.testing.assert_close(got, expected)


def test_predicted_target_is_rank_one_at_the_output(small_model):
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    res = probe_prompts(small_model, prompts, num_steps=3, init_state="zeros", lenses=["logit", "coda"])
    pred = res.ranks[res.ranks.target_kind == "predicted"]
    assert (pred.query("site == 'final' and lens == 'logit'")["rank"] == 1).all()
    assert (pred.query("site == 'latent' and lens == 'coda'")["rank"] == 1).all()
    assert pred.query("site == 'final'")["token_id"].tolist() == res.predictions


def test_statistics_match_sort_reference_with_exact_ties(small_model):
    """Integer-valued states and unembedding: every logit is exact, so ties are real ties everywhere."""
    g = torch.Generator().manual_seed(0)
    model = small_model
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randint(-2, 3, (97, 64), generator=g).float())
        model.lm_head.weight[10:20] = model.lm_head.weight[0]  # duplicate rows tie exactly
    hidden = torch.randint(-2, 3, (33, 64), generator=g).float()
    targets = torch.stack([torch.randint(0, 97, (33,), generator=g), torch.full((33,), 15)], 1)
    stats = token_statistics(model, hidden, normalize=False, targets=targets, topk=7)
    logits = (hidden @ model.lm_head.weight.T).detach()
    logp = logits.log_softmax(-1)
    for i in range(33):
        for k in range(2):
            t = targets[i, k]
            assert int(stats.target_ranks[i, k]) == 1 + int((logits[i] > logits[i, t]).sum())
            assert abs(float(stats.target_logprobs[i, k]) - float(logp[i, t])) < 1e-4
        expected = torch.sort(logits[i], descending=True).values[:7]
        torch.testing.assert_close(logits[i, stats.topk_ids[i]], expected)
    torch.testing.assert_close(stats.entropy, -(logp.exp() * logp).sum(-1), rtol=1e-4, atol=1e-4)


def test_batched_coda_lens_equals_one_state_at_a_time(small_model):
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        trace = small_model(ids, 6, "zeros", return_trace=["core.0"]).trace
        coda = CodaLens(small_model)
        one_by_one = torch.stack([coda.transform_hidden(trace["core.0"][t], "core.0") for t in range(6)])
        batched = coda.transform_hidden(trace["core.0"].flatten(0, 1), "core.0").unflatten(0, (6, 2))
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)


def test_streamed_records_equal_replay_of_a_cached_trace(small_model):
    ids = torch.randint(0, 97, (2, 5))
    lenses = [LogitLens(small_model), CodaLens(small_model)]
    targets = {"final": [3, 4]}
    with torch.no_grad():
        live = LensRecorder(small_model, lenses, targets=targets, coda_batch=3)
        out = small_model(ids, 4, "zeros", consumers=[live], return_trace=True)
        replayed = LensRecorder(small_model, lenses, targets=targets).replay(out.trace, 4)
    a, _ = live.finalize(out.logits)
    b, _ = replayed.finalize(out.logits)
    key = ["lens", "site", "iteration", "prompt_index", "target_kind"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    assert (a["rank"].values == b["rank"].values).all()
    assert abs(a["logprob"].values - b["logprob"].values).max() < 1e-5


def test_bad_probe_inputs(small_model):
    prompts = [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        probe_prompts(small_model, prompts, {"final": [1, 97]}, num_steps=2)
    with pytest.raises(ValueError, match="does not exist"):
        probe_prompts(small_model, prompts, {"final": [1, 2]}, num_steps=2, sites=["core.7"])
    with pytest.raises(ValueError, match="unknown site"):
        probe_prompts(small_model, prompts, {"final": [1, 2]}, num_steps=2, sites=["middle"])
    with pytest.raises(IndexError, match="out of range"):
        probe_prompts(small_model, prompts, {"final": [1, 2]}, num_steps=2, positions=[5])
    with pytest.raises(ValueError, match="unknown lens"):
        make_lens(small_model, "x-ray")
    with pytest.raises(ValueError, match="target ids for"):
        probe_prompts(small_model, prompts, {"final": [1]}, num_steps=2)
    with pytest.raises(ValueError, match="before the coda"):
        CodaLens(small_model).transform_hidden(torch.zeros(1, 3, 64), "final")


def test_statistics_are_measurements_not_graphs(small_model):
    h = torch.randn(4, 64, requires_grad=True)
    stats = token_statistics(small_model, h, targets=torch.tensor([[1], [2], [3], [4]]), topk=3)
    assert stats.target_ranks.shape == (4, 1) and not stats.entropy.requires_grad
