"""The dispatcher: backend choice, the debugging switches, fallbacks, and clear errors for bad inputs."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import dispatch
from kernels.lens_stats import lens_statistics_reference, prepare_lens_inputs
from tests.kernels.test_lens_statistics import ATOL, assert_matches, expected, make_inputs


def test_backend_choice_and_switches(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert kernels.backend_for(x) == "torch"  # CPU tensors never go to Triton
    with kernels.force_reference():
        assert kernels.backend_for(x) == "reference"
        with kernels.force_reference():
            assert kernels.backend_for(x) == "reference"
        assert kernels.backend_for(x) == "reference"
    assert kernels.backend_for(x) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert kernels.backend_for(x) == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert kernels.backend_for(x) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "refrence")
    with pytest.raises(ValueError, match="LOOPLENS_KERNELS"):
        kernels.backend_for(x)


def test_env_var_forces_reference_lens_path(gen, monkeypatch):
    args = make_inputs(gen, 5, 16, 50, torch.float32)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    from kernels.lens_stats import api

    calls = []
    monkeypatch.setattr(
        api, "lens_statistics_reference", lambda inputs: calls.append(1) or lens_statistics_reference(inputs)
    )
    kernels.lens_statistics(**args, topk=3)
    assert calls == [1]


def test_lens_dispatch_to_triton_and_fallbacks(gen, triton_on_cpu, monkeypatch):
    from kernels import triton_lens

    calls = []
    real = triton_lens.lens_statistics_triton_inputs
    monkeypatch.setattr(
        triton_lens,
        "lens_statistics_triton_inputs",
        lambda inputs, **kw: calls.append(1) or real(inputs, block_n=16, block_v=64, **kw),
    )
    args = make_inputs(gen, 13, 40, 300, torch.float32)
    assert_matches(kernels.lens_statistics(**args, topk=4), expected(args), args, 4, ATOL[torch.float32])
    assert calls == [1]
    # a non-contiguous unembedding is made contiguous, not misread
    args_t = dict(args, unembedding=torch.randn(40, 300, generator=gen).T)
    assert not args_t["unembedding"].is_contiguous()
    assert_matches(
        kernels.lens_statistics(**args_t, topk=2), expected(args_t), args_t, 2, ATOL[torch.float32]
    )
    assert calls == [1, 1]
    # inputs the kernel does not cover take the chunked path: float64, more than 8 targets
    args64 = make_inputs(gen, 7, 24, 100, torch.float64)
    assert_matches(
        kernels.lens_statistics(**args64, topk=2), expected(args64), args64, 2, ATOL[torch.float64]
    )
    args9 = make_inputs(gen, 7, 24, 100, torch.float32, k_targets=9)
    assert_matches(kernels.lens_statistics(**args9), expected(args9), args9, 0, ATOL[torch.float32])
    assert calls == [1, 1]


def test_empty_batch(gen):
    stats = kernels.lens_statistics(
        torch.zeros(0, 8),
        torch.randn(20, 8, generator=gen),
        topk=2,
        targets=torch.zeros(0, 1, dtype=torch.long),
    )
    assert stats.logsumexp.shape == (0,) and stats.topk_ids.shape == (0, 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden": torch.zeros(4, 3, 8)}, "hidden must be"),
        ({"hidden": torch.zeros(4, 8, dtype=torch.int32)}, "floating-point"),
        ({"unembedding": torch.zeros(50, 7)}, "unembedding must be"),
        ({"norm_weight": torch.ones(7)}, "norm_weight"),
        ({"targets": torch.full((4, 2), 50)}, "out of range"),
        ({"targets": torch.full((4, 2), -1)}, "out of range"),
        ({"targets": torch.zeros(4, 2)}, "integer ids"),
        ({"targets": torch.zeros(3, 2, dtype=torch.long)}, "targets must be"),
        ({"topk": 11}, "topk"),
        ({"topk": -1}, "topk"),
        ({"ref_logprobs": torch.zeros(4, 49)}, "ref_logprobs must be"),
        ({"ref_logprobs": torch.zeros(3, 50)}, "pass ref_index"),
        (
            {"ref_logprobs": torch.zeros(3, 50), "ref_index": torch.tensor([0, 1, 2, 3])},
            "ref_index out of range",
        ),
        ({"ref_index": torch.zeros(4, dtype=torch.long)}, "without ref_logprobs"),
    ],
)
def test_malformed_inputs_raise(change, message):
    args = {"hidden": torch.zeros(4, 8), "unembedding": torch.zeros(50, 8)} | change
    with pytest.raises(ValueError, match=message):
        kernels.lens_statistics(**args)
    with pytest.raises(ValueError, match=message):
        prepare_lens_inputs(**args)


def test_topk_larger_than_vocabulary_raises():
    with pytest.raises(ValueError, match="topk"):
        kernels.lens_statistics(torch.zeros(2, 4), torch.zeros(5, 4), topk=6)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, inside the interpreter's max
def test_nan_states_give_nan_not_numbers(gen, triton_on_cpu):
    """A nan state must surface as nan statistics on every path, never as plausible values."""
    from kernels.lens_stats import lens_statistics_chunked
    from kernels.triton_lens import lens_statistics_triton_inputs

    args = make_inputs(gen, 6, 16, 70, torch.float32, k_targets=1, with_ref=False)
    args["hidden"][2, 3] = float("nan")
    inputs = prepare_lens_inputs(**args)
    for stats in (
        lens_statistics_reference(inputs),
        lens_statistics_chunked(inputs, chunk_size=32),
        lens_statistics_triton_inputs(inputs, block_n=16, block_v=32),
    ):
        assert bool(stats.logsumexp[2].isnan()) and bool(stats.entropy[2].isnan())
        assert bool(torch.isfinite(stats.logsumexp[[0, 1, 3, 4, 5]]).all())


def test_cpu_path_needs_no_triton():
    """``triton`` is an optional extra: importing and running the CPU path must not touch it."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; sys.modules['triton'] = None\n"  # any import of triton now raises ImportError
        "import torch, kernels\n"
        "from kernels import dispatch\n"
        "dispatch.triton_available.cache_clear()\n"
        "assert not dispatch.triton_available()\n"
        "s = kernels.lens_statistics(torch.randn(4, 8), torch.randn(30, 8), targets=torch.zeros(4, 1, dtype=torch.long), topk=2)\n"
        "assert s.target_ranks.shape == (4, 1)\n"
        "kernels.rms_norm(torch.randn(2, 8), torch.ones(8)); kernels.swiglu(torch.randn(2, 8))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_public_signatures_check_shapes(gen):
    """The jaxtyping annotations are the real contract: a runtime checker accepts good calls, rejects bad ones."""
    beartype = pytest.importorskip("beartype").beartype
    from jaxtyping import jaxtyped

    checked = jaxtyped(typechecker=beartype)(kernels.lens_statistics)
    h, w = torch.randn(5, 8, generator=gen), torch.randn(30, 8, generator=gen)
    checked(h, w, targets=torch.zeros(5, 2, dtype=torch.long), topk=2)
    with pytest.raises(Exception, match="(?i)type|shape|dim"):
        checked(h, w, targets=torch.zeros(4, 2, dtype=torch.long))  # N differs between hidden and targets
    step = jaxtyped(typechecker=beartype)(kernels.adapter_step)
    d = 8
    step(torch.randn(3, d), torch.randn(d, 2 * d), torch.randn(3, d))
    with pytest.raises(Exception, match="(?i)type|shape|dim"):
        step(torch.randn(3, d), torch.randn(d, 2 * d), torch.randn(3, d + 1))
