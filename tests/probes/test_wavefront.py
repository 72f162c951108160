"""Tracing the diffusion sampler: every step's window goes to the stream with its wavefront, and lenses
rank the finally generated token at every step (issue #13.2)."""

from __future__ import annotations

import pytest

import lens
from lens.stream import Subscription
from probes.wavefront import WavefrontRecorder
from tests.conftest import data_path

OPTIONS = dict(
    num_steps=8, inner_recurrence=4, init_scale=0.0, state_noise_mixing=0.0, seed=0, stop_token_ids=[]
)


@pytest.fixture(scope="module")
def model():
    return lens.load_model(data_path("fixtures", "huginn-tiny", "checkpoint"))


def test_states_carry_the_wavefront(model):
    seen = []
    model.generate(
        [[5, 17, 300, 42], [101, 55]],
        6,
        sampler="diffusion",
        consumers=[Subscription(seen.append, sites=["latent"])],
        **OPTIONS,
    )
    prefill, steps = seen[0], seen[1:]
    assert (
        prefill.diffusion_step == -1 and bool(prefill.frozen[0].all()) and bool(prefill.frozen[1, :2].all())
    )
    assert prefill.wavefront.positions[1].tolist()[:2] == [0, 1] and prefill.wavefront.positions[1, 2] == -1
    assert [s.diffusion_step for s in steps] == list(range(len(steps)))
    first = steps[0].wavefront
    assert first.positions[:, 0].tolist() == [4, 2]  # each window starts at its last frozen position
    assert first.frozen[:, 0].all() and first.recurrence[:, 0].tolist() == [8, 8]
    assert steps[-1].wavefront.sequence.tolist() in ([0, 1], [0], [1])


def test_lens_ranks_of_the_final_token_at_every_step(model):
    recorder = WavefrontRecorder(model, sites=["core.1", "latent"])
    ids = [[5, 17, 300, 42, 911, 7], [101, 55, 780]]
    res = model.generate(ids, 8, sampler="diffusion", consumers=[recorder], tablets=True, **OPTIONS)
    rows = recorder.finalize(res, setting="base")
    assert set(rows["lens"]) == {"logit", "coda"} and set(rows["site"]) == {"core.1", "latent"}
    core = rows[rows["site"] == "core.1"]
    assert set(core["iteration"][core["diffusion_step"] >= 0]) == {1, 2, 3, 4}
    assert set(core["iteration"][core["diffusion_step"] == -1]) == set(range(1, 9))  # the prefill
    assert (rows["rank"] >= 1).all() and (rows["setting"] == "base").all()
    for b, prompt in enumerate(ids):
        final = prompt + res.tokens[b]
        mine = rows[rows["prompt_id"] == b]
        assert (mine["token_id"] == [final[p + 1] for p in mine["position"]]).all()
        # the Coda Lens at the step's last state, in the context of the frozen positions, is the model's own
        # readout: each window position's top-1 is its proposal (the token tablet's next entry)
        last = mine[(mine["lens"] == "coda") & (mine["site"] == "latent") & (mine["diffusion_step"] >= 0)]
        tablet = res.tablets[b].token
        last = last[last["diffusion_step"] < tablet.shape[0]]
        assert len(last) > 10
        for step, position, token, rank in last[
            ["diffusion_step", "position", "token_id", "rank"]
        ].itertuples(index=False):
            proposal = int(tablet[step, position + 1])
            assert (rank == 1) == (proposal == token), (b, step, position)


def test_the_coda_lens_in_context_equals_the_models_logits(model):
    """Independently of ranks: the recorder's coda-decoded latent gives the sampler's proposals."""
    recorder = WavefrontRecorder(model, lenses=["coda"], sites=["latent"])
    prompt = [5, 17, 300, 42, 911, 7]
    res = model.generate([prompt], 6, sampler="diffusion", consumers=[recorder], tablets=True, **OPTIONS)
    tablet = res.tablets[0].token
    checked = 0
    for entry in recorder.entries:
        step = entry.front.step
        if step < 0 or step >= tablet.shape[0]:
            continue
        logits = model.head(model.final_norm(entry.hidden[0]))
        for p, position in enumerate(entry.front.positions[0].tolist()):
            assert int(logits[p].argmax()) == int(tablet[step, position + 1]), (step, position)
            checked += 1
    assert checked > 20
