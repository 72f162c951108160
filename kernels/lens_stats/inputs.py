"""Checked, normalised inputs of a lens pass, shared by every implementation.

All paths (reference, chunked PyTorch, Triton) start from :func:`prepare_lens_inputs`, so a malformed
call raises the same clear ``ValueError`` whichever backend would have run, and no path ever reads a
target id or reference row out of range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

#: Most top-k entries a lens pass returns (the Triton kernel keeps them in registers).
MAX_TOPK = 10


@dataclass(frozen=True)
class LensInputs:
    """Validated arguments of :func:`kernels.lens_statistics` (ids as int64, ``ref_index`` filled in)."""

    hidden: Float[Tensor, "N d"]
    unembedding: Float[Tensor, "V d"]
    norm_weight: Float[Tensor, " d"] | None
    eps: float
    targets: Int[Tensor, "N K"] | None
    topk: int
    ref_logprobs: Float[Tensor, "R V"] | None
    ref_index: Int[Tensor, " N"] | None

    @property
    def num_states(self) -> int:
        return self.hidden.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.unembedding.shape[0]

    @property
    def num_targets(self) -> int:
        return 0 if self.targets is None else self.targets.shape[1]


def _check_float(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"lens_statistics: {name} must be a floating-point tensor, got {t.dtype}")


def _check_ids(name: str, ids: Tensor, upper: int) -> Tensor:
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"lens_statistics: {name} must hold integer ids, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= upper):
        raise ValueError(
            f"lens_statistics: {name} out of range [0, {upper}): min {int(ids.min())}, max {int(ids.max())}"
        )
    return ids.to(torch.int64).contiguous()


def prepare_lens_inputs(
    hidden: Tensor,
    unembedding: Tensor,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    targets: Tensor | None = None,
    topk: int = 0,
    ref_logprobs: Tensor | None = None,
    ref_index: Tensor | None = None,
) -> LensInputs:
    """Check shapes, dtypes, devices and id ranges; raise ``ValueError`` with the offending values."""
    if hidden.dim() != 2:
        raise ValueError(f"lens_statistics: hidden must be [N, d], got shape {tuple(hidden.shape)}")
    if unembedding.dim() != 2 or unembedding.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"lens_statistics: unembedding must be [V, d] with d = {hidden.shape[1]}, got {tuple(unembedding.shape)}"
        )
    _check_float("hidden", hidden)
    _check_float("unembedding", unembedding)
    n, d = hidden.shape
    v = unembedding.shape[0]
    if v == 0:
        raise ValueError("lens_statistics: empty vocabulary")
    device = hidden.device
    for name, t in (
        ("unembedding", unembedding),
        ("norm_weight", norm_weight),
        ("targets", targets),
        ("ref_logprobs", ref_logprobs),
        ("ref_index", ref_index),
    ):
        if t is not None and t.device != device:
            raise ValueError(f"lens_statistics: {name} is on {t.device}, hidden on {device}")
    if norm_weight is not None:
        _check_float("norm_weight", norm_weight)
        if norm_weight.shape != (d,):
            raise ValueError(f"lens_statistics: norm_weight must be [{d}], got {tuple(norm_weight.shape)}")
    if targets is not None:
        if targets.dim() != 2 or targets.shape[0] != n:
            raise ValueError(f"lens_statistics: targets must be [N={n}, K], got {tuple(targets.shape)}")
        targets = _check_ids("targets", targets, v) if targets.shape[1] else None
    if not isinstance(topk, int) or not 0 <= topk <= min(MAX_TOPK, v):
        raise ValueError(f"lens_statistics: topk must be an int in [0, {min(MAX_TOPK, v)}], got {topk!r}")
    if ref_logprobs is not None:
        _check_float("ref_logprobs", ref_logprobs)
        if ref_logprobs.dim() != 2 or ref_logprobs.shape[1] != v:
            raise ValueError(
                f"lens_statistics: ref_logprobs must be [R, V={v}], got {tuple(ref_logprobs.shape)}"
            )
        if ref_index is None:
            if ref_logprobs.shape[0] != n:
                raise ValueError(
                    f"lens_statistics: ref_logprobs has {ref_logprobs.shape[0]} rows for {n} states; pass ref_index"
                )
            ref_index = torch.arange(n, device=device)
        elif ref_index.shape != (n,):
            raise ValueError(f"lens_statistics: ref_index must be [N={n}], got {tuple(ref_index.shape)}")
        ref_index = _check_ids("ref_index", ref_index, ref_logprobs.shape[0])
    elif ref_index is not None:
        raise ValueError("lens_statistics: ref_index given without ref_logprobs")
    return LensInputs(hidden, unembedding, norm_weight, float(eps), targets, topk, ref_logprobs, ref_index)


__all__ = ["LensInputs", "MAX_TOPK", "prepare_lens_inputs"]
