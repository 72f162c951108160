"""The reference lens pass: materialise the fp32 ``[N, V]`` logits and compute each statistic directly.

This defines what the fast paths compute (they are tested against it and against float64), and it is
what runs under :func:`kernels.force_reference`. It needs ``O(N x V)`` memory; use it for debugging.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kernels.core_ops import rms_norm_reference
from kernels.lens_stats.inputs import LensInputs
from kernels.lens_stats.result import LensStatistics


def lens_logits_reference(inputs: LensInputs) -> Tensor:
    """``rmsnorm(hidden) @ unembedding.T`` in fp32 (the norm in the input dtype, Huginn style)."""
    x = inputs.hidden
    if inputs.norm_weight is not None:
        x = rms_norm_reference(x, inputs.norm_weight, inputs.eps)
    return x.float() @ inputs.unembedding.float().T


def lens_statistics_reference(inputs: LensInputs) -> LensStatistics:
    """All statistics from the materialised logits (``O(N x V)`` memory)."""
    logits = lens_logits_reference(inputs)
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits - lse[:, None]
    entropy = -(logp.exp() * logp).sum(-1)
    out: dict[str, Any] = {"logsumexp": lse, "entropy": entropy}
    if inputs.targets is not None:
        tl = logits.gather(1, inputs.targets)
        ranks = torch.stack([(logits > tl[:, j : j + 1]).sum(-1) for j in range(tl.shape[1])], dim=1)
        out.update(target_logits=tl, target_ranks=1 + ranks, target_logprobs=tl - lse[:, None])
    if inputs.topk:
        values, ids = logits.topk(inputs.topk, dim=-1)
        out.update(topk_ids=ids, topk_logits=values, topk_logprobs=values - lse[:, None])
    if inputs.ref_logprobs is not None:
        # -inf (q = 0) -> the most negative float, so 0 * (r - log p) = 0 rather than nan; nan stays nan
        ref = inputs.ref_logprobs.float()[inputs.ref_index].clamp(min=torch.finfo(torch.float32).min)
        out["kl"] = (ref.exp() * (ref - logp)).sum(-1)
    return LensStatistics(**out)


__all__ = ["lens_logits_reference", "lens_statistics_reference"]
