"""Float64 references the kernels are tested against (independent of the library's own reference code)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def rms_norm64(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> Tensor:
    """Huginn's RMSNorm in float64, keeping its one definitional rounding (the normalised value to x.dtype)."""
    if residual is not None:
        x = x + residual  # the definition adds in the input dtype
    h = x.double()
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed.double() * weight.double()


def swiglu64(fc_out: Tensor) -> Tensor:
    gate, up = fc_out.double().chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


@dataclass
class Lens64:
    """Exact statistics of ``softmax(x @ W.T)`` with ``x`` the (dtype-rounded) normed states."""

    logits: Tensor  # [N, V] float64
    lse: Tensor
    entropy: Tensor
    kl: Tensor | None


def lens64(
    hidden: Tensor,
    w: Tensor,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    ref_logprobs: Tensor | None = None,
    ref_index: Tensor | None = None,
) -> Lens64:
    x = hidden
    if (
        norm_weight is not None
    ):  # the definition: normalise, round to dtype, times the gain in the promoted dtype
        out_dtype = torch.promote_types(hidden.dtype, norm_weight.dtype)
        x = rms_norm64(hidden, norm_weight, eps).to(out_dtype)
    logits = x.double() @ w.double().T
    lse = torch.logsumexp(logits, -1)
    logp = logits - lse[:, None]
    entropy = -(logp.exp() * logp).sum(-1)
    kl = None
    if ref_logprobs is not None:
        idx = torch.arange(hidden.shape[0]) if ref_index is None else ref_index
        r = ref_logprobs.double()[idx]
        q = r.exp()
        kl = torch.where(q > 0, q * (r - logp), 0.0).sum(-1)
    return Lens64(logits, lse, entropy, kl)


def rank_bounds(logits: Tensor, targets: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """Smallest and largest rank a target can have when logits are known to ``tol``.

    Tokens whose logit is within ``tol`` of the target's may legitimately fall on either side in fp32.
    """
    tz = logits.gather(1, targets)
    lo = torch.stack([1 + (logits > tz[:, j : j + 1] + tol).sum(-1) for j in range(targets.shape[1])], 1)
    hi = torch.stack([1 + (logits > tz[:, j : j + 1] - tol).sum(-1) - 1 for j in range(targets.shape[1])], 1)
    return lo, hi
