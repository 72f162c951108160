"""The result of a lens pass: per-state statistics of the vocabulary distribution ``softmax(logits)``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass
class LensStatistics:
    """What a lens needs from the ``[N, V]`` logits, without keeping them (all fp32 / int64, one device).

    ``N`` states, ``K`` target ids per state, ``k`` top entries. Ranks count *strictly* larger logits
    (``1 + #{v : logit_v > logit_target}``, so 1 is the top and tied tokens share a rank); log-probabilities
    are ``logit - logsumexp``; entropy and ``kl = KL(reference || this)`` are in nats. Fields that were
    not requested are ``None``. Shapes and dtypes are checked on construction, so a kernel that writes
    the wrong layout fails loudly here instead of in a plot.
    """

    logsumexp: Float[Tensor, " N"]
    entropy: Float[Tensor, " N"]
    target_logits: Float[Tensor, "N K"] | None = None
    target_ranks: Int[Tensor, "N K"] | None = None
    target_logprobs: Float[Tensor, "N K"] | None = None
    topk_ids: Int[Tensor, "N k"] | None = None
    topk_logits: Float[Tensor, "N k"] | None = None
    topk_logprobs: Float[Tensor, "N k"] | None = None
    kl: Float[Tensor, " N"] | None = None

    def __post_init__(self) -> None:
        n = self.logsumexp.shape[0] if self.logsumexp.dim() == 1 else -1
        device = self.logsumexp.device
        expected = {
            "logsumexp": (1, torch.float32),
            "entropy": (1, torch.float32),
            "target_logits": (2, torch.float32),
            "target_ranks": (2, torch.int64),
            "target_logprobs": (2, torch.float32),
            "topk_ids": (2, torch.int64),
            "topk_logits": (2, torch.float32),
            "topk_logprobs": (2, torch.float32),
            "kl": (1, torch.float32),
        }
        for name, (ndim, dtype) in expected.items():
            value = getattr(self, name)
            if value is None:
                if name in ("logsumexp", "entropy"):
                    raise ValueError(f"LensStatistics.{name} is required")
                continue
            if value.dim() != ndim or value.shape[0] != n or value.dtype != dtype or value.device != device:
                raise ValueError(
                    f"LensStatistics.{name}: got {value.dtype} {tuple(value.shape)} on {value.device}, "
                    f"expected {dtype} with {ndim} dims, {n} rows, on {device}"
                )
        for group in (
            ("target_logits", "target_ranks", "target_logprobs"),
            ("topk_ids", "topk_logits", "topk_logprobs"),
        ):
            values = [getattr(self, name) for name in group]
            present = [v is not None for v in values]
            if any(present) and not all(present):
                raise ValueError(f"LensStatistics: {', '.join(group)} must be given together")
            if all(present) and len({v.shape for v in values}) != 1:
                raise ValueError(f"LensStatistics: {', '.join(group)} differ in shape")

    def require(self, name: str) -> Tensor:
        """The field ``name``, which the caller asked the kernel for (an error if it was not computed)."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"LensStatistics.{name} was not requested from the kernel")
        return value

    @property
    def num_states(self) -> int:
        """``N``, the number of states (rows)."""
        return self.logsumexp.shape[0]

    def to_dict(self) -> dict[str, Tensor | None]:
        """The fields as a plain dict (for record building and serialisation)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to(self, device: torch.device | str) -> LensStatistics:
        """The same statistics on another device."""
        moved = {k: None if v is None else v.to(device) for k, v in self.to_dict().items()}
        return LensStatistics(**moved)  # type: ignore[arg-type]  # the optional fields stay None

    def cpu(self) -> LensStatistics:
        """The same statistics on the CPU."""
        return self.to("cpu")


__all__ = ["LensStatistics"]
