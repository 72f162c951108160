"""looplens reproduces the logits that Huginn's own modeling code computes (the huginn-tiny fixture)."""

import pytest
import torch
from safetensors.torch import load_file

import lens
from tests.conftest import data_path


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_huginn_tiny_logits_match_reference(steps):
    fixture = data_path("fixtures", "huginn-tiny")
    model = lens.load_model(fixture / "checkpoint")
    ref = load_file(str(fixture / "reference.safetensors"))
    with torch.no_grad():
        out = model(ref["input_ids"], num_steps=steps, init_state=ref["init_state"])
    expected = ref[f"logits_{steps}"]
    rel = (out.logits - expected).abs().max() / expected.abs().max()
    assert rel < 1e-5
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
