"""The one place where probes turn hidden states into token statistics.

Every analyzer (ranks, log-probabilities, entropy, top-k, KL to the final distribution) goes through
``token_statistics``, which calls the fused lens kernel of ``kernels/``: the ``N × V`` logits are never
materialised beyond one vocabulary chunk (CPU) or tile (GPU).

Rank convention: ``rank = 1 + #(logits strictly greater than the target's logit)``, counted on float32
logits (bf16 logits tie often at V = 65536, which would make ranks meaningless). 1 is the top token;
tied tokens share the better rank. A NaN logit compares false with everything, so it would read as
rank 1 at every layer: non-finite states or logits raise ``lens.errors.InputError`` instead.
"""

from __future__ import annotations

import dataclasses

import torch
from jaxtyping import Float, Int
from torch import Tensor

import kernels
from lens.errors import InputError
from lens.model import LoopedLM

MAX_TARGETS = 8


def check_token_ids(ids: Tensor, vocab_size: int, what: str = "target") -> None:
    """Token ids must index the unembedding; say which one does not."""
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{what} token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab_size})"
        )


@torch.no_grad()
def token_statistics(
    model: LoopedLM,
    hidden: Float[Tensor, "N d"],
    normalize: bool = True,
    targets: Int[Tensor, "N K"] | None = None,
    topk: int = 0,
    ref_logprobs: Float[Tensor, "R V"] | None = None,
    ref_index: Int[Tensor, " N"] | None = None,
) -> kernels.LensStatistics:
    """Statistics of ``lm_head(norm(hidden))`` (or ``lm_head(hidden)`` when ``normalize`` is False), with
    the model's final norm (Huginn's ``ln_f``, Ouro's ``model.norm``).

    Not differentiable: these are measurements (train lenses on materialised logits instead).
    """
    if targets is not None:
        check_token_ids(targets, model.config.padded_vocab_size)
        if targets.shape[1] > MAX_TARGETS:  # the fused kernel takes up to 8 targets per state
            parts = [
                token_statistics(
                    model,
                    hidden,
                    normalize,
                    targets[:, i : i + MAX_TARGETS],
                    topk if i == 0 else 0,
                    ref_logprobs if i == 0 else None,
                    ref_index if i == 0 else None,
                )
                for i in range(0, targets.shape[1], MAX_TARGETS)
            ]
            first = parts[0]
            return dataclasses.replace(
                first,
                target_logits=torch.cat([p.require("target_logits") for p in parts], 1),
                target_ranks=torch.cat([p.require("target_ranks") for p in parts], 1),
                target_logprobs=torch.cat([p.require("target_logprobs") for p in parts], 1),
            )
    if not bool(torch.isfinite(hidden).all()):
        bad = int((~torch.isfinite(hidden)).flatten(1).any(-1).sum())
        raise InputError(f"{bad} of {hidden.shape[0]} hidden states hold NaN/Inf: no rank can be computed")
    norm = model.final_norm_layer
    stats = kernels.lens_statistics(
        hidden,
        model.lm_head.weight,
        norm_weight=norm.weight if normalize else None,
        eps=norm.eps,
        targets=targets,
        topk=topk,
        ref_logprobs=ref_logprobs,
        ref_index=ref_index,
    )
    if not bool(torch.isfinite(stats.logsumexp).all()):
        bad = int((~torch.isfinite(stats.logsumexp)).sum())
        raise InputError(f"{bad} of {hidden.shape[0]} states have NaN/Inf logits (a non-finite unembedding?)")
    return stats


def final_logprobs(logits: Float[Tensor, "N V"]) -> Float[Tensor, "N V"]:
    """Reference distribution for KL-to-final: the model's own output, in float32."""
    return torch.log_softmax(logits.float(), dim=-1)
