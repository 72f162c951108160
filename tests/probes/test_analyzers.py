"""Tuned Lens training, latent dynamics and linear probes on small models and synthetic data."""

import numpy as np
import pytest
import torch

import lens
from probes.dynamics import DynamicsRecorder, classify_trajectory
from probes.lenses import TunedLens
from probes.lenses.tuned_training import train_and_compare
from probes.linear import collect_at_positions, collect_for_probe, linear_probe
from tests.conftest import small_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(7)
    return lens.RecurrentDepthLM(small_config()).eval()


def test_tuned_lens_beats_logit_lens_on_held_out_kl(model, tmp_path):
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 97, (48, 12), generator=g).tolist()
    lenses, table = train_and_compare(model, prompts, num_steps=3, epochs=25, lr=3e-3, progress=False)
    for mode in ("shared", "per-iteration"):
        better = (table[f"kl_tuned_{mode}"] < table["kl_logit"]).mean()
        assert better > 0.5, table
    lenses["shared"].save(tmp_path / "tl")
    again = TunedLens.load(tmp_path / "tl", model)
    h = torch.randn(1, 4, 64)
    torch.testing.assert_close(
        again.transform_hidden(h, "core.1", 2), lenses["shared"].transform_hidden(h, "core.1", 2)
    )
    untrained = TunedLens(model)
    assert torch.equal(untrained.transform_hidden(h, "core.0", 1), h)  # identity at initialisation
    with pytest.raises(ValueError, match="no translator"):
        untrained.transform_hidden(h, "latent")


def test_trajectory_classification():
    d = 16
    rng = np.random.default_rng(0)
    point = rng.normal(size=d)
    fixed = np.stack([point + 0.5**t * rng.normal(size=d) for t in range(30)])
    a, b = rng.normal(size=d), rng.normal(size=d)
    cycle = np.stack([a if t % 2 else b for t in range(30)])
    drift = np.stack([point + 0.3 * t * rng.normal(size=d) for t in range(30)])
    assert classify_trajectory(fixed) == "fixed-point"
    assert classify_trajectory(cycle) == "cycle-2"
    assert classify_trajectory(drift) == "drift"


def test_dynamics_recorder_rows(model):
    rec = DynamicsRecorder(model, positions="last")
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 5)), 6, "zeros", consumers=[rec])
    dyn, verdicts = rec.finalize()
    assert len(dyn) == 6 * 2 and len(verdicts) == 2
    assert dyn.query("iteration == 1")["step_norm"].isna().all()
    assert np.allclose(dyn.query("iteration == 6")["cos_to_last"], 1.0, atol=1e-5)
    assert (dyn.query("iteration > 1")["step_norm"] >= 0).all()
    with pytest.raises(ValueError, match="recurrent sites"):
        DynamicsRecorder(model, sites=["coda.0"])


def test_linear_probe_finds_linearly_encoded_labels(model):
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 97, (120, 6), generator=g)
    labels = (prompts[:, -1] % 2).tolist()  # parity of the last token id: readable from its embedding
    feats = collect_for_probe(model, prompts.tolist(), 2, sites=["prelude.0", "core.1"])
    table = linear_probe(feats, labels)
    assert set(table.site) == {"prelude.0", "core.1"}
    assert table.query("site == 'prelude.0'")["test_accuracy"].iloc[0] > 0.6
    rng = np.random.default_rng(0)
    noise = {("x", 1): rng.normal(size=(200, 8))}
    chance = linear_probe(noise, rng.integers(0, 2, 200).tolist())
    assert chance["test_accuracy"].iloc[0] < 0.7
    with pytest.raises(ValueError, match="two distinct labels"):
        linear_probe(noise, [1] * 200)


def test_collect_at_positions_reads_each_prompt_at_its_own_positions(model):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 7, 5, 4)]
    where = {"second": [1, 1, 1, 1], "from_end": [-1, -3, -2, -4]}
    feats = collect_at_positions(model, prompts, where, 2, sites=["core.1"], batch_size=3, init_state="zeros")
    for i, prompt in enumerate(prompts):
        trace = model(torch.tensor([prompt]), 2, "zeros", return_trace=["core.1"]).trace
        for name, positions in where.items():
            for t in (1, 2):
                expected = trace["core.1"][t - 1, 0, positions[i]].numpy()
                assert np.allclose(feats[name][("core.1", t)][i], expected, atol=1e-5), (name, i, t)
    with pytest.raises(ValueError, match="has no position"):
        collect_at_positions(model, prompts, {"x": [5, 0, 0, 0]}, 2)


def test_nan_states_or_logits_are_an_error_never_rank_one():
    """Issue #11.10: NaN compares false, so a NaN logit would read as rank 1; the statistics refuse it."""
    import lens
    from probes.statistics import token_statistics

    torch.manual_seed(0)
    model = lens.RecurrentDepthLM(small_config()).eval()
    h = torch.randn(5, 64)
    targets = torch.zeros(5, 1, dtype=torch.long)
    bad_h = h.clone()
    bad_h[2, 3] = float("nan")
    with pytest.raises(lens.InputError, match="1 of 5 hidden states"):
        token_statistics(model, bad_h, targets=targets)
    with torch.no_grad():
        model.lm_head.weight[7, 0] = float("nan")
    with pytest.raises(lens.InputError, match="NaN/Inf logits"):
        token_statistics(model, h, targets=targets)
