"""Batched patching sweeps (probes.patching): the same numbers as one patch per forward, on every family,
for state patches, re-injections and position sets; what the numbers mean; attribution patching; records;
one clear error for each kind of bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import lens
from lens.errors import InputError
from lens.interventions import Patch
from probes.patching import PromptPair, attribution_agreement, iter_patching, patching_sweep
from probes.records import to_table
from tests.conftest import data_path

T = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models run single-threaded (lens.runtime.configure_threads): two threads on a busy 2-core
    machine spin-wait and make every small forward many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["huginn", "ouro"])
def model(request):
    return lens.load_model(data_path("fixtures", f"{request.param}-tiny", "checkpoint"))


@pytest.fixture(scope="module")
def huginn():
    return lens.load_model(data_path("fixtures", "huginn-tiny", "checkpoint"))


def make_pairs(n=3, S=6, seed=0, changed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        clean = torch.randint(0, 200, (S,), generator=g).tolist()
        corrupt = list(clean)
        corrupt[changed] = (corrupt[changed] + 7) % 200
        out.append(PromptPair(tuple(clean), tuple(corrupt), 10 + i, 20 + i, follow_answer=30 + i, group="x"))
    return out


def assert_same_numbers(a: pd.DataFrame, b: pd.DataFrame, atol=1e-5):
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    key = ["pair_id", "direction", "site", "iteration", "position", "positions"]
    pd.testing.assert_frame_equal(a[key], b[key])
    for col in ("logit_diff", "clean_prob", "corrupt_prob", "follow_prob", "top_prob", "exit_step"):
        np.testing.assert_allclose(a[col].astype(float), b[col].astype(float), rtol=0, atol=atol, err_msg=col)
    for col in ("clean_rank", "corrupt_rank", "top_token_id", "outcome"):
        assert (a[col].astype(str) == b[col].astype(str)).all(), col


def test_batched_sweep_equals_one_patch_per_forward(model):
    pairs = make_pairs(n=2, S=5)
    kwargs = dict(iterations=[1, 3, 4], init_state="random", seed=3, rows_per_forward=7)
    pairs_a, batched = patching_sweep(model, pairs, T, **kwargs)
    pairs_b, loop = patching_sweep(model, pairs, T, batched=False, **kwargs)
    pd.testing.assert_frame_equal(pairs_a, pairs_b)
    # directions × pairs × iterations × blocks × positions
    assert len(batched) == 2 * 2 * 3 * model.layout.core * 5
    assert_same_numbers(batched, loop)
    to_table("patching", batched.assign(run="r"))  # rows that a run stores
    to_table("patch_pairs", pairs_a.assign(run="r"))
    assert model.layout.exit_gate == batched["exit_step"].notna().all()


def test_position_sets_other_sites_and_reinjection_equal_the_loop(huginn):
    pairs = make_pairs(n=2)
    for kwargs in (
        dict(
            sites=["prelude.0", "adapter", "core.1", "latent", "coda.0"],
            positions=[[0, 3], [5]],
            iterations=[2],
        ),
        dict(kind="reinject", positions=[[3], [2, 3, 4]], iterations=[1, 4], directions=["denoise"]),
    ):
        _, batched = patching_sweep(huginn, pairs, T, **kwargs)
        _, loop = patching_sweep(huginn, pairs, T, batched=False, **kwargs)
        assert_same_numbers(batched, loop)
    assert set(batched["site"]) == {"adapter"} and batched["positions"].notna().any()


def test_patching_the_whole_last_state_gives_the_source_run(model):
    """Every position of the state handed on at the last iteration, from the source: the source's own run."""
    pairs = make_pairs()
    handed_on = "latent" if model.layout.latent_per_iteration else f"core.{model.layout.core - 1}"
    pair_rows, rows = patching_sweep(
        model, pairs, T, sites=[handed_on], iterations=[T], positions=[list(range(6))], init_state="zeros"
    )
    np.testing.assert_allclose(rows["effect"], 1.0, atol=1e-4)
    assert (rows["outcome"] == "source").all() == bool(
        (pair_rows["clean_top_id"] == pair_rows["clean_answer_id"]).all()
        and (pair_rows["corrupt_top_id"] == pair_rows["corrupt_answer_id"]).all()
    )
    # and patching positions where both prompts agree, before any difference arrived, does nothing
    _, early = patching_sweep(
        model, pairs, T, sites=["core.0"], iterations=[1], positions=[0, 1, 2], init_state="zeros"
    )
    np.testing.assert_allclose(early["effect"], 0.0, atol=1e-4)


def test_one_row_is_one_patched_forward(huginn):
    pair = make_pairs(n=1)[0]
    _, rows = patching_sweep(
        huginn, [pair], T, sites=["core.0"], iterations=[2], positions=[4], directions=["noise"]
    )
    with torch.no_grad():
        source = huginn(torch.tensor([pair.corrupt]), T, "zeros", return_trace=["core.0"]).trace
        out = huginn.run_with_interventions(
            torch.tensor([pair.clean]), [Patch.from_trace(source, "core.0", 2, [4])], T, init_state="zeros"
        )
    logits = out.logits[0, -1]
    row = rows.iloc[0]
    assert row["logit_diff"] == pytest.approx(
        float(logits[pair.clean_answer] - logits[pair.corrupt_answer]), abs=1e-5
    )
    assert row["clean_rank"] == 1 + int((logits > logits[pair.clean_answer]).sum())
    assert row["top_token_id"] == int(logits.argmax())
    assert row["clean_prob"] == pytest.approx(float(logits.softmax(-1)[pair.clean_answer]), abs=1e-6)


def test_alignment_patches_only_corresponding_positions(huginn):
    clean = (5, 6, 7, 8, 9, 10)
    corrupt = (4, 5, 6, 70, 8, 9, 10)  # one extra token in front, a different fourth token
    alignment = tuple((p, p + 1) for p in range(6))
    pair = PromptPair(clean, corrupt, 11, 12, alignment=alignment)
    _, batched = patching_sweep(huginn, [pair], T, sites=["core.1"], iterations=[2, 3])
    _, loop = patching_sweep(huginn, [pair], T, sites=["core.1"], iterations=[2, 3], batched=False)
    assert_same_numbers(batched, loop)
    denoise = batched[batched["direction"] == "denoise"]
    assert sorted(set(denoise["position"])) == [1, 2, 3, 4, 5, 6]  # corrupted position 0 has no counterpart
    assert (denoise["source_position"] == denoise["position"] - 1).all()
    with pytest.raises(InputError, match="give an alignment"):
        patching_sweep(huginn, [PromptPair(clean, corrupt, 11, 12)], T)


def test_attribution_estimates_agree_with_exact_patching(huginn):
    pairs = make_pairs(n=2)
    _, rows = patching_sweep(huginn, pairs, T, attribution=True, directions=["denoise"])
    assert set(rows["method"]) == {"exact", "attribution"}
    attr = rows[rows["method"] == "attribution"]
    assert attr["clean_rank"].isna().all() and attr["logit_diff"].notna().all()
    agreement = attribution_agreement(rows)
    # before the changed token (position 3) the two prompts' states are identical: the estimate is exactly
    # zero there and those cells are left out of the correlation
    no_op = attr["effect"].eq(0)
    assert set(attr.loc[no_op, "position"]) == {0, 1, 2} and not attr.loc[~no_op, "position"].lt(3).any()
    assert agreement["no_op_cells"] == int(no_op.sum()) and agreement["cells"] == len(attr) - int(no_op.sum())
    assert agreement["rho_cells"] > 0.5
    # an exact first-order check: for a patch of size ε the estimate and the truth agree to O(ε²)
    pair = pairs[0]
    ids = torch.tensor([pair.clean])
    direction = torch.randn(huginn.config.n_embd, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = huginn(ids, T, "zeros", return_trace=["core.0"]).trace["core.0"][1][0, 3]

    def ld(value):
        with torch.no_grad():
            lg = huginn.run_with_interventions(
                ids, [Patch("core.0", 2, [3], value=value)], T, init_state="zeros"
            )
        lg = lg.logits[0, -1]
        return float(lg[pair.clean_answer] - lg[pair.corrupt_answer])

    eps = 1e-2
    finite = (ld(h + eps * direction) - ld(h - eps * direction)) / (2 * eps)
    grads = {}

    def keep(x, *, hook):
        if hook.iteration == 2:
            grads["h"] = x

    with torch.enable_grad():
        out = huginn.run_with_hooks(
            ids, (0, T), "zeros", fwd_hooks=[("transformer.core_block.0.hook_resid_post", keep)]
        )
        lg = out.logits[0, -1]
        (g,) = torch.autograd.grad(lg[pair.clean_answer] - lg[pair.corrupt_answer], grads["h"])
    assert float(g[0, 3] @ direction) == pytest.approx(finite, rel=1e-2, abs=1e-3)


def test_chunks_stream_the_same_rows(huginn):
    pairs = make_pairs(n=3)
    whole = patching_sweep(huginn, pairs, T, iterations=[1, 4], positions=[2, 5], pairs_per_chunk=3)
    chunks = list(iter_patching(huginn, pairs, T, iterations=[1, 4], positions=[2, 5], pairs_per_chunk=1))
    assert len(chunks) == 3
    pd.testing.assert_frame_equal(whole[0], pd.concat([c[0] for c in chunks], ignore_index=True))
    order = ["direction", "pair_id", "site", "iteration", "position"]
    streamed = pd.concat([c[1] for c in chunks], ignore_index=True)
    assert_same_numbers(whole[1].sort_values(order), streamed.sort_values(order))


def test_bad_sweeps_raise_one_clear_error(model):
    pairs = make_pairs(n=1)
    p = pairs[0]
    V = model.config.padded_vocab_size
    cases = [
        (dict(pairs=[PromptPair(p.clean, p.corrupt[:-1], 1, 2)]), "give an alignment"),
        (dict(pairs=[PromptPair(p.clean, p.corrupt, 3, 3)]), "same token"),
        (dict(pairs=[PromptPair(p.clean, p.corrupt, V, 3)]), "outside"),
        (dict(pairs=[PromptPair((V,) + p.clean[1:], p.corrupt, 1, 3)]), "outside"),
        (dict(pairs=[PromptPair(p.clean, p.corrupt, 1, 3, alignment=((0, 9),))]), "alignment entry"),
        (dict(pairs=[]), "no prompt pairs"),
        (dict(iterations=[T + 1]), "outside 1..4"),
        (dict(sites=["core.9"]), "does not exist"),
        (dict(positions=[6]), "outside the recipient"),
        (dict(directions=["sideways"]), "directions"),
        (dict(kind="sideways"), "kind"),
    ]
    if model.layout.adapter:
        cases.append((dict(kind="reinject", attribution=True), "attribution"))
    else:
        cases.append((dict(kind="reinject"), "no adapter"))
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            patching_sweep(model, kwargs.pop("pairs", pairs), T, **kwargs)
