"""Activation patching across iterations, batched: which (site, iteration, position) carries the answer.

For each prompt pair (a *clean* and a *corrupted* prompt with different answers), a sweep patches one
state at a time — every iteration × position of the chosen sites — from the *source* run into the
*recipient* run (``denoise``: clean states into the corrupted run; ``noise``: the reverse) and reads
the patched run's last position: the logit difference ``logit(clean answer) − logit(corrupted answer)``,
both answers' ranks and probabilities, the top tokens, and (exit-gated families) the expected exit
iteration. ``kind="reinject"`` patches the input the adapter re-injects instead of a state: from
iteration t to T, at one position (families with an adapter). ``positions`` may also be sets of
positions patched together (a list of lists).

Batched, the patches sit on the batch axis (:class:`lens.interventions.RowPatches`): one forward of R
rows runs R patched runs, across pairs; and a patch at iteration t resumes the recipient's loop at t from
its own state (``first_iteration``), since nothing before t changes. ``batched=False`` runs the naive
loop, one full forward per patch, for checking and benchmarks; both give the same numbers.

Attribution patching estimates every cell of a state sweep from one forward and one backward pass per
recipient: ``Δ ≈ (h_source − h_recipient) · ∂ logit_diff / ∂ h_recipient`` at each state;
:func:`attribution_agreement` measures how well its ranking of cells agrees with exact patching.

Rows follow ``probes.records`` (tables ``patching`` and ``patch_pairs``); :func:`iter_patching` yields
them chunk by chunk so that a study can write each chunk as a shard.

Example:
    >>> import torch, lens
    >>> model = lens.RecurrentDepthLM(lens.RecurrentDepthConfig(n_embd=32, n_heads=2, vocab_size=50))
    >>> pair = PromptPair(clean=(1, 2, 3, 4), corrupt=(1, 2, 9, 4), clean_answer=5, corrupt_answer=6)
    >>> pairs, rows = patching_sweep(model, [pair], num_steps=3, directions=("denoise",))
    >>> len(rows), sorted(rows["iteration"].unique().tolist())  # 3 iterations × 4 positions × 2 core blocks
    (24, [1, 2, 3])
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm

from lens.errors import InputError
from lens.exit_gate import exit_distribution
from lens.interventions import Patch, Reinject, RowPatches, RowReinjections
from lens.model import LoopedLM
from probes.records import DIRECTIONS, records

__all__ = [
    "PromptPair",
    "attribution_agreement",
    "check_pairs",
    "initial_states",
    "iter_patching",
    "patching_sweep",
    "spearman",
]

Direction = Literal["denoise", "noise"]
InitPolicy = Literal["zeros", "random"] | None
Kind = Literal["state", "reinject"]
PositionsArg = Literal["all", "last"] | Sequence[int] | Sequence[Sequence[int]]
_TOPK = 3


@dataclass(frozen=True)
class PromptPair:
    """A clean and a corrupted prompt (token ids) and the answer token each should produce.

    Prompts of different lengths need ``alignment``: ``(clean position, corrupted position)`` pairs of
    corresponding tokens (only those positions are patched). ``follow_answer`` is a third answer a
    hypothesis predicts (the latent chain-of-thought check: the recipient's final operation applied to
    the source's intermediate result); ``group`` says what differs (recorded, e.g. the changed operand).
    """

    clean: tuple[int, ...]
    corrupt: tuple[int, ...]
    clean_answer: int
    corrupt_answer: int
    alignment: tuple[tuple[int, int], ...] | None = None
    follow_answer: int | None = None
    group: str | None = None

    def recipient_map(self, direction: Direction) -> dict[int, int]:
        """Recipient position → source position for ``direction`` (denoise: the corrupted prompt receives)."""
        if self.alignment is None:
            pairs = [(p, p) for p in range(len(self.clean))]
        else:
            pairs = [(int(c), int(k)) for c, k in self.alignment]
        return {k: c for c, k in pairs} if direction == "denoise" else dict(pairs)


def check_pairs(model: LoopedLM, pairs: Sequence[PromptPair]) -> list[PromptPair]:
    """Every pair checked (``InputError`` naming the pair): token ids in the vocabulary, answers that
    differ, equal lengths or an alignment inside both prompts; returns them as a list."""
    if not pairs:
        raise InputError("no prompt pairs given")
    V = model.config.padded_vocab_size
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, PromptPair):
            raise InputError(f"pair {i} is not a PromptPair: {pair!r}")
        for name in ("clean", "corrupt"):
            ids = getattr(pair, name)
            if not len(ids):
                raise InputError(f"pair {i}: the {name} prompt is empty")
            if any(not isinstance(t, int | np.integer) or not 0 <= int(t) < V for t in ids):
                raise InputError(f"pair {i}: the {name} prompt holds a token id outside [0, {V})")
        answers = [pair.clean_answer, pair.corrupt_answer]
        answers += [pair.follow_answer] if pair.follow_answer is not None else []
        if any(not isinstance(a, int | np.integer) or not 0 <= int(a) < V for a in answers):
            raise InputError(f"pair {i}: an answer token id is outside [0, {V})")
        if pair.clean_answer == pair.corrupt_answer:
            raise InputError(
                f"pair {i}: the clean and corrupted answers are the same token ({pair.clean_answer}); "
                "patching measures the difference between two answers"
            )
        if pair.alignment is None:
            if len(pair.clean) != len(pair.corrupt):
                raise InputError(
                    f"pair {i}: the clean prompt has {len(pair.clean)} tokens and the corrupted one "
                    f"{len(pair.corrupt)}; give an alignment (clean position, corrupted position) pairs to "
                    "patch prompts of different lengths"
                )
        else:
            for c, k in pair.alignment:
                if not (0 <= c < len(pair.clean) and 0 <= k < len(pair.corrupt)):
                    raise InputError(
                        f"pair {i}: alignment entry ({c}, {k}) is outside the prompts "
                        f"({len(pair.clean)} and {len(pair.corrupt)} tokens)"
                    )
            if not pair.alignment:
                raise InputError(f"pair {i}: the alignment is empty")
        out.append(pair)
    return out


# ---------------------------------------------------------------------------------------- base runs
@dataclass
class _Side:
    """One side (clean or corrupted) of a group of pairs: inputs, initial states, traced states, answers."""

    ids: Tensor  # [n, S]
    init: Tensor | None  # [n, S, d] or None (the family's own start)
    states: dict[
        str, Tensor
    ]  # site -> [T or 1, n, S, d]: patched sites, the state handed on, the prelude's output
    last_logits: Tensor  # [n, V]
    exit_lambda: Tensor | None  # [n, T] at the last position (exit-gated families)

    @property
    def exit_step(self) -> Tensor | None:
        return _expected_exit(self.exit_lambda)


def _expected_exit(lam: Tensor | None) -> Tensor | None:
    """Expected exit iteration ``Σ t·p_t`` from gate values ``[n, T]``."""
    if lam is None:
        return None
    pdf = exit_distribution(lam.float())[0]
    return (pdf * torch.arange(1, pdf.shape[-1] + 1, device=pdf.device)).sum(-1)


def initial_states(
    model: LoopedLM, lengths: Sequence[int], policy: InitPolicy, seed: int, pair_ids: Sequence[int]
) -> Tensor | None:
    """One initial state per pair (``[n, S, d]``), shared by its two prompts; ``None`` where the family's
    loop starts from the embeddings (Ouro)."""
    if policy not in ("zeros", "random", None):
        raise InputError(f"init_state must be 'zeros', 'random' or None, got {policy!r}")
    if model.layout.family == "ouro":
        return None
    S, d = max(lengths), model.config.n_embd
    out = []
    for pid in pair_ids:
        like = torch.empty(1, S, d, dtype=model.dtype, device=model.device)
        if policy == "zeros":
            out.append(torch.zeros_like(like))
        else:  # a seeded draw of the family's random start (None means the family's default: random)
            gen = torch.Generator(device=model.device).manual_seed(int(seed) * 1_000_003 + int(pid))
            out.append(model.initial_state(like, "random", gen))
    return torch.cat(out)


def _handed_on(model: LoopedLM) -> str:
    """The site whose state one iteration hands the next (what a resumed loop starts from)."""
    layout = model.layout
    return "latent" if layout.latent_per_iteration else f"core.{layout.core - 1}"


def _prelude_site(model: LoopedLM) -> str:
    """The site holding what the adapter re-injects: the prelude's output (the embedding without one)."""
    return f"prelude.{model.layout.prelude - 1}" if model.layout.prelude else "embed"


def _base_run(
    model: LoopedLM, ids: Tensor, init: Tensor | None, sites: Sequence[str], num_steps: int
) -> _Side:
    init = init[:, : ids.shape[1]] if init is not None else None
    with torch.no_grad():
        out = model(ids, num_steps, init, logits="last", return_trace=list(dict.fromkeys(sites)))
    lam = out.exit_lambda[:, -1] if out.exit_lambda is not None else None
    return _Side(ids, init, {s: out.trace[s] for s in sites}, out.logits[:, -1], lam)


# ---------------------------------------------------------------------------------------- metrics
def _answer_metrics(logits: Tensor, clean: Tensor, corrupt: Tensor, follow: Tensor) -> dict[str, np.ndarray]:
    """Logit difference, ranks and probabilities of the answers, top tokens, for rows of last-position logits."""
    logits = logits.float()
    logp = torch.log_softmax(logits, -1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    clean, corrupt, follow = clean.to(logits.device), corrupt.to(logits.device), follow.to(logits.device)

    def rank(ids: Tensor) -> np.ndarray:
        return (1 + (logits > logits[rows, ids][:, None]).sum(-1)).cpu().numpy()

    safe = follow.clamp(min=0)
    top = logp.topk(_TOPK, -1)
    return {
        "logit_diff": (logits[rows, clean] - logits[rows, corrupt]).cpu().numpy(),
        "clean_rank": rank(clean),
        "clean_prob": logp[rows, clean].exp().cpu().numpy(),
        "corrupt_rank": rank(corrupt),
        "corrupt_prob": logp[rows, corrupt].exp().cpu().numpy(),
        "follow_rank": rank(safe),
        "follow_prob": logp[rows, safe].exp().cpu().numpy(),
        "top_ids": top.indices.cpu().numpy(),
        "top_probs": top.values.exp().cpu().numpy(),
    }


def _token_texts(model: LoopedLM, ids: Sequence[int]) -> dict[int, str]:
    tok = model.tokenizer
    return {int(i): (tok.decode([int(i)]) if tok is not None else f"#{int(i)}") for i in set(ids)}


def _top_tokens(top_ids: np.ndarray, top_probs: np.ndarray, text: dict[int, str]) -> list[str]:
    return [
        " | ".join(f"{text[int(i)]!r} {p:.3f}" for i, p in zip(ids, probs, strict=True))
        for ids, probs in zip(top_ids, top_probs, strict=True)
    ]


def _outcome(top1: np.ndarray, base: np.ndarray, source: np.ndarray, follow: np.ndarray) -> np.ndarray:
    return np.select(
        [top1 == base, top1 == source, (follow >= 0) & (top1 == follow)],
        ["base", "source", "follow"],
        "other",
    )


# ---------------------------------------------------------------------------------------- the cells
@dataclass
class _Items:
    """The cells of one direction of a group of pairs: one patched run each."""

    pair: np.ndarray  # index of the pair within the group
    site: np.ndarray  # site names ("adapter" for re-injections)
    iteration: np.ndarray  # the patched iteration (re-injections: the first re-injected one)
    positions: list[tuple[int, ...]]  # recipient positions patched together
    sources: list[tuple[int, ...]]  # the source positions they take their states from

    def __len__(self) -> int:
        return len(self.pair)

    def take(self, index: np.ndarray) -> _Items:
        return _Items(
            self.pair[index],
            self.site[index],
            self.iteration[index],
            [self.positions[i] for i in index],
            [self.sources[i] for i in index],
        )

    def entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """Flattened ``(row, recipient position, source position)``: one entry per patched position."""
        rows = [r for r, ps in enumerate(self.positions) for _ in ps]
        return (
            torch.tensor(rows, dtype=torch.long),
            torch.tensor([p for ps in self.positions for p in ps], dtype=torch.long),
            torch.tensor([q for qs in self.sources for q in qs], dtype=torch.long),
        )


def _position_sets(positions: PositionsArg, S: int, mapping: dict[int, int]) -> list[tuple[int, ...]]:
    """The recipient position sets to patch: one per position (``"all"``, ``"last"``, ints) or as given
    (a list of lists); positions without an aligned source position are dropped."""
    if isinstance(positions, str):
        if positions == "last":
            sets = [(S - 1,)]
        elif positions == "all":
            sets = [(p,) for p in sorted(mapping)]
        else:
            raise InputError(f"positions must be 'all', 'last' or a list of ints, got {positions!r}")
    else:
        items = list(positions)
        if not items:
            raise InputError("no positions given")
        sets = [tuple(p) if isinstance(p, Sequence) else (p,) for p in items]
    out = []
    for group in sets:
        fixed = []
        for p in group:
            if isinstance(p, bool) or not isinstance(p, int | np.integer):
                raise InputError(f"positions must be integers, got {p!r}")
            if not -S <= int(p) < S:
                raise InputError(f"position {p} is outside the recipient prompt ({S} tokens)")
            fixed.append(int(p) % S)
        kept = tuple(p for p in fixed if p in mapping)
        if kept:
            out.append(kept)
    return out


def _items(
    model: LoopedLM,
    pairs: Sequence[PromptPair],
    direction: Direction,
    kind: Kind,
    sites: Sequence[str],
    iterations: Sequence[int],
    positions: PositionsArg,
) -> _Items:
    cols: dict[str, list] = {k: [] for k in ("pair", "site", "iteration", "positions", "sources")}
    for i, pair in enumerate(pairs):
        mapping = pair.recipient_map(direction)
        S = len(pair.corrupt if direction == "denoise" else pair.clean)
        sets = _position_sets(positions, S, mapping)
        for site in sites if kind == "state" else ["adapter"]:
            its = iterations if model.layout.is_recurrent(site) else [0]
            for t in its:
                for group in sets:
                    cols["pair"].append(i)
                    cols["site"].append(site)
                    cols["iteration"].append(t)
                    cols["positions"].append(group)
                    cols["sources"].append(tuple(mapping[p] for p in group))
    return _Items(
        np.asarray(cols["pair"], dtype=np.int64),
        np.asarray(cols["site"], dtype=object),
        np.asarray(cols["iteration"], dtype=np.int64),
        cols["positions"],
        cols["sources"],
    )


def _resume_at(model: LoopedLM, site: str, iteration: int, num_steps: int) -> int:
    """The first iteration a patched run must compute: nothing before the patch changes."""
    if model.layout.is_recurrent(site):
        return iteration
    kind, _ = model.layout.parse(site)
    return 1 if kind in ("embed", "prelude") else num_steps  # the latent, coda and final follow the loop


def _source_values(
    model: LoopedLM, source: _Side, items: _Items, kind: Kind
) -> tuple[Tensor, Tensor, Tensor]:
    """Per entry: the batch row, the recipient position and the source's state (or prelude output)."""
    rows, pos, src = items.entries()
    pair = torch.as_tensor(items.pair)[rows]
    if kind == "reinject":
        states = source.states[_prelude_site(model)][0]  # [n, S, d]
        return rows, pos, states[pair, src]
    values = torch.empty(len(rows), model.config.n_embd, dtype=model.dtype, device=model.device)
    site_of = items.site[rows.numpy()]
    its = torch.as_tensor(items.iteration)[rows]
    for site in np.unique(site_of):
        sel = torch.as_tensor(np.nonzero(site_of == site)[0])
        values[sel] = source.states[str(site)][(its[sel] - 1).clamp(min=0), pair[sel], src[sel]]
    return rows, pos, values


def _forward_batched(
    model: LoopedLM, recipient: _Side, source: _Side, items: _Items, kind: Kind, num_steps: int, start: int
) -> tuple[Tensor, Tensor | None]:
    """One forward of ``len(items)`` patched runs that all resume at iteration ``start``."""
    pair = torch.as_tensor(items.pair)
    ids = recipient.ids[pair]
    rows, pos, values = _source_values(model, source, items, kind)
    its = torch.as_tensor(items.iteration)[rows]
    if kind == "reinject":
        patches: list[Any] = [RowReinjections(its, pos, values, rows=rows)]
    else:
        site_of = items.site[rows.numpy()]
        patches = []
        for site in np.unique(site_of):
            sel = torch.as_tensor(np.nonzero(site_of == site)[0])
            patches.append(RowPatches(str(site), its[sel], pos[sel], values[sel], rows=rows[sel]))
    init: Tensor | None
    if start > 1:  # resume from the recipient's own state after iteration start - 1
        init = recipient.states[_handed_on(model)][start - 2][pair]
    else:
        init = recipient.init[pair] if recipient.init is not None else None
    with torch.no_grad():
        out = model.run_with_interventions(
            ids, patches, num_steps, init_state=init, logits="last", first_iteration=start
        )
    lam = None
    if (
        out.exit_lambda is not None
    ):  # the gate values of the iterations before the resumed ones are the recipient's
        if start > 1:
            assert recipient.exit_lambda is not None  # the same exit-gated model traced the recipient
            before = recipient.exit_lambda[pair, : start - 1]
        else:
            before = out.exit_lambda[:, -1, :0]
        lam = torch.cat([before, out.exit_lambda[:, -1]], -1)
    assert out.logits is not None  # logits="last"
    return out.logits[:, -1], _expected_exit(lam)


def _forward_one_by_one(
    model: LoopedLM, recipient: _Side, source: _Side, items: _Items, kind: Kind, num_steps: int
) -> tuple[Tensor, Tensor | None]:
    """The naive way, for checking and benchmarks: one full forward pass per patch."""
    rows, pos, values = _source_values(model, source, items, kind)
    logits: list[Tensor] = []
    exits: list[Tensor] = []  # one per patch on exit-gated models, none otherwise
    for r in range(len(items)):
        sel = rows == r
        i = int(items.pair[r])
        t = int(items.iteration[r])
        if kind == "reinject":
            embedded = source.states[_prelude_site(model)][0][i : i + 1].clone()
            embedded[0, pos[sel]] = values[sel]
            patch: Any = Reinject(
                embedded=embedded, iteration=range(t, num_steps + 1), positions=pos[sel].tolist()
            )
        else:
            patch = Patch(str(items.site[r]), t or None, pos[sel].tolist(), value=values[sel][None])
        with torch.no_grad():
            out = model.run_with_interventions(
                recipient.ids[i : i + 1],
                [patch],
                num_steps,
                init_state=recipient.init[i : i + 1] if recipient.init is not None else None,
                logits="last",
            )
        assert out.logits is not None  # logits="last"
        logits.append(out.logits[:, -1])
        if out.exit_lambda is not None:
            exit_step = _expected_exit(out.exit_lambda[:, -1])
            assert exit_step is not None  # gate values in, expected exit out
            exits.append(exit_step)
    return torch.cat(logits), (torch.cat(exits) if exits else None)


def _patched_runs(
    model: LoopedLM,
    recipient: _Side,
    source: _Side,
    items: _Items,
    kind: Kind,
    num_steps: int,
    batched: bool,
    rows_per_forward: int,
) -> tuple[Tensor, np.ndarray | None]:
    """Last-position logits ``[N, V]`` and expected exit steps of every patched run, in item order."""
    if not batched:
        all_logits, exit_steps = _forward_one_by_one(model, recipient, source, items, kind, num_steps)
        return all_logits, (exit_steps.cpu().numpy() if exit_steps is not None else None)
    starts = np.array(
        [
            _resume_at(model, str(s), int(t), num_steps)
            for s, t in zip(items.site, items.iteration, strict=True)
        ]
    )
    logits = torch.empty(len(items), model.config.padded_vocab_size)
    exits = np.full(len(items), np.nan) if model.layout.exit_gate else None
    for start in np.unique(starts):
        index = np.nonzero(starts == start)[0]
        for lo in range(0, len(index), rows_per_forward):
            part = index[lo : lo + rows_per_forward]
            lg, ex = _forward_batched(model, recipient, source, items.take(part), kind, num_steps, int(start))
            logits[torch.as_tensor(part)] = lg.float().cpu()
            if exits is not None and ex is not None:
                exits[part] = ex.cpu().numpy()
    return logits, exits


# ---------------------------------------------------------------------------------------- records
def _rows_frame(
    model: LoopedLM,
    pairs: Sequence[PromptPair],
    pair_ids: Sequence[int],
    experiment: str,
    direction: Direction,
    method: str,
    items: _Items,
    num_steps: int,
    metrics: dict[str, np.ndarray],
    base_ld: np.ndarray,
    source_ld: np.ndarray,
    exit_step: np.ndarray | None,
) -> pd.DataFrame:
    layout = model.layout
    blocks = {s: layout.parse(str(s))[1] for s in np.unique(items.site)}
    unrolled = [
        layout.unrolled_index(str(s), int(t), num_steps)
        for s, t in zip(items.site, items.iteration, strict=True)
    ]
    denom = (source_ld - base_ld)[items.pair]
    ld = metrics["logit_diff"]
    with np.errstate(divide="ignore", invalid="ignore"):
        effect = np.where(np.abs(denom) > 1e-6, (ld - base_ld[items.pair]) / denom, np.nan)
    frame = pd.DataFrame(
        {
            "pair_id": np.asarray(pair_ids, dtype=np.int64)[items.pair],
            "experiment": experiment,
            "direction": direction,
            "method": method,
            "site": items.site.astype(str),
            "iteration": items.iteration.astype(np.int32),
            "block": np.array([blocks[s] for s in items.site], dtype=np.int32),
            "unrolled_index": np.array(unrolled, dtype=np.int32),
            "position": np.array([ps[0] for ps in items.positions], dtype=np.int32),
            "source_position": np.array([qs[0] for qs in items.sources], dtype=np.int32),
            "positions": [json.dumps(list(ps)) if len(ps) > 1 else None for ps in items.positions],
            "logit_diff": ld.astype(np.float32),
            "effect": effect.astype(np.float32),
        }
    )
    if method != "exact":
        return frame
    clean = np.array([p.clean_answer for p in pairs])[items.pair]
    corrupt = np.array([p.corrupt_answer for p in pairs])[items.pair]
    follow = np.array([-1 if p.follow_answer is None else p.follow_answer for p in pairs])[items.pair]
    base, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    top = metrics["top_ids"]
    has_follow = follow >= 0
    frame = frame.assign(
        clean_rank=metrics["clean_rank"].astype(np.int64),
        clean_prob=metrics["clean_prob"].astype(np.float32),
        corrupt_rank=metrics["corrupt_rank"].astype(np.int64),
        corrupt_prob=metrics["corrupt_prob"].astype(np.float32),
        follow_rank=pd.array(
            [int(r) if f else None for r, f in zip(metrics["follow_rank"], has_follow, strict=True)],
            dtype="Int64",
        ),
        follow_prob=np.where(has_follow, metrics["follow_prob"], np.nan).astype(np.float32),
        top_token_id=top[:, 0].astype(np.int64),
        top_prob=metrics["top_probs"][:, 0].astype(np.float32),
        top_tokens=_top_tokens(top, metrics["top_probs"], _token_texts(model, top.reshape(-1).tolist())),
        outcome=_outcome(top[:, 0], base, source, follow),
    )
    if exit_step is not None:
        frame["exit_step"] = exit_step.astype(np.float32)
    return frame


def _pairs_frame(
    model: LoopedLM,
    pairs: Sequence[PromptPair],
    pair_ids: Sequence[int],
    experiment: str,
    groups: list[list[int]],
    sides: list[tuple[_Side, _Side]],
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    tok = model.tokenizer
    n = len(pairs)
    ld = {"clean": np.zeros(n), "corrupt": np.zeros(n)}
    top = {"clean": np.zeros(n, np.int64), "corrupt": np.zeros(n, np.int64)}
    exits = {"clean": np.full(n, np.nan), "corrupt": np.full(n, np.nan)}
    for members, both in zip(groups, sides, strict=True):
        c = torch.tensor([pairs[i].clean_answer for i in members])
        k = torch.tensor([pairs[i].corrupt_answer for i in members])
        rows = torch.arange(len(members))
        for name, side in zip(("clean", "corrupt"), both, strict=True):
            logits = side.last_logits.float().cpu()
            ld[name][members] = (logits[rows, c] - logits[rows, k]).numpy()
            top[name][members] = logits.argmax(-1).numpy()
            if side.exit_step is not None:
                exits[name][members] = side.exit_step.cpu().numpy()

    def text(ids: Sequence[int]) -> str:
        return tok.decode(list(ids)) if tok is not None else " ".join(map(str, ids))

    def tokens(ids: Sequence[int]) -> str:
        return json.dumps([tok.decode([int(i)]) if tok is not None else str(i) for i in ids])

    frame = pd.DataFrame(
        {
            "pair_id": np.asarray(pair_ids, dtype=np.int64),
            "experiment": experiment,
            "group": [p.group for p in pairs],
            "clean_prompt": [text(p.clean) for p in pairs],
            "corrupt_prompt": [text(p.corrupt) for p in pairs],
            "clean_tokens": [tokens(p.clean) for p in pairs],
            "corrupt_tokens": [tokens(p.corrupt) for p in pairs],
            "clean_answer_id": [int(p.clean_answer) for p in pairs],
            "corrupt_answer_id": [int(p.corrupt_answer) for p in pairs],
            "follow_answer_id": pd.array([p.follow_answer for p in pairs], dtype="Int64"),
            "clean_logit_diff": ld["clean"].astype(np.float32),
            "corrupt_logit_diff": ld["corrupt"].astype(np.float32),
            "clean_top_id": top["clean"],
            "corrupt_top_id": top["corrupt"],
            "clean_exit_step": exits["clean"].astype(np.float32),
            "corrupt_exit_step": exits["corrupt"].astype(np.float32),
        }
    )
    return frame, ld["clean"], ld["corrupt"]


# ---------------------------------------------------------------------------------------- the sweep
def _sites(model: LoopedLM, sites: Sequence[str] | None) -> list[str]:
    if sites is None:
        return [f"core.{j}" for j in range(model.layout.core)]
    out = list(sites)
    if not out:
        raise InputError("no sites to patch")
    for site in out:
        model.layout.parse(site)
    return out


def _iterations(iterations: Sequence[int] | None, num_steps: int) -> list[int]:
    if iterations is None:
        return list(range(1, num_steps + 1))
    its = [int(t) for t in iterations]
    bad = [t for t in its if not 1 <= t <= num_steps]
    if bad or not its:
        raise InputError(
            f"iteration {bad[0] if bad else '(none)'} is outside 1..{num_steps}: the sweep runs "
            f"num_steps={num_steps} iterations"
        )
    return its


def iter_patching(
    model: LoopedLM,
    pairs: Sequence[PromptPair],
    num_steps: int,
    *,
    kind: Kind = "state",
    sites: Sequence[str] | None = None,
    iterations: Sequence[int] | None = None,
    positions: PositionsArg = "all",
    directions: Sequence[Direction] = DIRECTIONS,
    experiment: str = "patching",
    pair_ids: Sequence[int] | None = None,
    init_state: InitPolicy = "zeros",
    seed: int = 0,
    batched: bool = True,
    rows_per_forward: int = 256,
    pairs_per_chunk: int = 10,
    attribution: bool = False,
    exact: bool = True,
    progress: bool = False,
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """Run the sweep chunk by chunk; yields ``(patch_pairs rows, patching rows)`` per chunk of pairs.

    ``kind="state"`` patches one state per run at ``sites`` (default: the core blocks) × ``iterations``
    (default 1..T) × ``positions`` (default every recipient position with an aligned source; a list of
    lists patches each set together); ``kind="reinject"`` re-injects the source's input at the positions
    from each iteration to T instead. ``init_state``: ``"zeros"``, ``"random"`` (one seeded draw per
    pair, shared by its two prompts) or ``None`` (the family's default; Ouro's loop starts from the
    embeddings). ``exact`` runs the patched forwards (batched, ``rows_per_forward`` at a time, or one per
    patch with ``batched=False``); ``attribution`` adds the gradient estimates of a state sweep.
    """
    pairs = check_pairs(model, pairs)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise InputError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if kind not in ("state", "reinject"):
        raise InputError(f"kind must be 'state' or 'reinject', got {kind!r}")
    if kind == "reinject" and not model.layout.adapter:
        raise InputError(
            f"{model.layout.family} models have no adapter, so there is no injection to re-inject (use kind='state')"
        )
    if kind == "reinject" and attribution:
        raise InputError("attribution patching estimates state patches; it does not apply to kind='reinject'")
    sites = _sites(model, sites)
    its = _iterations(iterations, num_steps)
    directions = list(directions)
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad or not directions:
        raise InputError(f"directions must be among {DIRECTIONS}, got {directions}")
    if rows_per_forward < 1 or pairs_per_chunk < 1:
        raise InputError("rows_per_forward and pairs_per_chunk must be >= 1")
    ids_all = list(pair_ids) if pair_ids is not None else list(range(len(pairs)))
    if len(ids_all) != len(pairs):
        raise InputError(f"{len(ids_all)} pair ids for {len(pairs)} pairs")
    settings: dict[str, Any] = dict(
        kind=kind, sites=sites, iterations=its, positions=positions, directions=directions,
        experiment=experiment, init_state=init_state, seed=seed, batched=batched,
        rows_per_forward=rows_per_forward, attribution=attribution, exact=exact,
    )  # fmt: skip
    bar = tqdm(total=len(pairs), desc=f"patching ({experiment})", unit="pair", disable=not progress)
    for start in range(0, len(pairs), pairs_per_chunk):
        chunk = pairs[start : start + pairs_per_chunk]
        yield _run_chunk(model, chunk, ids_all[start : start + pairs_per_chunk], num_steps, **settings)
        bar.update(len(chunk))
    bar.close()


def _run_chunk(
    model: LoopedLM,
    pairs: Sequence[PromptPair],
    pair_ids: Sequence[int],
    num_steps: int,
    *,
    kind: Kind,
    sites: Sequence[str],
    iterations: Sequence[int],
    positions: PositionsArg,
    directions: Sequence[Direction],
    experiment: str,
    init_state: InitPolicy,
    seed: int,
    batched: bool,
    rows_per_forward: int,
    attribution: bool,
    exact: bool,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    # pairs of equal prompt lengths run together (their inputs stack on the batch axis)
    by_length: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(pairs):
        by_length.setdefault((len(p.clean), len(p.corrupt)), []).append(i)
    groups = list(by_length.values())
    traced = list(sites) + [_handed_on(model)] + ([_prelude_site(model)] if kind == "reinject" else [])
    sides = []
    for members in groups:
        lengths = [len(pairs[members[0]].clean), len(pairs[members[0]].corrupt)]
        init = initial_states(model, lengths, init_state, seed, [pair_ids[i] for i in members])
        both = []
        for name in ("clean", "corrupt"):
            ids = torch.tensor([list(getattr(pairs[i], name)) for i in members], device=model.device)
            both.append(_base_run(model, ids, init, traced, num_steps))
        sides.append((both[0], both[1]))
    pairs_frame, clean_ld, corrupt_ld = _pairs_frame(model, pairs, pair_ids, experiment, groups, sides)
    frames = []
    for direction in directions:
        for members, (clean, corrupt) in zip(groups, sides, strict=True):
            sub = [pairs[i] for i in members]
            sub_ids = [pair_ids[i] for i in members]
            recipient, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
            ld_pair = (corrupt_ld[members], clean_ld[members])
            base_ld, source_ld = ld_pair if direction == "denoise" else ld_pair[::-1]
            items = _items(model, sub, direction, kind, sites, iterations, positions)
            if not len(items):
                continue
            answers = [
                torch.tensor([getattr(p, a) for p in sub])[items.pair]
                for a in ("clean_answer", "corrupt_answer")
            ]
            follow = torch.tensor([-1 if p.follow_answer is None else p.follow_answer for p in sub])[
                items.pair
            ]
            if exact:
                logits, exits = _patched_runs(
                    model, recipient, source, items, kind, num_steps, batched, rows_per_forward
                )
                metrics = _answer_metrics(logits, answers[0], answers[1], follow)
                frames.append(
                    _rows_frame(
                        model,
                        sub,
                        sub_ids,
                        experiment,
                        direction,
                        "exact",
                        items,
                        num_steps,
                        metrics,
                        base_ld,
                        source_ld,
                        exits,
                    )  # fmt: skip
                )
            if attribution:
                delta = _attribution(model, recipient, source, sub, items, num_steps)
                metrics = {"logit_diff": base_ld[items.pair] + delta}
                frames.append(
                    _rows_frame(
                        model,
                        sub,
                        sub_ids,
                        experiment,
                        direction,
                        "attribution",
                        items,
                        num_steps,
                        metrics,
                        base_ld,
                        source_ld,
                        None,
                    )  # fmt: skip
                )
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return records("patch_pairs", pairs_frame), records("patching", rows)


def _attribution(
    model: LoopedLM,
    recipient: _Side,
    source: _Side,
    pairs: Sequence[PromptPair],
    items: _Items,
    num_steps: int,
) -> np.ndarray:
    """Attribution patching: ``Σ (h_source − h_recipient) · ∂ logit_diff / ∂ h_recipient`` over each item's
    patched positions, from one forward and one backward pass over the recipients (rows are independent,
    so one summed backward gives every row's gradients)."""
    layout = model.layout
    sites = [str(s) for s in np.unique(items.site)]
    captured: dict[str, list[Tensor]] = {s: [] for s in sites}
    names = {layout.hook_name(s): s for s in sites}

    def capture(x: Tensor, *, hook: Any) -> None:
        captured[names[hook.name]].append(x)

    def differentiable(x: Tensor, *, hook: Any) -> Tensor:  # gradients flow whether or not weights need them
        return x.detach().requires_grad_(True)

    hooks = [("hook_embed", differentiable)] + [(name, capture) for name in names]
    with torch.enable_grad():
        # (0, T): every iteration with gradients (a plain T runs the loop without them)
        out = model.run_with_hooks(
            recipient.ids, (0, num_steps), recipient.init, fwd_hooks=hooks, logits="last"
        )
        logits = out.logits[:, -1].float()
        rows = torch.arange(logits.shape[0], device=logits.device)
        clean = torch.tensor([p.clean_answer for p in pairs], device=logits.device)
        corrupt = torch.tensor([p.corrupt_answer for p in pairs], device=logits.device)
        ld = logits[rows, clean] - logits[rows, corrupt]
        flat = [t for s in sites for t in captured[s]]
        grads = torch.autograd.grad(ld.sum(), flat)
    by_site, k = {}, 0
    for s in sites:
        n = len(captured[s])
        by_site[s] = torch.stack(grads[k : k + n]).float()  # [T or 1, n, S, d]
        k += n
    entry_rows, pos, src = items.entries()
    site_of = items.site[entry_rows.numpy()]
    t_index = (torch.as_tensor(items.iteration)[entry_rows] - 1).clamp(min=0)
    pair = torch.as_tensor(items.pair)[entry_rows]
    per_entry = torch.zeros(len(entry_rows))
    for site in sites:
        sel = torch.as_tensor(np.nonzero(site_of == site)[0])
        g = by_site[site][t_index[sel], pair[sel], pos[sel]]
        h_src = source.states[site][t_index[sel], pair[sel], src[sel]].float()
        h_rec = recipient.states[site][t_index[sel], pair[sel], pos[sel]].float()
        per_entry[sel] = ((h_src - h_rec) * g).sum(-1).detach().cpu()
    return torch.zeros(len(items)).index_add_(0, entry_rows, per_entry).numpy()


def patching_sweep(
    model: LoopedLM, pairs: Sequence[PromptPair], num_steps: int, **kwargs: Any
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The whole sweep at once: ``(patch_pairs, patching)`` record frames (see :func:`iter_patching`)."""
    chunks = list(iter_patching(model, pairs, num_steps, **kwargs))
    return (
        pd.concat([c[0] for c in chunks], ignore_index=True),
        pd.concat([c[1] for c in chunks], ignore_index=True),
    )


def spearman(a: Any, b: Any) -> float | None:
    """Spearman's rank correlation of two equally long series; ``None`` when either is constant or too short."""
    from scipy.stats import spearmanr

    a, b = pd.Series(a, dtype=float), pd.Series(b, dtype=float)
    ok = a.notna() & b.notna()
    a, b = a[ok], b[ok]
    if len(a) < 3 or a.nunique() < 2 or b.nunique() < 2:
        return None
    return float(spearmanr(a, b).statistic)


def attribution_agreement(rows: pd.DataFrame) -> dict[str, Any]:
    """How well attribution patching ranks the cells exact patching measured (Spearman's ρ of the effect).

    Cells are matched on pair, experiment, direction, site, iteration and position; ``rho_cells`` ranks
    every cell's effect (the normalised change of the logit difference), ``rho_heatmap`` the mean effect
    per direction × site × iteration × position (the heat maps' cells), ``rho_by_direction`` each
    direction's cells. Cells whose estimate is exactly zero are left out (``no_op_cells``): there the
    source and recipient states are identical (positions before the prompts' first difference), the
    patch does nothing, and the exact effect is pure rounding noise that would rank at random. Returns
    ``{}`` when either method is missing.
    """
    key = ["pair_id", "experiment", "direction", "site", "iteration", "position"]
    exact = rows[rows["method"] == "exact"]
    approx = rows[rows["method"] == "attribution"]
    if exact.empty or approx.empty:
        return {}
    both = exact[key + ["effect"]].merge(approx[key + ["effect"]], on=key, suffixes=("_exact", "_attr"))
    no_op = both["effect_attr"] == 0
    both = both[~no_op]
    if both.empty:
        return {}
    heat = both.groupby(["experiment", "direction", "site", "iteration", "position"])[
        ["effect_exact", "effect_attr"]
    ].mean()
    return {
        "cells": len(both),
        "no_op_cells": int(no_op.sum()),
        "rho_cells": spearman(both["effect_exact"], both["effect_attr"]),
        "rho_heatmap": spearman(heat["effect_exact"], heat["effect_attr"]),
        "rho_by_direction": {
            d: spearman(g["effect_exact"], g["effect_attr"]) for d, g in both.groupby("direction")
        },
    }
