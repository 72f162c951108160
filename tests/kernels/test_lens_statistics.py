"""The lens pass on every path (reference, chunked PyTorch, Triton under the interpreter) against float64."""

from __future__ import annotations

import pytest
import torch

from kernels import LensStatistics, force_reference, lens_statistics
from kernels.lens_stats import lens_statistics_chunked, lens_statistics_reference, prepare_lens_inputs
from tests.kernels.reference64 import Lens64, lens64, rank_bounds

#: Absolute tolerance on logits and every statistic derived from them, per input dtype.
ATOL = {torch.float64: 2e-5, torch.float32: 5e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def make_inputs(
    gen: torch.Generator,
    n: int,
    d: int,
    v: int,
    dtype: torch.dtype,
    k_targets: int = 3,
    with_ref: bool = True,
    ref_rows: int | None = None,
) -> dict:
    """Random lens inputs with Huginn-like scales: unit-norm-ish states, logits of order a few nats."""
    hidden = (torch.randn(n, d, generator=gen) * 3 + 0.5).to(dtype)
    w = (torch.randn(v, d, generator=gen) * (2.0 / d**0.5)).to(dtype)
    norm_weight = (torch.rand(d, generator=gen) + 0.5).to(dtype)
    out = {"hidden": hidden, "unembedding": w, "norm_weight": norm_weight}
    if k_targets:
        out["targets"] = torch.randint(0, v, (n, k_targets), generator=gen)
    if with_ref:
        rows = ref_rows or n
        ref = torch.log_softmax(torch.randn(rows, v, generator=gen) * 2, dim=-1)
        ref[:, ::7] = float("-inf")  # tokens the reference rules out: q = 0 must contribute 0, not nan
        out["ref_logprobs"] = ref
        if ref_rows is not None:
            out["ref_index"] = torch.randint(0, rows, (n,), generator=gen)
    return out


def expected(args: dict) -> Lens64:
    return lens64(
        args["hidden"],
        args["unembedding"],
        args.get("norm_weight"),
        1e-6,
        args.get("ref_logprobs"),
        args.get("ref_index"),
    )


def assert_matches(stats: LensStatistics, ex: Lens64, args: dict, topk: int, atol: float) -> None:
    """Every field against float64: values to ``atol``, ranks and top-k ids exactly up to near-ties."""
    close = {"atol": atol, "rtol": 0}
    torch.testing.assert_close(stats.logsumexp.double(), ex.lse, **close)
    torch.testing.assert_close(stats.entropy.double(), ex.entropy, atol=4 * atol, rtol=0)
    targets = args.get("targets")
    if targets is not None:
        tz = ex.logits.gather(1, targets)
        torch.testing.assert_close(stats.target_logits.double(), tz, **close)
        torch.testing.assert_close(stats.target_logprobs.double(), tz - ex.lse[:, None], **close)
        lo, hi = rank_bounds(ex.logits, targets, 2 * atol)
        ranks = stats.target_ranks
        assert bool(((ranks >= lo) & (ranks <= hi)).all()), "rank outside what the fp32 rounding allows"
        exact = 1 + (ex.logits[:, None, :] > tz[:, :, None]).sum(-1)
        assert (ranks == exact).float().mean() >= 0.97
    else:
        assert stats.target_ranks is None and stats.target_logits is None
    if topk:
        values = ex.logits.topk(topk, dim=-1).values
        torch.testing.assert_close(stats.topk_logits.double(), values, **close)
        torch.testing.assert_close(stats.topk_logits.double(), ex.logits.gather(1, stats.topk_ids), **close)
        torch.testing.assert_close(stats.topk_logprobs.double(), values - ex.lse[:, None], **close)
        assert bool((stats.topk_logits[:, :-1] >= stats.topk_logits[:, 1:]).all()), "top-k not descending"
        assert all(len(set(row.tolist())) == topk for row in stats.topk_ids), "repeated top-k id"
    else:
        assert stats.topk_ids is None
    if ex.kl is not None:
        torch.testing.assert_close(stats.kl.double(), ex.kl, atol=4 * atol, rtol=0)
        assert bool(torch.isfinite(stats.kl).all())
    else:
        assert stats.kl is None


# --- the chunked PyTorch path (what runs on CPU) ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_chunked_matches_float64(gen, dtype):
    args = make_inputs(gen, 67, 523, 4097, dtype)
    inputs = prepare_lens_inputs(**args, topk=10)
    stats = lens_statistics_chunked(inputs, chunk_size=1000, row_block=30, poison=True)
    assert_matches(stats, expected(args), args, 10, ATOL[dtype])


@pytest.mark.parametrize(
    ("chunk", "k_targets", "topk", "with_ref", "norm"),
    [(4097, 1, 1, False, True), (64, 8, 3, True, False), (5000, 0, 0, False, False), (33, 2, 10, True, True)],
)
def test_chunked_options(gen, chunk, k_targets, topk, with_ref, norm):
    args = make_inputs(gen, 23, 96, 4097, torch.float32, k_targets=k_targets, with_ref=with_ref)
    if not norm:
        del args["norm_weight"]
    stats = lens_statistics(**args, topk=topk, chunk_size=chunk)
    assert_matches(stats, expected(args), args, topk, ATOL[torch.float32])


@pytest.mark.parametrize("with_ref", [False, True])
def test_threaded_cpu_pass_equals_the_serial_pass(gen, with_ref, monkeypatch):
    """Issue #15.4: with torch threads the CPU pass splits rows over Python threads (single-threaded ops,
    no barrier per op); with the same row blocks every field equals the one-thread pass bit for bit, and
    the thread count is restored."""
    args = make_inputs(gen, 61, 96, 3001, torch.float32, k_targets=3, with_ref=with_ref)
    inputs = prepare_lens_inputs(**args, topk=5)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = lens_statistics_chunked(inputs, chunk_size=700, row_block=6, poison=True)
        torch.set_num_threads(3)
        threaded = lens_statistics_chunked(inputs, chunk_size=700, row_block=6, poison=True)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(previous)
    for name, value in serial.to_dict().items():
        other = threaded.to_dict()[name]
        assert (value is None) == (other is None), name
        if value is not None:
            assert torch.equal(value, other), name
    assert_matches(threaded, expected(args), args, 5, ATOL[torch.float32])


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_threaded_cpu_pass_runs_in_the_callers_autograd_mode(gen, mode):
    """The worker threads take the caller's grad / inference mode (torch keeps them per thread): weights
    that require grad under ``no_grad`` and inference tensors under ``inference_mode`` both work."""
    args = make_inputs(gen, 40, 32, 1500, torch.float32, k_targets=2, with_ref=True)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = lens_statistics_chunked(prepare_lens_inputs(**args, topk=3), chunk_size=500, row_block=5)
        torch.set_num_threads(2)
        if mode == "no_grad":
            args["unembedding"] = torch.nn.Parameter(args["unembedding"].clone())
            with torch.no_grad():
                inputs = prepare_lens_inputs(**args, topk=3)
                threaded = lens_statistics_chunked(inputs, chunk_size=500, row_block=5)
        else:
            with torch.inference_mode():
                inputs = prepare_lens_inputs(**{k: v.clone() if isinstance(v, torch.Tensor) else v
                                                for k, v in args.items()}, topk=3)  # fmt: skip
                threaded = lens_statistics_chunked(inputs, chunk_size=500, row_block=5)
    finally:
        torch.set_num_threads(previous)
    for name, value in serial.to_dict().items():
        if value is not None:
            assert torch.equal(value, threaded.to_dict()[name]), name


def test_ref_index_maps_states_to_reference_rows(gen):
    args = make_inputs(gen, 31, 64, 1000, torch.float32, ref_rows=5)
    stats = lens_statistics(**args, chunk_size=300)
    assert_matches(stats, expected(args), args, 0, ATOL[torch.float32])


def test_kl_to_itself_is_zero(gen):
    args = make_inputs(gen, 12, 64, 700, torch.float32, k_targets=0, with_ref=False)
    with force_reference():
        logits = lens_statistics(**args).logsumexp  # just to exercise the forced path once
    assert logits.shape == (12,)
    inputs = prepare_lens_inputs(**args)
    from kernels.lens_stats import lens_logits_reference

    ref = torch.log_softmax(lens_logits_reference(inputs), dim=-1)
    stats = lens_statistics(**args, ref_logprobs=ref, chunk_size=128)
    torch.testing.assert_close(stats.kl, torch.zeros(12), atol=2e-5, rtol=0)


def test_reference_path_matches_float64(gen):
    args = make_inputs(gen, 19, 80, 500, torch.float32)
    stats = lens_statistics_reference(prepare_lens_inputs(**args, topk=4))
    assert_matches(stats, expected(args), args, 4, ATOL[torch.float32])


# --- the Triton kernel, interpreted on the CPU ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_float64(gen, dtype):
    from kernels.triton_lens import lens_statistics_triton

    args = make_inputs(gen, 67, 523, 4097, dtype)
    stats = lens_statistics_triton(**args, topk=10, num_splits=3, input_precision="ieee", poison=True)
    assert_matches(stats, expected(args), args, 10, ATOL[dtype])


@pytest.mark.parametrize(
    ("k_targets", "topk", "with_ref", "splits", "tiles"),
    [(0, 0, False, 1, (16, 32, 16)), (8, 10, True, 40, (16, 64, 32)), (1, 1, False, 2, (32, 128, 16))],
)
def test_triton_options(gen, k_targets, topk, with_ref, splits, tiles):
    """No statistics but the softmax; all of them with more splits than tiles (empty splits); one of each."""
    from kernels.triton_lens import lens_statistics_triton

    args = make_inputs(gen, 21, 72, 300, torch.float32, k_targets=k_targets, with_ref=with_ref)
    bn, bv, bd = tiles
    stats = lens_statistics_triton(
        **args, topk=topk, num_splits=splits, block_n=bn, block_v=bv, block_d=bd, poison=True
    )
    assert_matches(stats, expected(args), args, topk, ATOL[torch.float32])


def test_triton_mixed_dtypes_upcast(gen):
    """fp16 states with an fp32 unembedding: the tiles are upcast, the logits stay fp32-accurate."""
    from kernels.triton_lens import lens_statistics_triton

    args = make_inputs(gen, 17, 64, 500, torch.float16)
    args["unembedding"] = args["unembedding"].float()
    stats = lens_statistics_triton(**args, topk=5, block_n=16, block_v=64, poison=True)
    assert_matches(stats, expected(args), args, 5, ATOL[torch.float16])


# --- ranks with exact ties -------------------------------------------------------------------------


def tied_inputs(gen: torch.Generator) -> dict:
    """Small-integer states and rows, so every logit is an exact integer in any summation order, and many
    exact duplicates: rows copied within and across vocabulary chunks, including the targets' own rows."""
    n, d, v = 29, 48, 700
    w = torch.randint(-2, 3, (v, d), generator=gen).float()
    src = torch.randint(0, v, (200,), generator=gen)
    dst = torch.randint(0, v, (200,), generator=gen)
    w[dst] = w[src]
    hidden = torch.randint(-2, 3, (n, d), generator=gen).float()
    targets = torch.randint(0, v, (n, 4), generator=gen)
    targets[:, 1] = dst[:n]  # targets that certainly have a duplicate elsewhere
    return {"hidden": hidden, "unembedding": w, "targets": targets}


def brute_force_ranks(args: dict) -> torch.Tensor:
    logits = args["hidden"].double() @ args["unembedding"].double().T
    tz = logits.gather(1, args["targets"])
    return 1 + (logits[:, None, :] > tz[:, :, None]).sum(-1)


@pytest.mark.parametrize("path", ["reference", "chunked-64", "chunked-1000", "triton"])
def test_ranks_with_exact_ties(gen, path):
    args = tied_inputs(gen)
    inputs = prepare_lens_inputs(**args, topk=10)
    if path == "reference":
        stats = lens_statistics_reference(inputs)
    elif path.startswith("chunked"):
        stats = lens_statistics_chunked(inputs, chunk_size=int(path.split("-")[1]), row_block=8)
    else:
        from kernels.triton_lens import lens_statistics_triton_inputs

        stats = lens_statistics_triton_inputs(
            inputs, block_n=16, block_v=64, block_d=16, num_splits=3, poison=True
        )
    ranks = brute_force_ranks(args)
    assert torch.equal(stats.target_ranks, ranks)
    tied = (args["hidden"] @ args["unembedding"].T).gather(1, args["targets"])
    assert torch.equal(stats.target_logits, tied)
    logits = args["hidden"] @ args["unembedding"].T  # exact: small integers
    assert torch.equal(stats.topk_logits, logits.topk(10, dim=-1).values)
    assert torch.equal(logits.gather(1, stats.topk_ids), stats.topk_logits)


# --- the result dataclass --------------------------------------------------------------------------


def test_lens_statistics_validates_shapes():
    lse = torch.zeros(4)
    with pytest.raises(ValueError, match="entropy"):
        LensStatistics(logsumexp=lse, entropy=torch.zeros(3))
    with pytest.raises(ValueError, match="target_ranks"):
        LensStatistics(
            lse,
            lse,
            target_logits=torch.zeros(4, 2),
            target_ranks=torch.zeros(4, 2),
            target_logprobs=torch.zeros(4, 2),
        )
    with pytest.raises(ValueError, match="together"):
        LensStatistics(lse, lse, topk_ids=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="logsumexp"):
        LensStatistics(torch.zeros(4, dtype=torch.float64), lse)
    stats = LensStatistics(lse, lse, kl=lse)
    assert set(stats.to_dict()) >= {"logsumexp", "entropy", "kl", "topk_ids"}
    assert stats.cpu().kl is not None and stats.num_states == 4
