"""Training and held-out evaluation of the Tuned Lens.

States are collected once (the model is frozen), then the translators are fitted with Adam on
KL(final ‖ lens), with a progress bar. ``compare_lenses`` reports held-out KL per site for the Logit
Lens and each trained Tuned Lens, the table the ``looplens tuned-lens`` command prints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from lens.errors import InputError
from lens.model import LoopedLM
from lens.stream import TraceCollector
from probes.batching import forward_batches
from probes.lenses.tuned import Mode, TunedLens


@dataclass
class StateSet:
    """States at real (non-padding) tokens: ``states[(site, iteration)] -> [N, d]``, final log-probs ``[N, V]``."""

    states: dict[tuple[str, int], Tensor]
    final_logprobs: Tensor

    def __len__(self) -> int:
        return self.final_logprobs.shape[0]


@torch.no_grad()
def collect_states(
    model: LoopedLM,
    prompts: Sequence[Sequence[int]],
    num_steps: int,
    sites: Sequence[str],
    batch_size: int = 32,
    seed: int = 0,
) -> StateSet:
    """Run the model over ``prompts`` and keep the states of ``sites`` at every real token."""
    states: dict[tuple[str, int], list[Tensor]] = {}
    finals = []
    for batch, out, (collector,) in forward_batches(
        model,
        prompts,
        lambda _: [TraceCollector(list(sites))],
        num_steps=num_steps,
        batch_size=batch_size,
        seed=seed,
        logits="all",
    ):
        real = batch.mask.bool()
        for site, tensors in collector.trace.states.items():
            for tensor, it in zip(tensors, collector.trace.iterations[site], strict=True):
                states.setdefault((site, it), []).append(tensor[real].float())
        assert out.logits is not None  # logits='all' was asked for
        finals.append(F.log_softmax(out.logits[real].float(), dim=-1))
    return StateSet({k: torch.cat(v) for k, v in states.items()}, torch.cat(finals))


def _kl(final_logprobs: Tensor, logits: Tensor) -> Tensor:
    """Per-token KL(final ‖ lens) in nats."""
    return (final_logprobs.exp() * (final_logprobs - F.log_softmax(logits.float(), -1))).sum(-1)


def _lens_logits(model: LoopedLM, lens: TunedLens | None, site: str, it: int, h: Tensor) -> Tensor:
    x = lens.transform_hidden(h, site, it) if lens is not None else h
    if not model.layout.is_normed(site):
        x = model.final_norm(x.to(model.dtype))
    return model.head(x.to(model.dtype))


def fit_tuned_lens(
    model: LoopedLM,
    data: StateSet,
    mode: Mode = "shared",
    num_steps: int | None = None,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_tokens: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> TunedLens:
    """Fit translators on collected states; the model itself stays frozen."""
    sites = sorted({site for site, _ in data.states}, key=lambda s: model.layout.sites().index(s))
    lens = TunedLens(model, mode, num_steps, [s for s in sites if s in model.layout.block_sites()])
    params = list(lens.translators.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(data)
    steps = epochs * max(1, n // batch_tokens)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for _ in tqdm(range(steps), desc=f"tuned lens ({mode})", disable=not progress, mininterval=2):
            idx = torch.randint(0, n, (min(batch_tokens, n),), generator=gen).to(data.final_logprobs.device)
            loss = torch.zeros(())
            for (site, it), h in data.states.items():
                if site not in lens.sites:
                    continue
                loss = (
                    loss + _kl(data.final_logprobs[idx], _lens_logits(model, lens, site, it, h[idx])).mean()
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return lens


@torch.no_grad()
def compare_lenses(
    model: LoopedLM, data: StateSet, tuned: Mapping[Mode, TunedLens] | Mapping[str, TunedLens]
) -> pd.DataFrame:
    """Held-out mean KL(final ‖ lens) per (site, iteration): the Logit Lens and each Tuned Lens."""
    rows = []
    for (site, it), h in data.states.items():
        if site not in model.layout.block_sites():
            continue
        row = {
            "site": site,
            "iteration": it,
            "kl_logit": float(_kl(data.final_logprobs, _lens_logits(model, None, site, it, h)).mean()),
        }
        for name, lens in tuned.items():
            row[f"kl_tuned_{name}"] = float(
                _kl(data.final_logprobs, _lens_logits(model, lens, site, it, h)).mean()
            )
        rows.append(row)
    return pd.DataFrame(rows)


def train_and_compare(
    model: LoopedLM,
    prompts: Sequence[Sequence[int]],
    num_steps: int | None = None,
    modes: Sequence[Mode] = ("shared", "per-iteration"),
    val_fraction: float = 0.25,
    epochs: int = 30,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[Mode, TunedLens], pd.DataFrame]:
    """Split prompts, fit one Tuned Lens per mode, and return held-out KL per site for every lens."""
    if len(prompts) < 4:
        raise InputError("training a Tuned Lens needs at least 4 prompts (some are held out)")
    num_steps = num_steps or model.config.mean_recurrence
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(len(prompts) * val_fraction))
    val = [prompts[i] for i in order[:n_val]]
    train = [prompts[i] for i in order[n_val:]]
    sites = model.layout.block_sites()
    train_data = collect_states(model, train, num_steps, sites, seed=seed)
    val_data = collect_states(model, val, num_steps, sites, seed=seed + 1)
    lenses = {
        mode: fit_tuned_lens(model, train_data, mode, num_steps, epochs, lr, seed=seed, progress=progress)
        for mode in modes
    }
    return lenses, compare_lenses(model, val_data, lenses)
