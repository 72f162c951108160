"""Lenses and recorded statistics per family: which lenses apply, what they reproduce, exit-gate records."""

import pytest
import torch
from safetensors.torch import load_file

import lens
from probes.api import probe_prompts
from probes.exit_gate import ExitGateRecorder
from probes.lenses import CodaLens, LensNotApplicableError, LogitLens, applicable_lenses, make_lens
from probes.records import to_table
from tests.conftest import data_path


@pytest.fixture(scope="module")
def ouro():
    fixture = data_path("fixtures", "ouro-tiny")
    return lens.load_model(fixture / "checkpoint"), load_file(str(fixture / "reference.safetensors"))


@pytest.fixture(scope="module")
def retrofit():
    return lens.load_model(data_path("fixtures", "retrofit-tiny", "checkpoint"))


def test_logit_lens_is_ouros_own_per_step_readout(ouro):
    model, ref = ouro
    ids = ref["input_ids_1"]
    with torch.no_grad():
        trace = model(ids, return_trace=["core.1", "latent"]).trace
        for t in range(4):
            expected = ref["step_logits_1"][t]
            scale = expected.abs().max().item()
            for site in ("core.1", "latent"):
                got = LogitLens(model)(trace[site][t], site, t + 1)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)


def test_which_lenses_apply(ouro, retrofit, small_model):
    model, _ = ouro
    assert applicable_lenses(model) == ["logit"] and applicable_lenses(retrofit) == ["logit", "coda"]
    assert applicable_lenses(small_model) == ["logit", "coda"]
    with pytest.raises(
        LensNotApplicableError, match="Coda Lens does not apply to ouro.*no coda.*logit, tuned"
    ):
        make_lens(model, "coda")
    with pytest.raises(LensNotApplicableError, match="no exit gate"):
        ExitGateRecorder(retrofit)


def test_retrofit_coda_lens_at_latent_reproduces_the_model(retrofit):
    ids = torch.randint(1, 512, (2, 7))
    with torch.no_grad():
        out = retrofit(ids, 3, "zeros", return_trace=["latent", "core.1", "final"])
        coda = CodaLens(retrofit)(out.trace["latent"][0], "latent")
        # the coda receives the raw core state: the last core block's output decodes the same way
        from_core = CodaLens(retrofit)(out.trace["core.1"][-1], "core.1", 3)
        logit = LogitLens(retrofit)(out.trace["final"][0], "final")
    torch.testing.assert_close(coda, out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_core, out.logits, rtol=0, atol=0)
    torch.testing.assert_close(logit, out.logits, rtol=0, atol=0)


def test_ouro_probe_records_ranks_and_exit_gate(ouro):
    model, ref = ouro
    prompts = [ref["input_ids_0"][0].tolist(), ref["input_ids_1"][0].tolist()]
    res = probe_prompts(model, prompts, num_steps=4, topk=3)
    assert set(res.ranks["lens"]) == {"logit"}
    pred = res.ranks[res.ranks.target_kind == "predicted"]
    assert (pred.query("site == 'final'")["rank"] == 1).all()
    last = pred[(pred.site == "latent") & (pred.iteration == 4)]
    assert (last["rank"] == 1).all()  # the readout after the last iteration is the model's output
    assert sorted(pred.query("site == 'latent'")["iteration"].unique()) == [1, 2, 3, 4]
    gate = res.exit_gate
    assert len(gate) == 2 * 4 and set(gate["prompt_id"]) == {0, 1}
    table = to_table("exit_gate", gate.assign(run="r"))
    assert table.num_rows == 8
    for pid, i in ((0, 0), (1, 1)):
        rows = gate[gate.prompt_id == pid].sort_values("iteration")
        torch.testing.assert_close(
            torch.tensor(rows["gate_lambda"].to_numpy()), ref[f"gate_lambda_{i}"][0, -1], rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            torch.tensor(rows["exit_prob"].to_numpy()), ref[f"exit_pdf_{i}"][0, -1], rtol=1e-5, atol=1e-6
        )
        assert abs(rows["exit_cdf"].iloc[-1] - 1) < 1e-6
    with pytest.raises(ValueError, match="gate_lambda"):
        to_table("exit_gate", gate.assign(run="r", gate_lambda=1.5))
