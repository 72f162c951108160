"""Text generation at fixed or adaptive depth, with a key/value cache and Huginn's warm start.

``generate`` returns the new tokens and, per token, how many recurrent iterations it used, which is
what a researcher studying adaptive compute wants to look at.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import Tensor

from lens.cache import CacheStrategy
from lens.errors import InputError
from lens.exit_criteria import ExitCriterion
from lens.exit_gate import GateExit
from lens.model import InitState, LoopedLM

StopReason = Literal["eos", "stop_token", "stop_string", "max_new_tokens", "context", "max_diffusion_steps"]
SAMPLERS = ("autoregressive", "diffusion")


@dataclass
class GenerationResult:
    """New tokens per sequence, iterations used per new token, and decoded text when a tokenizer exists.

    ``tokens`` keep every generated id (an end-of-text token included); ``texts`` are those tokens
    decoded without special tokens and cut at a stop string. ``stopped`` says why each sequence ended:
    ``"eos"``, ``"stop_token"``, ``"stop_string"``, ``"max_new_tokens"``, ``"context"`` (the model's
    context was full: what was generated so far is kept), or (diffusion sampler) ``"max_diffusion_steps"``.
    """

    tokens: list[list[int]]
    steps_used: list[list[int]]
    texts: list[str] | None = None
    prompts: list[list[int]] = field(default_factory=list)
    stopped: list[StopReason] = field(default_factory=list)


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Left-pad token lists into ``input_ids`` and an ``attention_mask`` (1 = token)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def sample_next(
    logits: Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Greedy argmax, or a sample after temperature, top-k and nucleus (top-p) filtering. ``[B, V] -> [B]``."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: LoopedLM,
    prompts: Tensor | Sequence[Sequence[int]] | Sequence[str] | str,
    max_new_tokens: int = 16,
    num_steps: int | None = None,
    *,
    init_state: InitState = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    exit_criterion: str | ExitCriterion | None = None,
    exit_threshold: float | None = None,
    warm_start: bool = False,
    stop_strings: Sequence[str] = (),
    stop_token_ids: Sequence[int] | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    gate_exit: GateExit | None = None,
    cache_lookup_strategy: str | None = None,
    stop_at_eos: bool = True,
    sampler: str = "autoregressive",
    **sampler_options: Any,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` per prompt (a batch is left-padded).

    ``sampler="diffusion"`` samples with the diffusion-forcing sampler instead (:mod:`lens.diffusion`;
    ``sampler_options`` are its options, ``num_steps`` its prefill depth), returning a
    :class:`lens.diffusion.DiffusionResult` with its counters.

    ``num_steps`` fixes the depth, or caps it when ``exit_criterion`` (``"kl"``, ``"entropy-diff"``,
    ``"latent-diff"``, ``"argmax-stability"``, ``"cosine"``, or ``"gate"`` for an exit-gated family:
    the cumulative exit probability reaches ``exit_threshold``) lets each token stop early; a stopped
    token computes no further iterations, and later tokens read its keys of its exit iteration.
    ``gate_exit`` (exit-gated families) decodes each token as one of Ouro's exit modes after running
    every iteration, as the authors' code does.
    ``warm_start`` starts each new token's latent from the previous token's last latent
    (Huginn's continuous compute). ``cache_lookup_strategy`` says what a deeper iteration reads for an
    earlier token that exited shallower (:mod:`lens.cache`: ``full``, the Huginn authors' default and
    looplens's for Huginn models, leaves it out; ``deepest``, the default of the other families, reads
    its exit iteration's keys; ``latest-m4`` and ``…-compress-s4`` as the authors' code has them).
    Generation stops at an end-of-text token (unless ``stop_at_eos=False``), a stop token,
    a stop string, the token budget, or a full context (``result.stopped`` says which).
    """
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if sampler == "diffusion":
        autoregressive = {
            "init_state": init_state is not None,
            "exit_criterion": exit_criterion is not None,
            "exit_threshold": exit_threshold is not None,
            "warm_start": warm_start,
            "use_cache": not use_cache,
            "gate_exit": gate_exit is not None,
            "cache_lookup_strategy": False,
        }
        given = [name for name, changed in autoregressive.items() if changed]
        if given:
            raise InputError(
                f"{', '.join(given)}: autoregressive option(s); the diffusion sampler's are init_scale, "
                "headway, inner_recurrence, freeze_strategy, … (lens.diffusion.DiffusionSettings)"
            )
        from lens.diffusion import sample

        options = dict(sampler_options, cache_lookup_strategy=cache_lookup_strategy)
        if cache_lookup_strategy is None:
            options.pop("cache_lookup_strategy")
        return sample(
            model,
            prompts,
            max_new_tokens,
            num_steps,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_strings=stop_strings,
            stop_token_ids=stop_token_ids,
            stop_at_eos=stop_at_eos,
            generator=generator,
            **options,
        )
    if sampler_options:
        raise InputError(
            f"unknown generation option(s) {sorted(sampler_options)} (sampler options need sampler='diffusion')"
        )
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    CacheStrategy.parse(cache_lookup_strategy or "full")
    if warm_start and not use_cache:
        raise InputError("warm_start needs the key/value cache (use_cache=True)")
    token_lists = _as_token_lists(model, prompts)
    pad_id = model.config.pad_token_id or 0
    ids, mask = pad_left(token_lists, pad_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    padded = bool((mask == 0).any())
    criterion = None
    if exit_criterion is not None:
        criterion = (
            exit_criterion
            if isinstance(exit_criterion, ExitCriterion)
            else ExitCriterion(exit_criterion, exit_threshold)
        )
    stops = set(stop_token_ids or ())
    eos = model.config.eos_token_id if stop_at_eos else None
    tok = model.tokenizer
    B = ids.shape[0]
    new_tokens: list[list[int]] = [[] for _ in range(B)]
    steps: list[list[int]] = [[] for _ in range(B)]
    stopped: list[StopReason | None] = [None] * B
    strategy = cache_lookup_strategy if cache_lookup_strategy is not None else model.default_cache_strategy
    cache = model.new_cache(strategy) if use_cache else None
    step_input, step_mask = ids, mask if padded else None
    state_init: InitState = init_state
    full_ids, full_mask = ids, mask
    context = model.config.block_size
    for step in range(max_new_tokens):
        if full_ids.shape[1] > context:  # the last token cannot be fed back: the context is full
            stopped = [reason or "context" for reason in stopped]
            break
        if use_cache:
            out = model(
                step_input,
                num_steps,
                state_init,
                step_mask,
                cache=cache,
                logits="last",
                generator=generator,
                exit_criterion=criterion,
                gate_exit=gate_exit,
            )
        else:
            out = model(
                full_ids,
                num_steps,
                init_state,
                full_mask if padded else None,
                logits="last",
                generator=generator,
                exit_criterion=criterion,
                gate_exit=gate_exit,
            )
        next_ids = sample_next(out.logits[:, -1], do_sample, temperature, top_k, top_p, generator).cpu()
        used = out.steps_used.cpu().tolist() if out.steps_used is not None else [out.num_steps] * B
        for b in range(B):
            if stopped[b] is not None:
                continue
            token = int(next_ids[b])
            new_tokens[b].append(token)
            steps[b].append(int(used[b]))
            if eos is not None and token == eos:
                stopped[b] = "eos"
            elif token in stops:
                stopped[b] = "stop_token"
            elif _hit_stop_string(tok, new_tokens[b], stop_strings):
                stopped[b] = "stop_string"
        if all(reason is not None for reason in stopped) or step == max_new_tokens - 1:
            break
        step_input = next_ids[:, None].to(model.device)
        step_mask = torch.ones_like(step_input) if padded else None
        full_ids = torch.cat([full_ids, step_input], 1)
        full_mask = torch.cat([full_mask, torch.ones_like(step_input)], 1)
        state_init = out.state[:, -1:] if warm_start else init_state
    reasons: list[StopReason] = [reason or "max_new_tokens" for reason in stopped]
    texts = [tok.decode(t, skip_special_tokens=True) for t in new_tokens] if tok is not None else None
    if texts is not None and stop_strings:
        texts = [_cut_at_stop(t, stop_strings) for t in texts]
    return GenerationResult(new_tokens, steps, texts, [list(p) for p in token_lists], reasons)


def _as_token_lists(model: LoopedLM, prompts: object) -> list[list[int]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        return [row.tolist() for row in prompts]
    # any other iterable of prompts (a non-iterable raises TypeError here, as list() does)
    items = list(cast(Iterable[Any], prompts))
    if items and isinstance(items[0], str):
        if model.tokenizer is None:
            raise InputError("text prompts need a model with a tokenizer; pass token ids instead")
        return [model.tokenizer.encode(p) for p in items]
    return [list(map(int, p)) for p in items]


def _hit_stop_string(tok: object, tokens: list[int], stop_strings: Sequence[str]) -> bool:
    if not stop_strings or tok is None:
        return False
    text = tok.decode(tokens)  # type: ignore[attr-defined]
    return any(s in text for s in stop_strings)


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((text.index(s) for s in stop_strings if s in text), default=len(text))
    return text[:cut]
