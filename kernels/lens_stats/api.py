"""``lens_statistics``: the public lens pass, dispatched to Triton, the chunked PyTorch path or the reference."""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor

from kernels.dispatch import backend_for
from kernels.lens_stats.chunked import lens_statistics_chunked
from kernels.lens_stats.inputs import prepare_lens_inputs
from kernels.lens_stats.reference import lens_statistics_reference
from kernels.lens_stats.result import LensStatistics


def lens_statistics(
    hidden: Float[Tensor, "N d"],
    unembedding: Float[Tensor, "V d"],
    norm_weight: Float[Tensor, " d"] | None = None,
    eps: float = 1e-6,
    targets: Int[Tensor, "N K"] | None = None,
    topk: int = 0,
    ref_logprobs: Float[Tensor, "R V"] | None = None,
    ref_index: Int[Tensor, " N"] | None = None,
    chunk_size: int | None = None,
) -> LensStatistics:
    """Statistics of ``softmax(rmsnorm(hidden) @ unembedding.T)`` per state, without the ``[N, V]`` logits.

    A logit/tuned/coda lens over every iteration, block and position needs only a handful of numbers
    per state (target ranks and log-probs, entropy, top-k, KL to the final distribution), but the
    logits themselves are ``N x V`` (gigabytes at Huginn scale). This streams the vocabulary: on CUDA
    in one fused Triton kernel, elsewhere in ``chunk_size`` columns at a time; the results equal
    :func:`~kernels.lens_stats.reference.lens_statistics_reference` (fp32 logits) up to fp32 rounding.

    ``norm_weight`` applies Huginn's RMSNorm first (``ln_f``); ``targets`` are ids per state (ranks are
    ``1 + #strictly larger logits``); ``topk <= 10``; ``ref_logprobs[ref_index[i]]`` is state ``i``'s
    reference distribution for ``kl = KL(ref || this)``. Malformed inputs raise ``ValueError``.

    >>> import torch, kernels
    >>> h, w = torch.randn(3, 8), torch.randn(50, 8)
    >>> stats = kernels.lens_statistics(h, w, targets=torch.tensor([[1], [2], [3]]), topk=2)
    >>> stats.target_ranks.shape, stats.topk_ids.shape
    (torch.Size([3, 1]), torch.Size([3, 2]))
    """
    inputs = prepare_lens_inputs(
        hidden, unembedding, norm_weight, eps, targets, topk, ref_logprobs, ref_index
    )
    backend = backend_for(hidden)
    if backend == "reference" or inputs.num_states == 0:
        return lens_statistics_reference(inputs)
    if backend == "triton":
        from kernels import triton_lens

        if triton_lens.lens_supported(inputs):
            return triton_lens.lens_statistics_triton_inputs(inputs)
    return lens_statistics_chunked(inputs, chunk_size=chunk_size)


__all__ = ["lens_statistics"]
